"""Generation throughput: calltune's batched greedy decoding against plain `model.generate`, transformers'
continuous batching (`generate_batch`) and vLLM's offline engine, on ViGGO.

Run (the base model answers in prose, up to --max-new-tokens every time; with a tuned model, which
stops after its ~30-token call, a full run is several times shorter):

    python benchmarks/generate_throughput.py [--model smollm2-135m-instruct] [--rows 714 --baseline-rows 64]
    python benchmarks/generate_throughput.py --model runs/viggo-full/model
    python benchmarks/generate_throughput.py --rows 32 --baseline-rows 4             # smoke run, ~1 minute
    .venv-vllm/bin/python benchmarks/generate_throughput.py --methods calltune,generate_batch,vllm

Owns the benchmark only: nothing in `calltune` imports it. Every method decodes greedily the same
prompt token ids, ViGGO validation prompts rendered by calltune's viggo format (``fmt.prompt``:
system instruction + utterance + the generation prompt), up to ``--max-new-tokens``:

- ``calltune``: `calltune.infer.load_for_inference` and `calltune.infer.generate` as they stand (their
  docstrings say what they do to be fast: bf16 weights, continuous batching, shared-prefix and
  preallocated key/value caches, ...), up to ``--calltune-batch-size`` rows at once (default 384, the
  ViGGO recipes' ``eval.batch_size``; pass 16 to compare at the baseline's batch), on the first
  ``--rows`` rows; the median wall time of ``--repeats`` runs (default 3).
- ``plain_batched``: ``AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)`` (transformers'
  default attention, SDPA) and ``model.generate`` on batches of ``--batch-size`` (16) in file order,
  left-padded by ``tokenizer.pad``, on the first ``--rows`` rows.
- ``plain_single``: the same model, ``model.generate`` one prompt at a time, on the first
  ``--baseline-rows`` rows (it is slow); its seconds per 714 rows are EXTRAPOLATED linearly from them.
- ``generate_batch``: transformers' own continuous batching (``model.generate_batch``, paged KV cache)
  on the plain model, all ``--rows`` prompts handed over at once.
- ``vllm``: vLLM's offline engine (``vllm.LLM.generate`` on token-id prompts, bf16, greedy), through
  `calltune.infer.vllm_engine.generate_vllm`; engine start-up is reported apart as its load time.
  Needs vLLM installed (run the benchmark with the vLLM environment's Python, ``make vllm-env``);
  where it is missing the method is reported as skipped.

Counted the same way for all: generated tokens = new tokens up to and including the first
end-of-turn (eos) token, or all ``--max-new-tokens`` when none came; tokens/s = generated tokens /
wall seconds of the generation calls (model loading and a 4-token warm-up call excluded; loading is
reported apart). Agreement with calltune: the share of rows whose decoded text is identical, and
the mean common-prefix length over the mean text length; greedy outputs may differ where two tokens are nearly tied, since the methods batch and
pad differently and calltune's decode linears round bf16 sums differently.

Writes ``--out`` (JSON, default runs/bench/generate_throughput.json) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VALID = REPO.parent / "shared" / "data" / "viggo" / "valid.csv"
FULL_VALID = 714  # rows in ViGGO's validation split: "seconds per 714 rows" is one full evaluation
KEEP_RATIO = 1.5  # calltune's decoder stays only while this much faster than the faster library
METHODS = ("calltune", "plain_batched", "plain_single", "generate_batch", "vllm")


def load_plain(name: str):
    """A model folder (or a LoRA adapter, merged with PEFT) loaded the plain transformers way, in bf16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calltune.models import is_adapter, resolve_model

    path = resolve_model(name)
    if is_adapter(path):
        from peft import PeftModel

        base = json.loads(Path(path, "adapter_config.json").read_text())["base_model_name_or_path"]
        model = AutoModelForCausalLM.from_pretrained(resolve_model(base), dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


def new_tokens(row: list[int], eos: int) -> list[int]:
    """Generated ids up to and including the first eos (everything after it is padding)."""
    return row[:row.index(eos) + 1] if eos in row else row


@torch.inference_mode()
def plain_generate(model, tokenizer, prompts: list[list[int]], batch_size: int, max_new_tokens: int):
    """``model.generate`` on left-padded batches in the given order; returns (texts, generated token counts)."""
    eos = tokenizer.eos_token_id
    texts, counts = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        batch = tokenizer.pad({"input_ids": chunk}, padding=True, return_tensors="pt")
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        width = batch["input_ids"].shape[1]
        for row in out[:, width:].tolist():
            ids = new_tokens(row, eos)
            counts.append(len(ids))
            texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts, counts


def batch_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int):
    """transformers' continuous batching (``generate_batch``); returns (texts, generated token counts) in prompt order.
    Not under ``torch.inference_mode``: its decode thread updates cache tensors in place, which inference
    mode's tensors refuse outside it."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    outputs = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
    ordered = list(outputs.values())  # generate_batch returns them in input order
    assert len(ordered) == len(prompts), f"generate_batch returned {len(ordered)} of {len(prompts)} requests"
    eos = tokenizer.eos_token_id
    texts, counts = [], []
    for out in ordered:
        ids = new_tokens(list(out.generated_tokens), eos)
        counts.append(len(ids))
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts, counts


def vllm_generate(model: str, prompts: list[list[int]], max_new_tokens: int, eos: int):
    """vLLM's offline engine through calltune's wrapper: (texts, token counts, generation seconds, start-up
    seconds), or None when vLLM isn't installed. Start-up (engine build, weights, KV cache) is timed apart
    by generating one 1-token prompt first, inside the same engine."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return None
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from calltune.infer.vllm_engine import KV_CACHE_GB, model_and_adapter

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GB)
    base, adapter, _ = model_and_adapter(model)
    if adapter:
        raise SystemExit("the vllm method takes a model folder; merge the adapter first (calltune merge)")
    start = time.perf_counter()
    llm = LLM(model=base, dtype="bfloat16", seed=0, max_model_len=max(len(p) for p in prompts) + max_new_tokens)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=[eos])
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], SamplingParams(max_tokens=1), use_tqdm=False)
    load_s = time.perf_counter() - start
    outputs, secs = timed(lambda: llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                               use_tqdm=False))
    texts = [o.outputs[0].text for o in outputs]
    counts = [len(o.outputs[0].token_ids) for o in outputs]
    return texts, counts, secs, load_s


def timed(fn):
    t = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t


def method_result(rows: int, seconds: float, tokens: int, load_seconds: float, **extra) -> dict:
    per_full = seconds / rows * FULL_VALID
    return {"rows": rows, "wall_seconds": seconds, "generated_tokens": tokens, "tokens_per_s": tokens / seconds,
            "seconds_per_714_rows": per_full, "seconds_per_714_rows_extrapolated": rows != FULL_VALID,
            "load_seconds": load_seconds, **extra}


def agreement(a: list[str], b: list[str]) -> dict[str, float]:
    """Over the rows both have: the share of identical texts, and the mean length (characters) of the
    common prefix over the mean length of `a` (how far the two greedy decodings run together)."""
    n = min(len(a), len(b))
    if not n:
        return {"identical": float("nan"), "shared_prefix": float("nan")}
    prefix = 0
    for x, y in zip(a[:n], b[:n]):
        prefix += len(os.path.commonprefix([x, y]))
    return {"identical": sum(x == y for x, y in zip(a[:n], b[:n])) / n,
            "shared_prefix": prefix / max(sum(len(x) for x in a[:n]), 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias, model folder or LoRA adapter folder")
    parser.add_argument("--rows", type=int, default=FULL_VALID, help="validation rows for calltune and plain_batched")
    parser.add_argument("--baseline-rows", type=int, default=64, help="rows for the one-at-a-time baseline")
    parser.add_argument("--batch-size", type=int, default=16, help="batch of the plain batched baseline")
    parser.add_argument("--generate-batch-rows", type=int, default=None,
                        help="the first N rows only for generate_batch (default: all; on a CPU it may take long)")
    parser.add_argument("--calltune-batch-size", type=int, default=384,
                        help="most rows decoding at once in calltune.infer.generate (the ViGGO recipes' eval.batch_size)")
    parser.add_argument("--repeats", type=int, default=3, help="calltune runs; the median wall time is reported")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--methods", default="calltune,plain_batched,plain_single,generate_batch,vllm")
    parser.add_argument("--valid", default=str(DEFAULT_VALID), help="ViGGO valid.csv")
    parser.add_argument("--out", default="runs/bench/generate_throughput.json")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choices: {', '.join(METHODS)}")

    from calltune.formats import get_format, load_format
    from calltune.infer.generate import generate, load_for_inference
    from calltune.models import resolve_model
    from calltune.runtime import keep_freed_memory
    from calltune.sources import load_source

    keep_freed_memory()  # as `calltune eval` does

    path = resolve_model(args.model)
    examples = load_source("viggo", args.valid)[:args.rows]
    print(f"model {args.model} ({path}); {len(examples)} rows; {torch.get_num_threads()} threads; "
          f"load avg {os.getloadavg()[0]:.2f}", flush=True)
    results, texts, skipped = {}, {}, {}

    if "calltune" in methods:
        (model, tokenizer, fmt), load_s = timed(lambda: load_for_inference(args.model))
    else:
        from calltune.models import load_tokenizer

        model, tokenizer, fmt, load_s = None, load_tokenizer(path), load_format(path), 0.0
    fmt = fmt or get_format("viggo")  # the base model has no saved format
    prompts = [fmt.prompt(ex, tokenizer) for ex in examples]

    if model is not None:
        generate(model, tokenizer, prompts[:1], max_new_tokens=4)  # warm-up: kernel selection, allocations
        runs = []
        for _ in range(max(1, args.repeats)):
            gens, secs = timed(lambda: generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                                batch_size=args.calltune_batch_size))
            runs.append(secs)
            print(f"calltune run {len(runs)}: {secs:.1f} s", flush=True)
        secs = statistics.median(runs)
        texts["calltune"] = [g.text for g in gens]
        results["calltune"] = method_result(len(prompts), secs, sum(g.completion_tokens for g in gens), load_s,
                                            batch_size=args.calltune_batch_size, wall_seconds_runs=runs,
                                            stopped=sum(g.finish_reason == "stop" for g in gens))
        print(f"calltune: {results['calltune']['tokens_per_s']:.1f} tokens/s, {secs:.1f} s", flush=True)
        del model

    if "generate_batch" in methods:
        (plain, plain_tok), load_s = timed(lambda: load_plain(args.model))
        batch_generate(plain, plain_tok, prompts[:1], 4)  # warm-up
        subset = prompts[:args.generate_batch_rows or len(prompts)]
        (out, counts), secs = timed(lambda: batch_generate(plain, plain_tok, subset, args.max_new_tokens))
        texts["generate_batch"] = out
        results["generate_batch"] = method_result(len(subset), secs, sum(counts), load_s, batch_size="auto")
        print(f"generate_batch: {results['generate_batch']['tokens_per_s']:.1f} tokens/s, {secs:.1f} s", flush=True)
        del plain

    if "vllm" in methods:
        run = vllm_generate(args.model, prompts, args.max_new_tokens, tokenizer.eos_token_id)
        if run is None:
            skipped["vllm"] = "vLLM is not installed in this environment"
            print("vllm: skipped (not installed here)", flush=True)
        else:
            out, counts, secs, load_s = run
            texts["vllm"] = out
            results["vllm"] = method_result(len(prompts), secs, sum(counts), load_s, batch_size="auto")
            print(f"vllm: {results['vllm']['tokens_per_s']:.1f} tokens/s, {secs:.1f} s "
                  f"(engine start {load_s:.0f} s)", flush=True)

    if {"plain_batched", "plain_single"} & set(methods):
        (plain, plain_tok), load_s = timed(lambda: load_plain(args.model))
        plain_generate(plain, plain_tok, prompts[:1], 1, 4)  # warm-up
        if "plain_batched" in methods:
            (out, counts), secs = timed(lambda: plain_generate(plain, plain_tok, prompts, args.batch_size,
                                                               args.max_new_tokens))
            texts["plain_batched"] = out
            results["plain_batched"] = method_result(len(prompts), secs, sum(counts), load_s,
                                                     batch_size=args.batch_size)
            print(f"plain_batched: {results['plain_batched']['tokens_per_s']:.1f} tokens/s, {secs:.1f} s", flush=True)
        if "plain_single" in methods:
            subset = prompts[:args.baseline_rows]
            (out, counts), secs = timed(lambda: plain_generate(plain, plain_tok, subset, 1, args.max_new_tokens))
            texts["plain_single"] = out
            results["plain_single"] = method_result(len(subset), secs, sum(counts), load_s, batch_size=1)
            print(f"plain_single: {results['plain_single']['tokens_per_s']:.1f} tokens/s, {secs:.1f} s", flush=True)

    if "calltune" in texts:
        for name in ("plain_batched", "plain_single", "generate_batch", "vllm"):
            if name in texts:
                results[name]["agreement_with_calltune"] = agreement(texts["calltune"], texts[name])
    if "plain_single" in texts and "plain_batched" in texts:
        # Padding alone (batched vs one at a time, same model and kernels) already changes some outputs.
        results["plain_single"]["agreement_with_plain_batched"] = agreement(texts["plain_batched"],
                                                                            texts["plain_single"])

    lines = [f"Model {args.model}, ViGGO valid prompts, greedy, max_new_tokens {args.max_new_tokens}.", "",
             "| method | batch | rows | wall s | generated tokens | tokens/s | s per 714 rows "
             "| identical to calltune | shared prefix with calltune |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        per_full = f"{r['seconds_per_714_rows']:.0f}" + (" (extrapolated)" if r["seconds_per_714_rows_extrapolated"] else "")
        agree = r.get("agreement_with_calltune")
        agree = f"{agree['identical']:.0%} | {agree['shared_prefix']:.0%}" if agree else "- | -"
        lines.append(f"| {name} | {r['batch_size']} | {r['rows']} | {r['wall_seconds']:.1f} | {r['generated_tokens']} "
                     f"| {r['tokens_per_s']:.1f} | {per_full} | {agree} |")
    if "calltune" in results:
        lines.append("")
        for name in ("plain_batched", "plain_single", "generate_batch", "vllm"):
            if name in results:
                lines.append(f"calltune / {name}: {results['calltune']['tokens_per_s'] / results[name]['tokens_per_s']:.2f}x "
                             "tokens/s")
        libraries = [name for name in ("generate_batch", "vllm") if name in results]
        if libraries:
            best = max(libraries, key=lambda name: results[name]["tokens_per_s"])
            ratio = results["calltune"]["tokens_per_s"] / results[best]["tokens_per_s"]
            lines.append(f"calltune / the faster library ({best}): {ratio:.2f}x tokens/s; calltune's decoder "
                         f"{'stays' if ratio >= KEEP_RATIO else 'should give way'} "
                         f"(kept while >= {KEEP_RATIO}x the faster of generate_batch and vLLM)")
    for name, why in skipped.items():
        lines.append(f"{name}: skipped, {why}")
    if "vllm" in results:
        lines.append(f"vllm engine start-up (not in its wall time): {results['vllm']['load_seconds']:.0f} s")
    if "agreement_with_plain_batched" in results.get("plain_single", {}):
        a = results["plain_single"]["agreement_with_plain_batched"]
        lines.append(f"\nplain_single vs plain_batched (padding only): {a['identical']:.0%} identical, "
                     f"{a['shared_prefix']:.0%} shared prefix")
    table = "\n".join(lines)
    print()
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "model_path": path, "results": results,
                               "samples": {k: v[:3] for k, v in texts.items()}, "table_markdown": table},
                              indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
