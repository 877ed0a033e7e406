"""Batched generation for evaluation and serving.

Owns `load_for_inference` (model + tokenizer + the prompt format saved with it; LoRA adapters are
merged in memory and the weights cast to bf16, which CPUs with AVX-512 BF16 run several times faster
than fp32), `generate` (greedy or sampled decoding of many prompts, batched by length) and
`ContinuousDecoder` (the same continuous batching for requests that arrive while it runs, with
settings per request: the server's decode loop, driven by `calltune.infer.scheduler`).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from calltune.formats import load_format
from calltune.models import load_model

log = logging.getLogger(__name__)

LogitsHook = Callable[[list[int], torch.Tensor, Optional[list[int]]], torch.Tensor]


@dataclass
class Generation:
    """One completion: its text (special tokens removed), token counts, and why it stopped."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end-of-turn, stop string), "length" (max_new_tokens), "cancelled" (ContinuousDecoder)


def inference_dtype() -> torch.dtype:
    """bf16 on GPUs and on CPUs that support it, else fp32."""
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.backends.mkldnn.is_available() else torch.float32


GQA_ATTENTION = "calltune_gqa"


def gqa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                  calltune_prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None, **kwargs):
    """Eager attention for grouped-query models that never copies keys and values per query head.

    A transformers attention function (registered as ``"calltune_gqa"`` with `AttentionInterface`,
    its mask built by transformers' eager mask): query (B, H, q, D), key and value (B, Hkv, L, D) with
    H = Hkv * g; returns ((B, q, H, D), None). The g query heads that share a key/value head are
    stacked into one (g * q)-row matmul, where transformers' eager attention first repeats every key
    and value g times and PyTorch's CPU SDPA kernel tiles over q; both are slower at a decode step
    (q = 1). With q > 1 (a prefill) the fused SDPA kernel is the faster one, and `_prefill_attention`
    uses it (figures in docs/design.md).

    `calltune_prefix` (passed through the model's forward kwargs by `generate`): per layer, the keys
    and values (1, Hkv, P, D) of a prefix that comes before every row's own `key`/`value` and that
    every query sees whole (cascade attention, as in FlashInfer). Its scores for all B rows come from
    one (B * g * q)-row matmul per key/value head, so the P prefix columns are stored and read once
    rather than once per row; the softmax runs over prefix and row columns together, so the result is
    that of attending to the concatenated keys. `attention_mask` covers the row columns only.
    """
    b, h, q, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    if q > 1:
        return _prefill_attention(module, query, key, value, attention_mask, scaling, calltune_prefix), None
    groups = h // hkv
    query = query.reshape(b, hkv, groups * q, d)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = (scores.view(b, hkv, groups, q, length) + attention_mask[:, :, None, :, :length]).view(
            b, hkv, groups * q, length)
    if calltune_prefix is None:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(probs, value).view(b, h, q, d)
        return out.transpose(1, 2).contiguous(), None
    prefix_keys, prefix_values = calltune_prefix[module.layer_idx]
    shared = prefix_keys.shape[2]
    by_head = query.transpose(0, 1).reshape(hkv, b * groups * q, d)  # (Hkv, B*g*q, D)
    prefix_scores = torch.matmul(by_head, prefix_keys[0].transpose(1, 2)) * scaling  # (Hkv, B*g*q, P)
    scores = torch.cat([prefix_scores.view(hkv, b, groups * q, shared).transpose(0, 1), scores], dim=-1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs[..., shared:], value)  # (B, Hkv, g*q, D)
    prefix_probs = probs[..., :shared].transpose(0, 1).reshape(hkv, b * groups * q, shared)
    out += torch.matmul(prefix_probs, prefix_values[0]).view(hkv, b, groups * q, d).transpose(0, 1)
    return out.view(b, h, q, d).transpose(1, 2).contiguous(), None


def _prefill_attention(module, query, key, value, attention_mask, scaling, prefix):
    """`gqa_attention` for q > 1 (a prefill): PyTorch's fused CPU attention (SDPA, with ``enable_gqa``)
    over the shared prefix's keys and values followed by the rows' own; with many queries per row it
    is faster than the matmul-and-softmax path decode steps use, which materialises fp32 scores for
    every query. A query that may see no column (left padding with no prefix) is let see all of
    them: its output is never read, but a NaN there would reach real rows through 0-weighted values."""
    b, _, q, _ = query.shape
    length = key.shape[2]
    allowed = None if attention_mask is None else attention_mask[..., :length] == 0  # (b, 1, q, length)
    if prefix is not None:
        prefix_keys, prefix_values = prefix[module.layer_idx]
        shared = prefix_keys.shape[2]
        key = torch.cat([prefix_keys.expand(b, -1, -1, -1), key], dim=2)
        value = torch.cat([prefix_values.expand(b, -1, -1, -1), value], dim=2)
        if allowed is not None:
            allowed = torch.cat([allowed.new_ones(b, 1, q, shared), allowed], dim=-1)
    if allowed is not None:
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling,
                                                           enable_gqa=True)
    return out.transpose(1, 2).contiguous()


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

    Some PyTorch CPU builds run a bf16 linear on a (B, 1, K) input several times slower than on the
    same data shaped (B, K) (docs/design.md), and a decode step of batched generation is exactly that
    shape. The math is the same; the two kernels round bf16 partial sums differently, so greedy
    outputs can differ where two tokens are nearly tied.
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


PREFILL_ROWS = 48  # most prompts prefilled in one forward; a larger join is split into chunks of similar length
WIDTH_STEP = 16  # SlotLayer widths are multiples of this: re-laid out at most every 16 decode steps


class SlotLayer(CacheLayerMixin):
    """One attention layer's keys and values for up to `rows` sequences, in preallocated storage.

    A transformers cache layer (`CacheLayerMixin`) for `generate`'s decode steps. Row r of the batch
    lives in slot r of a (rows, kv_heads, width, head_dim) tensor; each row keeps its own columns
    (which of them hold tokens is the decoder's mask), so rows of different lengths share it and a row
    that finishes is replaced by a new prompt's prefilled keys and values without touching the others.
    A decode step writes each row's key and value in place at its own column (`columns`) and returns
    the first `rows_live` slots, a contiguous view. `width` follows the longest live row in steps of
    `WIDTH_STEP`; changing it re-lays the live slots out into a second storage (the two are allocated
    once, at the largest width, and zeroed only as far as the widths reach). Attention reads a
    contiguous cache of the live width faster than a strided view of a wider one or a cache of the
    largest width, and `DynamicCache` would copy the whole cache at every step to append one column
    (figures in docs/design.md).
    """

    is_compileable = False
    is_sliding = False

    def __init__(self):
        super().__init__()
        self.rows_live = 0
        self.width = 0
        self.columns: torch.Tensor | None = None  # (rows_live,) column each row writes this step
        self._storage: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._current = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a SlotLayer is filled with `allocate` and `fill`, not by a forward pass")

    def allocate(self, rows: int, max_width: int, like: torch.Tensor) -> None:
        """Two storages for (rows, kv_heads, max_width, head_dim) keys and values, of `like`'s kv_heads,
        head_dim, dtype and device; the width starts at 0. They are allocated uninitialised and zeroed
        only as far as a view reaches (`_view`), so memory the widths never reach is never touched
        (and, on Linux, never becomes resident)."""
        size = rows * like.shape[1] * max_width * like.shape[3]
        self._shape = (rows, like.shape[1], like.shape[3])
        self.max_width = max_width
        self._storage = [(torch.empty(size, dtype=like.dtype, device=like.device),
                          torch.empty(size, dtype=like.dtype, device=like.device)) for _ in range(2)]
        self._zeroed = [0, 0]  # per storage: its first n elements hold zeros or written keys/values
        self._current, self.width = 0, 0
        self._view()
        self.is_initialized = True

    def _view(self) -> None:
        """Point `keys`/`values` at the current storage, laid out for the current width. Every element a
        view covers must be finite (a masked column still meets its value in probs @ values, and
        0 * NaN is NaN): elements never covered before are zeroed first."""
        rows, heads, dim = self._shape
        keys, values = self._storage[self._current]
        size = rows * heads * self.width * dim
        if size > self._zeroed[self._current]:
            keys[self._zeroed[self._current]:size].zero_()
            values[self._zeroed[self._current]:size].zero_()
            self._zeroed[self._current] = size
        shape = (rows, heads, self.width, dim)
        self.keys = keys[:size].view(shape)
        self.values = values[:size].view(shape)

    def resize(self, width: int, keep: int) -> None:
        """Re-lay out to `width` columns, copying the first `keep` slots' first min(old, new) columns."""
        old_keys, old_values, common = self.keys, self.values, min(self.width, width)
        self._current, self.width = 1 - self._current, width
        self._view()
        self.keys[:keep, :, :common] = old_keys[:keep, :, :common]
        self.values[:keep, :, :common] = old_values[:keep, :, :common]

    def grow(self, max_width: int) -> None:
        """Make room for widths up to `max_width` (new, larger storages), keeping every slot's keys and values;
        nothing when there is room already."""
        if max_width <= self.max_width:
            return
        old_keys, old_values = self.keys, self.values
        rows, heads, dim = self._shape
        size = rows * heads * max_width * dim
        self._storage = [(torch.empty(size, dtype=old_keys.dtype, device=old_keys.device),
                          torch.empty(size, dtype=old_keys.dtype, device=old_keys.device)) for _ in range(2)]
        self._zeroed, self._current, self.max_width = [0, 0], 0, max_width
        self._view()
        self.keys.copy_(old_keys)
        self.values.copy_(old_values)

    def fill(self, first: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Copy prefilled (k, kv_heads, L, head_dim) keys and values into slots first..first+k-1, columns 0..L-1."""
        k, length = keys.shape[0], keys.shape[2]
        self.keys[first:first + k, :, :length] = keys
        self.values[first:first + k, :, :length] = values

    def move(self, to: torch.Tensor, frm: torch.Tensor) -> None:
        """Copy slots `frm` into slots `to` (both (m,) long tensors)."""
        self.keys[to] = self.keys[frm]
        self.values[to] = self.values[frm]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write (rows_live, kv_heads, 1, head_dim) states at each row's column; return the live slots."""
        rows = torch.arange(self.rows_live, device=key_states.device)
        self.keys[rows, :, self.columns] = key_states[:, :, 0]
        self.values[rows, :, self.columns] = value_states[:, :, 0]
        return self.keys[:self.rows_live], self.values[:self.rows_live]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.width, 0

    def get_seq_length(self) -> int:
        return self.width

    def get_max_length(self) -> int:
        return self.max_width if self.is_initialized else -1


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 128, batch_size: int = 32,
             temperature: float = 0.0, top_p: float = 1.0, stop: list[str] | None = None,
             logits_hook: LogitsHook | None = None, streamer=None, progress: bool = False,
             workers: int | None = None, cancel: Callable[[], bool] | None = None) -> list[Generation]:
    """Complete each prompt (token ids); greedy when `temperature == 0`. Results come back in input order.

    The decode loop is calltune's own (not `model.generate`), with continuous batching: up to
    `batch_size` rows decode together; a row that writes end-of-turn leaves the batch at once and,
    when a quarter of the batch is free, the next prompts are prefilled and join it, so decode steps
    run at a full batch until the prompts run out (what serving engines such as vLLM and TGI do).
    Further savings (``benchmarks/generate_throughput.py`` times the whole):

    - **shared prefix**: prompts usually share a long prefix (the system prompt, the instruction, the
      tools; for ViGGO 53 of 89 tokens). The prefix common to *all* prompts is computed once per call,
      at batch size 1, and kept once: `gqa_attention` reads it for every row as a separate block
      (cascade attention), so the rows' cache holds only what follows it. A longer prefix shared by
      the prompts that join together is computed once per join and repeated into their rows. Only
      the rest of each prompt is prefilled;
    - **preallocated cache** (`SlotLayer`): decode steps write keys and values in place;
    - only the last position's logits are computed in the prefill (``logits_to_keep=1``).

    Prompts are taken **longest first**: a completion's length follows its prompt's (Pearson 0.82 on
    ViGGO valid), so the rows still decoding when the prompts run out are short ones and the batch
    drains in fewer, fuller steps. The prompts that join together are prefilled in chunks of at most
    `PREFILL_ROWS` neighbouring lengths, each left-padded *after* its shared prefix only to its own
    longest prompt, with position ids that skip the padding (and the padding masked), so a row's
    positions are the ones it would have alone.

    With several CPU threads the prompts are shared among **workers**: decoders in parallel threads,
    each with its share of the slots and of PyTorch's intra-op threads (PyTorch releases the GIL inside
    ops, so they run at once). Only the matmuls gain much from a second intra-op thread; attention,
    elementwise ops and Python much less, so two decoders on one thread each beat one decoder on two
    (figures in docs/design.md).

    Args:
        prompts: token ids per prompt, each non-empty.
        batch_size: most rows decoding at once (the cache holds batch_size x (longest prompt +
            max_new_tokens) keys and values per layer).
        temperature: 0 is greedy; otherwise sample from softmax(logits / temperature), nucleus `top_p`.
        stop: strings that end a completion (cut from the text; finish_reason ``stop``).
        logits_hook: called every step as ``hook(rows, scores, last)`` with the original indices of the
            live rows, their (n_rows, vocab) scores (logits in the model's dtype) and, per row, the token it chose at the
            previous step (None for a row's first token; `last` itself is None when every row is at its
            first token); returns the scores to choose from (constrained decoding).
        streamer: a transformers streamer (`TextIteratorStreamer`); only with a single prompt.
        workers: decoders run at once, each in its own thread on every workers-th prompt by length,
            with ``batch_size // workers`` slots and ``torch.get_num_threads() // workers`` intra-op
            threads (PyTorch's setting is process-wide; it is restored on return). The hook is then
            called from the workers' threads, possibly at the same time, for disjoint rows. Default:
            `default_workers` (one per intra-op thread, as long as each gets `WORKER_ROWS` prompts and
            slots); with a streamer, always one.
        cancel: polled before every decode step; once it returns True every row stops where it is
            (finish_reason ``length``) and the streamer ends. The server sets it when a client leaves.

    Returns:
        One `Generation` per prompt; ``completion_tokens`` counts the end-of-turn token when written.

    Raises:
        ValueError: an empty prompt, a batch_size or workers below 1, or a streamer with several prompts.
    """
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if streamer is not None and len(prompts) != 1:
        raise ValueError("a streamer needs exactly one prompt")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if not prompts:
        return []
    threads = torch.get_num_threads()
    if workers is None:
        workers = default_workers(len(prompts), batch_size, threads)
    workers = min(workers, len(prompts), batch_size)  # every worker gets a prompt and a slot
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc="generate", unit="ex")
    try:
        if streamer is not None or workers == 1:
            decoder = _Decoder(model, tokenizer, prompts, max_new_tokens, min(batch_size, len(prompts)), temperature,
                               top_p, stop or [], logits_hook, streamer, bar, cancel=cancel)
            return decoder.run()
        return _run_workers(model, tokenizer, prompts, max_new_tokens, batch_size, temperature, top_p, stop or [],
                            logits_hook, bar, workers, threads, cancel)
    finally:
        if bar is not None:
            bar.close()


WORKER_ROWS = 64  # fewest prompts and slots per worker that the default number of workers allows


def default_workers(prompts: int, batch_size: int, threads: int) -> int:
    """`generate`'s default number of workers: one per intra-op thread, as long as each gets at least
    `WORKER_ROWS` prompts and `WORKER_ROWS` slots (fewer rows per matmul run below the CPU's matmul
    peak); at least 1."""
    return max(1, min(threads, prompts // WORKER_ROWS, batch_size // WORKER_ROWS))


def _run_workers(model, tokenizer, prompts, max_new_tokens, batch_size, temperature, top_p, stop, hook, bar,
                 workers, threads, cancel=None) -> list[Generation]:
    """`generate` with `workers` decoders in as many threads, each on every workers-th prompt by length
    (so their shares are alike) with ``batch_size // workers`` slots and ``threads // workers`` of
    PyTorch's intra-op threads (restored afterwards; the setting is process-wide). The logits hook
    sees original prompt indices; sampling draws from one generator per worker, seeded from PyTorch's
    global one, so a seeded call gives the same completions every time. When a worker raises, the others
    stop at their next step and the error reaches the caller."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    by_length = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    shares = [by_length[w::workers] for w in range(workers)]
    seeds = [int(torch.randint(2 ** 62, ())) if temperature > 0 else None for _ in shares]  # greedy: RNG untouched
    shared_bar = _LockedBar(bar) if bar is not None else None
    failed = threading.Event()

    def run(share: list[int], seed: int | None) -> list[Generation]:
        share_hook = None
        if hook is not None:
            def share_hook(rows, scores, last):
                return hook([share[r] for r in rows], scores, last)
        with torch.inference_mode():  # thread-local: the caller's mode does not reach this thread
            decoder = _Decoder(model, tokenizer, [prompts[i] for i in share], max_new_tokens,
                               min(batch_size // workers, len(share)), temperature, top_p, stop, share_hook,
                               None, shared_bar, None if seed is None else torch.Generator().manual_seed(seed),
                               abort=failed, cancel=cancel)
            try:
                return decoder.run()  # cut short (and discarded: a worker raised) once `failed` is set
            except BaseException:
                failed.set()
                raise

    torch.set_num_threads(max(1, threads // workers))
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="calltune-generate") as pool:
            done = [future.result() for future in [pool.submit(run, *job) for job in zip(shares, seeds)]]
    finally:
        torch.set_num_threads(threads)
    results: list[Generation | None] = [None] * len(prompts)
    for share, generations in zip(shares, done):
        for i, generation in zip(share, generations):
            results[i] = generation
    return results


class _LockedBar:
    """A progress bar that several worker threads update."""

    def __init__(self, bar):
        import threading

        self.bar, self.lock = bar, threading.Lock()

    def update(self, n: int) -> None:
        with self.lock:
            self.bar.update(n)


def _common_prefix(prompts: list[list[int]]) -> int:
    """Length of the longest common prefix of `prompts`, leaving every prompt at least one token."""
    shortest = min(len(p) for p in prompts)
    n = 0
    while n < shortest - 1 and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


def _choose(scores: torch.Tensor, temperature: float, top_p: float,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of `scores` (n, vocab): argmax, or a sample at `temperature` within `top_p`
    drawn with `generator` (PyTorch's global one when None)."""
    if temperature <= 0:  # max(...).indices: the same first maximum as argmax, faster on bf16 CPU tensors
        return scores.max(dim=-1).indices
    probs = torch.softmax(scores.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, idx = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _cache_kwarg(model) -> str:
    """The forward's name for the KV cache: ``cache`` (transformers that deprecate the old name) or
    ``past_key_values`` (earlier 5.x releases, e.g. the range vLLM's CPU build pins)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model forwards **kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _prefix_kwargs(prefix: "_SharedPrefix | None") -> dict:
    """Forward kwargs that hand the prompts' common prefix to `gqa_attention` (none without one)."""
    return {"calltune_prefix": prefix} if prefix is not None else {}


class _SharedPrefix(list):
    """Per layer, the (keys, values) of the prompts' common prefix. While `reads` is an int (set to 0 by
    `_Decoder._checked_forward` around a join's prefill) it counts the lookups, so the decoder can check
    that the model handed its ``calltune_prefix`` kwarg to every attention layer; decode steps leave it
    None and uncounted."""

    reads: int | None = None

    def __getitem__(self, layer):
        if self.reads is not None:
            self.reads += 1
        return super().__getitem__(layer)


class _Decoder:
    """State of one `generate` call: the slot cache, the live rows (slot order) and the prompts to come."""

    def __init__(self, model, tokenizer, prompts, max_new_tokens, capacity, temperature, top_p, stop, hook,
                 streamer, bar, generator=None, abort=None, cancel=None):
        self.model, self.tokenizer, self.prompts = model, tokenizer, prompts
        self.max_new_tokens, self.capacity = max_new_tokens, capacity
        self.temperature, self.top_p, self.stop, self.hook, self.streamer = temperature, top_p, stop, hook, streamer
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cache_kw = _cache_kwarg(model)
        self.pending = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # pop() = longest
        self.prefix, self.prefix_len = self._prefix_cache(prompts) if prompts else (None, 0)
        # Columns any row can need.
        longest = max((len(p) for p in prompts), default=0) - self.prefix_len + max(max_new_tokens, 0)
        self.max_width = -(-longest // WIDTH_STEP) * WIDTH_STEP
        self.cache = Cache(layers=[SlotLayer() for _ in range(model.config.num_hidden_layers)])
        self.valid = torch.zeros((capacity, self.max_width), dtype=torch.bool, device=self.device)  # holds a token
        # Per live row, in slot order: prompt index, next column, next position, its tokens, last token.
        self.rows: list[int] = []
        self.columns: list[int] = []
        self.positions: list[int] = []
        self.last: list[int | None] = []
        self.scores: torch.Tensor | None = None  # (live rows, vocab) scores for each row's next token
        self.new: list[list[int]] = [[] for _ in prompts]
        self.finish = ["length"] * len(prompts)
        self.bar, self.generator, self.abort, self.cancel = bar, generator, abort, cancel

    def _prefix_cache(self, prompts: list[list[int]]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]] | None, int]:
        """Keys and values (per layer, each (1, kv_heads, P, head_dim)) of the P tokens every prompt starts
        with, computed once at batch size 1, and P; (None, 0) when there are none or the model's attention
        is not `gqa_attention` (the only one that reads them, through its ``calltune_prefix`` argument)."""
        from transformers import DynamicCache

        shared = _common_prefix(prompts)
        if not shared or getattr(self.model.config, "_attn_implementation", None) != GQA_ATTENTION:
            return None, 0
        cache = DynamicCache(config=self.model.config)
        self._prefill_one(prompts[0][:shared], 0, cache, prefix=None)
        return _SharedPrefix((layer.keys, layer.values) for layer in cache.layers), shared

    def _prefill_one(self, tokens: list[int], start: int, cache, prefix: "_SharedPrefix | None", past: int = 0,
                     **kwargs) -> None:
        """Run `tokens`, at positions start.., at batch size 1 into `cache` (a prefix to be shared), behind
        the common `prefix` of all prompts (None while that one is computed) and the `past` tokens `cache`
        already holds; `kwargs` go to the forward."""
        n = len(tokens)
        self.model(input_ids=torch.tensor([tokens], device=self.device),
                   attention_mask=torch.ones((1, past + n), dtype=torch.long, device=self.device),
                   position_ids=torch.arange(start, start + n, device=self.device)[None],
                   use_cache=True, logits_to_keep=1, **{self.cache_kw: cache}, **_prefix_kwargs(prefix), **kwargs)

    def _forward_kwargs(self, rows: list[int]) -> dict:
        """Extra forward kwargs for a batch of `rows` (prompt indices, in batch order); none here."""
        return {}

    def _checked_forward(self, **inputs):
        """The model's forward on `inputs` with the common prefix, checking that every attention layer
        read it (a forward that drops attention kwargs would otherwise generate garbage silently).

        Raises:
            RuntimeError: some attention layer did not receive ``calltune_prefix``.
        """
        if self.prefix is None:
            return self.model(**inputs)
        self.prefix.reads = 0
        try:
            out = self.model(**inputs, calltune_prefix=self.prefix)
            reads = self.prefix.reads
        finally:
            self.prefix.reads = None
        if reads != len(self.prefix):
            raise RuntimeError(f"{type(self.model).__name__} did not pass the shared prefix to each of its attention "
                               f"layers (its forward drops attention kwargs); load it with "
                               f"attn_implementation='sdpa' to generate without the shared-prefix cache")
        return out

    def run(self) -> list[Generation]:
        if self.streamer is not None:
            self.streamer.put(torch.tensor([self.prompts[0]]))
        refill_at = max(1, self.capacity // 4)  # a quarter: faster than an eighth or a half (ViGGO, 192 rows)
        while (self.pending or self.rows) and not (self.abort is not None and self.abort.is_set()) \
                and not (self.cancel is not None and self.cancel()):
            free = self.capacity - len(self.rows)
            if self.pending and (not self.rows or free >= min(refill_at, len(self.pending))):
                self._join(min(free, len(self.pending)))
            if self.max_new_tokens <= 0:
                self._leave(list(range(len(self.rows))))
                continue
            self._advance()
        if self.streamer is not None:
            self.streamer.end()
        return [self._result(i) for i in range(len(self.prompts))]

    def _advance(self) -> None:
        """Choose every live row's next token, retire the rows that finished, run a decode step for the rest."""
        scores = self.scores
        if self.hook is not None:
            last = None if all(t is None for t in self.last) else list(self.last)
            scores = self.hook(list(self.rows), scores, last)
        chosen = self._pick(scores)
        tokens = chosen.tolist()
        done = [slot for slot, (row, token) in enumerate(zip(self.rows, tokens)) if self._take(slot, row, token)]
        if self.streamer is not None and self.finish[0] == "length" and self.new[0]:
            self.streamer.put(chosen[:1].cpu())
        if done:
            chosen = chosen[self._leave(done)]
        if self.rows:
            self._step(chosen)

    def _pick(self, scores: torch.Tensor) -> torch.Tensor:
        """The (live,) next token of every row from its (live, vocab) scores."""
        return _choose(scores, self.temperature, self.top_p, self.generator)

    def _take(self, slot: int, row: int, token: int) -> bool:
        """Record `token`, chosen by prompt `row` in `slot`; True when the row is finished (end-of-turn, a stop
        string, or its token budget)."""
        self.last[slot] = token
        if token == self.eos:
            self.finish[row] = "eos"
            return True
        self.new[row].append(token)
        if self.stop and _hits_stop(self.tokenizer, self.new[row], self.stop):
            self.finish[row] = "stop"
            return True
        return len(self.new[row]) >= self.max_new_tokens

    def _result(self, i: int) -> Generation:
        tokens, why = self.new[i], self.finish[i]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if why == "stop":
            text = text[:min(j for j in (text.find(s) for s in self.stop) if j >= 0)]
        return Generation(text=text, prompt_tokens=len(self.prompts[i]),
                          completion_tokens=len(tokens) + (why == "eos"),
                          finish_reason="length" if why == "length" else "stop")

    def _join(self, k: int) -> None:
        """Prefill the next `k` prompts (longest first) and put them in the slots after the live rows.

        They are prefilled in chunks of at most `PREFILL_ROWS` prompts of neighbouring lengths, each
        left-padded only to its own longest prompt."""
        rows = [self.pending.pop() for _ in range(k)]
        for chunk in self._chunks(rows):
            self._prefill_chunk(chunk, len(self.rows))

    def _chunks(self, rows: list[int]) -> list[list[int]]:
        """The joining `rows` split into the groups prefilled together: runs of at most `PREFILL_ROWS`."""
        return [rows[at:at + PREFILL_ROWS] for at in range(0, len(rows), PREFILL_ROWS)]

    def _prefill_chunk(self, rows: list[int], first: int) -> None:
        """Prefill prompts `rows` into slots first.., after the live rows."""
        k = len(rows)
        start = self.prefix_len  # the common prefix of all prompts is in self.prefix, not in the rows' cache
        prompts = [self.prompts[i][start:] for i in rows]
        shared = _common_prefix(prompts)
        # The prefix these prompts share, once at batch size 1, then repeated for every row.
        cache = self._shared_cache(rows, prompts[0][:shared], start)
        if shared and k > 1:
            cache.batch_repeat_interleave(k)
        # The rest of each prompt, left-padded after the prefix: [prefix][pad...][rest].
        width = max(len(p) for p in prompts) - shared
        ids = torch.full((k, width), self.pad, dtype=torch.long)
        rest_mask = torch.zeros((k, width), dtype=torch.long)
        for j, p in enumerate(prompts):
            ids[j, width - (len(p) - shared):] = torch.tensor(p[shared:])
            rest_mask[j, width - (len(p) - shared):] = 1
        attention = torch.cat([torch.ones((k, shared), dtype=torch.long), rest_mask], dim=1).to(self.device)
        positions = (start + shared + rest_mask.cumsum(-1) - 1).clamp(min=0).to(self.device)
        out = self._checked_forward(input_ids=ids.to(self.device), attention_mask=attention, position_ids=positions,
                                    use_cache=True, logits_to_keep=1, **{self.cache_kw: cache},
                                    **self._forward_kwargs(rows))
        if not self.cache.layers[0].is_initialized:
            for slot_layer, layer in zip(self.cache.layers, cache.layers):
                slot_layer.allocate(self.capacity, self.max_width, layer.keys)
        self._fit(max(self.columns[:first] + [shared + width]) + 1, keep=first)
        for slot_layer, layer in zip(self.cache.layers, cache.layers):
            slot_layer.fill(first, layer.keys, layer.values)
        self.valid[first:first + k] = False
        self.valid[first:first + k, :shared + width] = attention.bool()
        scores = out.logits[:, -1]
        self.scores = scores if self.scores is None or not self.rows else torch.cat([self.scores, scores])
        self.rows += rows
        self.columns += [shared + width] * k
        self.positions += (positions[:, -1] + 1).tolist()
        self.last += [None] * k

    def _shared_cache(self, rows: list[int], tokens: list[int], start: int):
        """A batch-1 `DynamicCache` holding `tokens`, the prefix that prompts `rows` share, at positions
        start.. (behind the common prefix of all prompts); empty when `tokens` is."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if tokens:
            self._prefill_one(tokens, start, cache, self.prefix, **self._forward_kwargs(rows[:1]))
        return cache

    def _leave(self, done: list[int]) -> torch.Tensor:
        """Drop the rows in slots `done`: the last live rows move into the freed slots below the new end.

        Returns the (live,) old slot of each new slot, to reorder per-row tensors the same way.
        """
        if self.bar is not None:
            self.bar.update(len(done))
        gone = set(done)
        live = len(self.rows) - len(done)
        holes = [s for s in done if s < live]
        movers = [s for s in range(live, len(self.rows)) if s not in gone]
        index = torch.arange(len(self.rows), device=self.device)
        if holes:
            to = torch.tensor(holes, device=self.device)
            frm = torch.tensor(movers, device=self.device)
            for layer in self.cache.layers:
                layer.move(to, frm)
            self.valid[to] = self.valid[frm]
            index[to] = frm
            for lst in (self.rows, self.columns, self.positions, self.last):
                for h, m in zip(holes, movers):
                    lst[h] = lst[m]
        for lst in (self.rows, self.columns, self.positions, self.last):
            del lst[live:]
        index = index[:live]
        self.scores = self.scores[index]
        return index

    @property
    def width(self) -> int:
        """The cache's current width (columns), a multiple of WIDTH_STEP; every layer has the same."""
        return self.cache.layers[0].width

    def _fit(self, needed: int, keep: int) -> None:
        """Resize the cache to the smallest multiple of WIDTH_STEP holding `needed` columns, when it grew
        past the current width or fell a whole step below it; the first `keep` slots are kept."""
        width = -(-needed // WIDTH_STEP) * WIDTH_STEP
        if width > self.width or width < self.width - WIDTH_STEP:
            for layer in self.cache.layers:
                layer.resize(width, keep)

    def _step(self, chosen: torch.Tensor) -> None:
        """One decode step: every live row feeds its chosen token (n,) and gets scores for the next."""
        n = len(self.rows)
        columns = torch.tensor(self.columns, device=self.device)
        self._fit(max(self.columns) + 1, keep=n)
        self.valid[torch.arange(n, device=self.device), columns] = True
        mask = torch.zeros((n, 1, 1, self.width), dtype=self.dtype, device=self.device)
        mask.masked_fill_(~self.valid[:n, None, None, :self.width], torch.finfo(self.dtype).min)
        for layer in self.cache.layers:
            layer.rows_live, layer.columns = n, columns
        out = self.model(input_ids=chosen[:, None], attention_mask=mask,
                         position_ids=torch.tensor(self.positions, device=self.device)[:, None],
                         use_cache=True, **{self.cache_kw: self.cache}, **_prefix_kwargs(self.prefix),
                         **self._forward_kwargs(self.rows))
        self.scores = out.logits[:, -1]  # argmax needs no fp32 copy; sampling converts
        self.columns = [c + 1 for c in self.columns]
        self.positions = [p + 1 for p in self.positions]


def _hits_stop(tokenizer, tokens: list[int], stop: list[str]) -> bool:
    """Whether the decoded tail of `tokens` contains a stop string (checks only the last few tokens)."""
    tail = tokenizer.decode(tokens[-(max(map(len, stop)) + 8):], skip_special_tokens=True)
    return any(s in tail for s in stop)


# Keys and values a server's decode loop keeps of earlier prompts (`PrefixStore`), per loaded model.
PREFIX_CACHE_BYTES = 512 * 2 ** 20


class PrefixStore:
    """Keys and values of recent prompt prefixes, kept across requests so a new prompt that starts
    with one (the same system prompt and tools, an earlier turn of the conversation) prefills only its
    remaining tokens.

    Entries are per adapter (a LoRA adapter changes the keys and values), least recently used first out
    once their tensors pass `max_bytes`. A key or value of the first m tokens of a prompt does not
    depend on the tokens after them (causal attention), so the longest common prefix of a new prompt
    with any stored one is reusable, whatever each continues with.

    Args:
        max_bytes: most bytes of keys and values kept; 0 keeps nothing.
    """

    def __init__(self, max_bytes: int):
        from collections import OrderedDict

        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries: OrderedDict[tuple[str | None, tuple[int, ...]], list[tuple[torch.Tensor, torch.Tensor]]] = \
            OrderedDict()

    def longest(self, adapter: str | None, tokens: list[int]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The most leading tokens of `tokens` some entry of `adapter` holds, and that entry's per-layer
        (keys, values), each (1, kv_heads, n, head_dim) with n at least that count; (0, []) when none."""
        best, found, key = 0, [], None
        for (owner, stored), kv in self.entries.items():
            if owner != adapter:
                continue
            n = _common_length(stored, tokens)
            if n > best:
                best, found, key = n, kv, (owner, stored)
        if key is not None:
            self.entries.move_to_end(key)
        return best, found

    def put(self, adapter: str | None, tokens: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep `kv` (per layer, keys and values of exactly `tokens`) for `adapter`; entries that are a
        prefix of `tokens` go (this one holds them), and nothing is added when one already extends it."""
        tokens = tuple(tokens)
        size = sum(k.nbytes + v.nbytes for k, v in kv)
        if size > self.max_bytes:
            return
        for key in list(self.entries):
            owner, stored = key
            if owner != adapter:
                continue
            n = _common_length(stored, tokens)
            if n == len(tokens):  # an entry already holds all of it
                self.entries.move_to_end(key)
                return
            if n == len(stored):
                self._drop(key)
        self.entries[(adapter, tokens)] = kv
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self.entries)))

    def _drop(self, key) -> None:
        self.bytes -= sum(k.nbytes + v.nbytes for k, v in self.entries.pop(key))


def _full_cache(model) -> bool:
    """Whether every layer of `model`'s `DynamicCache` keeps all positions (no sliding window)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


def _common_length(a: tuple[int, ...], b) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class DecodeRequest:
    """One prompt for a `ContinuousDecoder`, with its own settings (`generate`'s arguments, per row).

    Attributes:
        prompt: token ids, non-empty.
        max_new_tokens: most tokens to generate (end-of-turn included).
        done: called once, from the decoding thread, with the `Generation` when the row leaves
            (finish_reason ``"cancelled"`` when `cancel` dropped it) or with the exception that stopped it.
        temperature, top_p: as in `generate`; `seed` (sampling only) seeds a generator of this row's own,
            so a seeded request samples the same tokens whatever shares its batch.
        stop: strings that end the completion (cut from the text; finish_reason ``stop``).
        logits_hook: ``hook(scores, last) -> scores`` on this row's (vocab,) scores, given the token it
            chose at the previous step (None at its first); e.g. `calltune.infer.constrained.row_constraint`.
        streamer: a transformers streamer (``put``/``end``, e.g. `TextIteratorStreamer`): the prompt, then
            each token as it is chosen; ended when the row leaves, however it leaves.
        cancel: polled before every decode step; once True the row leaves and its slot is free.
        adapter: the PEFT adapter the row runs with (None: the base) when the model carries adapters.
        tokenizer: decodes the text and gives end-of-turn (None: the decoder's).
    """

    prompt: list[int]
    max_new_tokens: int
    done: Callable[[Generation | BaseException], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logits_hook: Callable[[torch.Tensor, Optional[int]], torch.Tensor] | None = None
    streamer: Any = None
    cancel: Callable[[], bool] | None = None
    adapter: str | None = None
    tokenizer: Any = None


@dataclass
class _Live:
    """A `DecodeRequest` admitted to a `ContinuousDecoder`: the tokenizer, end-of-turn id and sampling
    generator it runs with."""

    request: DecodeRequest
    tokenizer: Any
    eos: int | None
    generator: torch.Generator | None


class ContinuousDecoder(_Decoder):
    """`generate`'s continuous batching for requests that arrive while it runs (a server's decode loop).

    One thread calls `serve`; any thread calls `submit`, which puts a `DecodeRequest` on a thread-safe
    intake queue that the loop drains between decode steps. A request joins the running batch as soon
    as a slot (of `capacity`) is free, oldest first, and leaves when it finishes; every row keeps its
    own budget, sampling settings and generator, stop strings, logits hook (its grammar), streamer and
    cancel callable. Rows that join together are prefilled together (left-padded, as in `generate`,
    so a row's positions and greedy tokens are those it has alone). The cache grows to the longest
    prompt plus budget that has joined. Prompts are not known in advance, so there is no prefix
    shared by every prompt; instead, the keys and values of each prefilled prompt go to a
    `PrefixStore` (`prefix_cache_bytes`), and a later prompt that starts the same way (the same
    system prompt and tools, the turns before its last) prefills only what follows the longest stored
    match. Prompts that join at once share their common prefix too.

    On a PEFT model (`peft.PeftModel`: adapters not merged), each row runs with its request's `adapter`
    (None: the base): every forward passes PEFT's ``adapter_names`` (its mixed-adapter batches,
    LoRA only), and rows that join together are prefilled per adapter.

    Attributes (read them from any thread): ``steps`` (decode steps run), ``max_live`` (most rows in
    one step), ``row_steps`` (rows summed over steps), ``finished`` (requests that left),
    ``prefix_reused`` (prompt tokens taken from the `PrefixStore` instead of prefilled).
    """

    def __init__(self, model, tokenizer, capacity: int, prefix_cache_bytes: int = PREFIX_CACHE_BYTES):
        import itertools
        import queue

        from peft import PeftModel

        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        super().__init__(model, tokenizer, [], 0, capacity, 0.0, 1.0, [], None, None, None)
        self.adapters = isinstance(model, PeftModel)  # a merged adapter leaves a plain model
        self.hook = self._constrain
        self.intake: queue.Queue[DecodeRequest | None] = queue.Queue()
        self._ids = itertools.count()
        self.steps = self.max_live = self.row_steps = self.finished = self.prefix_reused = 0
        # Kept across _reset: the stored keys and values depend only on the weights. Only for caches that
        # keep every position (a sliding-window layer drops the oldest, so its keys are no prefix).
        self.prefix_store = PrefixStore(prefix_cache_bytes) if prefix_cache_bytes > 0 and _full_cache(model) else None
        self._reset()

    def _reset(self) -> None:
        """Empty batch, cache and per-request state (at start, and after a failed step)."""
        self.prompts: dict[int, list[int]] = {}
        self.new: dict[int, list[int]] = {}
        self.finish: dict[int, str] = {}
        self.requests: dict[int, _Live] = {}
        self.pending = []
        self.rows, self.columns, self.positions, self.last = [], [], [], []
        self.scores = None
        self.cache = Cache(layers=[SlotLayer() for _ in range(self.model.config.num_hidden_layers)])
        self.valid = torch.zeros((self.capacity, self.max_width), dtype=torch.bool, device=self.device)

    def submit(self, request: DecodeRequest) -> None:
        """Queue `request` for the decode loop (thread-safe; its `done` reports the outcome).

        Raises:
            ValueError: an empty prompt.
        """
        if not request.prompt:
            raise ValueError("every prompt needs at least one token")
        self.intake.put(request)

    def wake(self) -> None:
        """Make an idle `serve` look at its stop event now."""
        self.intake.put(None)

    def serve(self, stop) -> None:
        """Decode until `stop` (a `threading.Event`) is set, then end every request left as cancelled.

        A step that raises (a bug, out of memory) fails the requests in the batch and waiting with that
        error and starts afresh; the loop goes on.
        """
        with torch.inference_mode():  # thread-local: set in the decoding thread itself
            try:
                while not stop.is_set():
                    try:
                        self._intake(wait=not self.rows and not self.pending)
                        self._drop_cancelled()
                        free = self.capacity - len(self.rows)
                        if self.pending and free:
                            self._join(min(free, len(self.pending)))
                        if self.rows:
                            self.steps += 1
                            self.max_live = max(self.max_live, len(self.rows))
                            self.row_steps += len(self.rows)
                            self._advance()
                    except Exception as err:  # every request admitted learns of it; later ones get a fresh batch
                        log.exception("decode step failed; failing the %d requests admitted", len(self.requests))
                        for row in list(self.requests):
                            self._end(row, err)
                        self._reset()
            finally:
                self._intake(wait=False)
                for row in list(self.requests):
                    self._end(row, "cancelled")
                self._reset()

    def _intake(self, wait: bool) -> None:
        """Admit every queued request (waiting up to half a second for one when `wait`)."""
        import queue

        try:
            item = self.intake.get(timeout=0.5) if wait else self.intake.get_nowait()
            while True:
                if item is not None:
                    self._admit(item)
                item = self.intake.get_nowait()
        except queue.Empty:
            pass

    def _admit(self, request: DecodeRequest) -> None:
        i = next(self._ids)
        tokenizer = request.tokenizer or self.tokenizer
        generator = None
        if request.seed is not None and request.temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(request.seed)
        self.requests[i] = _Live(request, tokenizer, tokenizer.eos_token_id, generator)
        self.prompts[i], self.new[i], self.finish[i] = request.prompt, [], "length"
        if request.streamer is not None:
            request.streamer.put(torch.tensor([request.prompt]))
        if request.max_new_tokens <= 0:
            self._end(i)
        else:
            self.pending.insert(0, i)  # pop() takes the oldest

    def _cancelled(self, row: int) -> bool:
        cancel = self.requests[row].request.cancel
        return cancel is not None and bool(cancel())

    def _drop_cancelled(self) -> None:
        """Take the rows whose request was cancelled out of the batch and the waiting list."""
        gone = [slot for slot, row in enumerate(self.rows) if self._cancelled(row)]
        for slot in gone:
            self._end(self.rows[slot], "cancelled")
        if gone:
            _Decoder._leave(self, gone)
        for row in [row for row in self.pending if self._cancelled(row)]:
            self.pending.remove(row)
            self._end(row, "cancelled")

    def _end(self, row: int, outcome: str | BaseException | None = None) -> None:
        """Report `row`'s outcome to its request and forget it: its `Generation` (finish_reason
        ``"cancelled"`` when `outcome` says so) or the exception `outcome`."""
        live = self.requests.get(row)
        if live is None:  # already reported
            return
        result: Generation | BaseException = outcome if isinstance(outcome, BaseException) else self._result(row)
        if outcome == "cancelled":
            result.finish_reason = "cancelled"
        for state in (self.requests, self.prompts, self.new, self.finish):
            del state[row]
        self.finished += 1
        if live.request.streamer is not None:
            live.request.streamer.end()
        live.request.done(result)

    def _leave(self, done: list[int]) -> torch.Tensor:
        for slot in done:
            self._end(self.rows[slot])
        return super()._leave(done)

    def _chunks(self, rows: list[int]) -> list[list[int]]:
        """Rows of one adapter are prefilled together (their shared prompt prefix is the same keys only then)."""
        if not self.adapters:
            return super()._chunks(rows)
        groups: dict[str | None, list[int]] = {}
        for row in rows:
            groups.setdefault(self.requests[row].request.adapter, []).append(row)
        return [chunk for group in groups.values() for chunk in _Decoder._chunks(self, group)]

    def _prefill_chunk(self, rows: list[int], first: int) -> None:
        # Columns the chunk's rows can reach: the longest prompt (all are padded to it) plus the largest budget.
        self._reserve(max(len(self.prompts[r]) for r in rows) + max(self.requests[r].request.max_new_tokens
                                                                    for r in rows))
        super()._prefill_chunk(rows, first)

    def _shared_cache(self, rows: list[int], tokens: list[int], start: int):
        """`_Decoder._shared_cache`, starting from the longest match in the `PrefixStore` and storing the result."""
        from transformers import DynamicCache

        if self.prefix_store is None or not tokens:
            return super()._shared_cache(rows, tokens, start)
        adapter = (self.requests[rows[0]].request.adapter or "__base__") if self.adapters else None
        reused, stored = self.prefix_store.longest(adapter, tokens)
        cache = DynamicCache(config=self.model.config)
        for layer, (keys, values) in enumerate(stored):
            cache.update(keys[:, :, :reused], values[:, :, :reused], layer)
        if reused < len(tokens):
            self._prefill_one(tokens[reused:], start + reused, cache, None, past=reused, **self._forward_kwargs(rows[:1]))
        self.prefix_reused += reused
        self.prefix_store.put(adapter, tokens, [(layer.keys, layer.values) for layer in cache.layers])
        return cache

    def _reserve(self, columns: int) -> None:
        """Make the cache and the token mask hold `columns` columns per slot (grown, never shrunk)."""
        width = -(-columns // WIDTH_STEP) * WIDTH_STEP
        if width <= self.max_width:
            return
        if self.cache.layers[0].is_initialized:
            for layer in self.cache.layers:
                layer.grow(width)
        valid = torch.zeros((self.capacity, width), dtype=torch.bool, device=self.device)
        valid[:, :self.max_width] = self.valid
        self.valid, self.max_width = valid, width

    def _forward_kwargs(self, rows: list[int]) -> dict:
        if not self.adapters:
            return {}
        return {"adapter_names": [self.requests[r].request.adapter or "__base__" for r in rows]}

    def _constrain(self, rows: list[int], scores: torch.Tensor, last: list[int | None] | None) -> torch.Tensor:
        """The `generate` logits hook that applies each row's own hook to its scores."""
        for slot, row in enumerate(rows):
            hook = self.requests[row].request.logits_hook
            if hook is not None:
                scores[slot] = hook(scores[slot], None if last is None else last[slot])
        return scores

    def _pick(self, scores: torch.Tensor) -> torch.Tensor:
        chosen = scores.max(dim=-1).indices  # greedy rows; sampled rows are drawn below, each with its generator
        for slot, row in enumerate(self.rows):
            live = self.requests[row]
            if live.request.temperature > 0:
                chosen[slot] = _choose(scores[slot:slot + 1], live.request.temperature, live.request.top_p,
                                       live.generator)[0]
        return chosen

    def _take(self, slot: int, row: int, token: int) -> bool:
        self.last[slot] = token
        live = self.requests[row]
        if token == live.eos:
            self.finish[row] = "eos"
            return True
        self.new[row].append(token)
        if live.request.stop and _hits_stop(live.tokenizer, self.new[row], live.request.stop):
            self.finish[row] = "stop"
            return True
        if live.request.streamer is not None:
            live.request.streamer.put(torch.tensor([token]))
        return len(self.new[row]) >= live.request.max_new_tokens

    def _result(self, i: int) -> Generation:
        live, tokens, why = self.requests[i], self.new[i], self.finish[i]
        text = live.tokenizer.decode(tokens, skip_special_tokens=True)
        if why == "stop":
            text = text[:min(j for j in (text.find(s) for s in live.request.stop) if j >= 0)]
        return Generation(text=text, prompt_tokens=len(self.prompts[i]), completion_tokens=len(tokens) + (why == "eos"),
                          finish_reason="length" if why == "length" else "stop")
