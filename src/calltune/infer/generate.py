"""Batched generation for evaluation and serving.

Owns `load_for_inference` (model + tokenizer + the prompt format saved with it; LoRA adapters are
merged in memory and the weights cast to bf16, which runs ~3x faster than fp32 on AVX-512-BF16 CPUs)
and `generate` (greedy or sampled decoding of many prompts, batched by length).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from calltune.formats import PromptFormat, load_format
from calltune.models import load_model


LogitsHook = Callable[[list[int], torch.Tensor, Optional[list[int]]], torch.Tensor]


@dataclass
class Generation:
    """One completion: its text (special tokens removed), token counts, and why it stopped."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end-of-turn) or "length" (max_new_tokens)


def inference_dtype() -> torch.dtype:
    """bf16 on GPUs and on CPUs that support it, else fp32."""
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.backends.mkldnn.is_available() else torch.float32


GQA_ATTENTION = "calltune_gqa"


def gqa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """Eager attention for grouped-query models that never copies keys and values per query head.

    A transformers attention function (registered as ``"calltune_gqa"`` with `AttentionInterface`,
    its mask built by transformers' eager mask): query (B, H, q, D), key and value (B, Hkv, L, D) with
    H = Hkv * g; returns ((B, q, H, D), None). The g query heads that share a key/value head are
    stacked into one (g * q)-row matmul, where transformers' eager attention first repeats every key
    and value g times and PyTorch's CPU SDPA kernel tiles over q: at a decode step (q = 1) on this CPU
    those cost ~3.4 ms (SDPA) and ~2 ms (eager) per layer for 38 rows of ~100 cached tokens.
    """
    b, h, q, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    groups = h // hkv
    scores = torch.matmul(query.reshape(b, hkv, groups * q, d), key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = (scores.view(b, hkv, groups, q, length) + attention_mask[:, :, None, :, :length]).view(
            b, hkv, groups * q, length)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value).view(b, h, q, d)
    return out.transpose(1, 2).contiguous(), None


def _register_gqa_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(GQA_ATTENTION, gqa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GQA_ATTENTION, eager_mask)


def _linear_2d(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3 and x.shape[1] == 1:
        return torch.nn.functional.linear(x.reshape(x.shape[0], -1), self.weight, self.bias).unsqueeze(1)
    return torch.nn.functional.linear(x, self.weight, self.bias)


def fast_decode_linears(model: torch.nn.Module) -> torch.nn.Module:
    """Make every `nn.Linear` flatten decode-step inputs of shape (B, 1, K) to (B, K).

    On CPU, PyTorch runs a bf16 linear on a (B, 1, K) input about 5x slower than on the same data
    shaped (B, K) (measured here: 3.9 ms vs 0.8 ms for B=48, K=576, N=1536), and a decode step of
    batched generation is exactly that shape. The math is the same; the two kernels round bf16
    partial sums differently, so greedy outputs can differ where two tokens are nearly tied.
    """
    import types

    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.forward = types.MethodType(_linear_2d, module)
    return model


def load_for_inference(name: str, dtype: torch.dtype | None = None, attn_implementation: str = GQA_ATTENTION):
    """Load `name` (alias, folder, GGUF, hub id or LoRA adapter) for generation.

    `attn_implementation` defaults to `gqa_attention` (registered with transformers here); any
    transformers name (``sdpa``, ``eager``, ...) works too.

    Returns:
        ``(model, tokenizer, fmt)``; `fmt` is the `PromptFormat` saved with the model, or None for a
        model calltune did not train.
    """
    if attn_implementation == GQA_ATTENTION:
        _register_gqa_attention()
    model, tokenizer, path = load_model(name, dtype=torch.float32, attn_implementation=attn_implementation)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = fast_decode_linears(model.to(dtype or inference_dtype()).eval())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, load_format(path)


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 128, batch_size: int = 32,
             temperature: float = 0.0, top_p: float = 1.0, stop: list[str] | None = None,
             logits_hook: LogitsHook | None = None, streamer=None, progress: bool = False) -> list[Generation]:
    """Complete each prompt (token ids); greedy when `temperature == 0`. Results come back in input order.

    The decode loop is calltune's own (not `model.generate`), for three savings that evaluation sets
    offer (measured in ``benchmarks/generate_throughput.py``):

    - **shared prefix**: the prompts of a batch usually share a long prefix (the system prompt, the
      instruction, the tools). Its key/value cache is computed once, at batch size 1, and repeated for
      the batch; only the rest of each prompt is prefilled (for ViGGO 53 of 89 tokens are shared);
    - **finished rows leave the batch**: a row that wrote end-of-turn is dropped from the batch and
      its cache, so the batch does not keep paying for the longest answer;
    - only the last position's logits are computed in the prefill (``logits_to_keep=1``).

    Prompts are sorted by length and batched by `batch_size`; within a batch the prompt rests are
    left-padded *after* the shared prefix, with position ids that skip the padding, so a row's
    positions are the ones it would have alone.

    Args:
        prompts: token ids per prompt, each non-empty.
        temperature: 0 is greedy; otherwise sample from softmax(logits / temperature), nucleus `top_p`.
        stop: strings that end a completion (cut from the text; finish_reason ``stop``).
        logits_hook: called every step as ``hook(rows, scores, last)`` with the original indices of the
            active rows, their (n_rows, vocab) float scores and the tokens they chose at the previous
            step (None at the first step); returns the scores to choose from (constrained decoding).
        streamer: a transformers streamer (`TextIteratorStreamer`); only with a single prompt.

    Returns:
        One `Generation` per prompt; ``completion_tokens`` counts the end-of-turn token when written.

    Raises:
        ValueError: an empty prompt, or a streamer with several prompts.
    """
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if streamer is not None and len(prompts) != 1:
        raise ValueError("a streamer needs exactly one prompt")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc="generate", unit="ex")
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        for i, gen in zip(batch, _generate_batch(model, tokenizer, [prompts[i] for i in batch], batch, max_new_tokens,
                                                 temperature, top_p, stop or [], logits_hook, streamer)):
            results[i] = gen
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]


def _common_prefix(prompts: list[list[int]]) -> int:
    """Length of the longest common prefix of `prompts`, leaving every prompt at least one token."""
    shortest = min(len(p) for p in prompts)
    n = 0
    while n < shortest - 1 and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


def _choose(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Next token per row of `scores` (n, vocab): argmax, or a sample at `temperature` within `top_p`."""
    if temperature <= 0:
        return scores.argmax(-1)
    probs = torch.softmax(scores / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, idx = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_probs)
    return torch.multinomial(probs, 1).squeeze(-1)


def _generate_batch(model, tokenizer, prompts: list[list[int]], rows: list[int], max_new_tokens: int,
                    temperature: float, top_p: float, stop: list[str], logits_hook: LogitsHook | None,
                    streamer) -> list[Generation]:
    from transformers import DynamicCache

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    n = len(prompts)
    shared = _common_prefix(prompts)
    cache = DynamicCache(config=model.config)
    if shared:  # the shared prefix once, at batch size 1, then repeated for every row
        model(input_ids=torch.tensor([prompts[0][:shared]], device=device), past_key_values=cache,
              use_cache=True, logits_to_keep=1)
        if n > 1:
            cache.batch_repeat_interleave(n)
    # The rest of each prompt, left-padded after the prefix: [prefix][pad...][rest].
    width = max(len(p) for p in prompts) - shared
    ids = torch.full((n, width), pad, dtype=torch.long)
    rest_mask = torch.zeros((n, width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - (len(p) - shared):] = torch.tensor(p[shared:])
        rest_mask[row, width - (len(p) - shared):] = 1
    attention = torch.cat([torch.ones((n, shared), dtype=torch.long), rest_mask], dim=1).to(device)
    positions = (shared + rest_mask.cumsum(-1) - 1).clamp(min=0).to(device)
    if streamer is not None:
        streamer.put(torch.tensor([prompts[0]]))
    out = model(input_ids=ids.to(device), attention_mask=attention, position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    scores = out.logits[:, -1].float()
    next_pos = positions[:, -1:] + 1
    active = list(range(n))  # batch rows still generating, by their index in `prompts`
    new: list[list[int]] = [[] for _ in range(n)]
    finish = ["length"] * n
    last = None
    for _ in range(max_new_tokens):
        if logits_hook is not None:
            scores = logits_hook([rows[a] for a in active], scores, last)
        chosen = _choose(scores, temperature, top_p)
        last = chosen.tolist()
        keep = []
        for slot, (a, token) in enumerate(zip(active, last)):
            if token == eos:
                finish[a] = "eos"
                continue
            new[a].append(token)
            if stop and _hits_stop(tokenizer, new[a], stop):
                finish[a] = "stop"
                continue
            keep.append(slot)
        if streamer is not None and finish[0] == "length":
            streamer.put(chosen[:1].cpu())
        if not keep:
            break
        if len(keep) < len(active):  # finished rows leave the batch and the cache
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            attention, next_pos, chosen = attention[index], next_pos[index], chosen[index]
            active = [active[s] for s in keep]
            last = [last[s] for s in keep]
        attention = torch.cat([attention, torch.ones((len(active), 1), dtype=attention.dtype, device=device)], dim=1)
        out = model(input_ids=chosen[:, None], attention_mask=attention, position_ids=next_pos,
                    past_key_values=cache, use_cache=True)
        scores = out.logits[:, -1].float()
        next_pos = next_pos + 1
    if streamer is not None:
        streamer.end()
    results = []
    for p, tokens, why in zip(prompts, new, finish):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if why == "stop":
            text = text[:min(i for i in (text.find(s) for s in stop) if i >= 0)]
        results.append(Generation(text=text, prompt_tokens=len(p), completion_tokens=len(tokens) + (why == "eos"),
                                  finish_reason="length" if why == "length" else "stop"))
    return results


def _hits_stop(tokenizer, tokens: list[int], stop: list[str]) -> bool:
    """Whether the decoded tail of `tokens` contains a stop string (checks only the last few tokens)."""
    tail = tokenizer.decode(tokens[-(max(map(len, stop)) + 8):], skip_special_tokens=True)
    return any(s in tail for s in stop)
