"""Batched generation for evaluation and serving.

Owns `load_for_inference` (model + tokenizer + the prompt format saved with it; LoRA adapters are
merged in memory and the weights cast to bf16, which runs ~3x faster than fp32 on AVX-512-BF16 CPUs)
and `generate` (greedy or sampled decoding of many prompts, batched by length).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from calltune.formats import PromptFormat, load_format
from calltune.models import load_model


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


def load_for_inference(name: str, dtype: torch.dtype | None = None, attn_implementation: str = "sdpa"):
    """Load `name` (alias, folder, GGUF, hub id or LoRA adapter) for generation.

    Returns:
        ``(model, tokenizer, fmt)``; `fmt` is the `PromptFormat` saved with the model, or None for a
        model calltune did not train.
    """
    model, tokenizer, path = load_model(name, dtype=torch.float32, attn_implementation=attn_implementation)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = fast_decode_linears(model.to(dtype or inference_dtype()).eval())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, load_format(path)


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 128, batch_size: int = 32,
             temperature: float = 0.0, progress: bool = False) -> list[Generation]:
    """Complete each prompt (token ids); greedy when `temperature == 0`.

    Prompts are sorted by length and left-padded in batches of `batch_size`, so a batch wastes little
    on padding; results come back in the input order. Generation stops at the tokenizer's eos token.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc="generate", unit="ex")
    for batch in batches:
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(prompts[i])
            ids[row, width - n:] = torch.tensor(prompts[i])
            attn[row, width - n:] = 1
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), max_new_tokens=max_new_tokens,
                             eos_token_id=eos, pad_token_id=pad, **sampling)
        for row, i in enumerate(batch):
            new = out[row, width:].tolist()
            stopped = eos in new
            if stopped:
                new = new[:new.index(eos)]
            else:
                while new and new[-1] == pad:
                    new.pop()
            results[i] = Generation(text=tokenizer.decode(new, skip_special_tokens=True),
                                    prompt_tokens=len(prompts[i]), completion_tokens=len(new) + int(stopped),
                                    finish_reason="stop" if stopped else "length")
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]
