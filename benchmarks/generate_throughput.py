"""Generation throughput: calltune's batched greedy decoding against plain `model.generate`, on ViGGO.

Run (the base model answers in prose, up to --max-new-tokens every time; with a tuned model, which
stops after its ~30-token call, a full run is several times shorter):

    python benchmarks/generate_throughput.py [--model smollm2-135m-instruct] [--rows 714 --baseline-rows 64]
    python benchmarks/generate_throughput.py --model runs/viggo-full/model
    python benchmarks/generate_throughput.py --rows 32 --baseline-rows 4             # smoke run, ~1 minute

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
    parser.add_argument("--calltune-batch-size", type=int, default=384,
                        help="most rows decoding at once in calltune.infer.generate (the ViGGO recipes' eval.batch_size)")
    parser.add_argument("--repeats", type=int, default=3, help="calltune runs; the median wall time is reported")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--methods", default="calltune,plain_batched,plain_single")
    parser.add_argument("--valid", default=str(DEFAULT_VALID), help="ViGGO valid.csv")
    parser.add_argument("--out", default="runs/bench/generate_throughput.json")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - {"calltune", "plain_batched", "plain_single"})
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choices: calltune, plain_batched, plain_single")

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
    results, texts = {}, {}

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
        for name in ("plain_batched", "plain_single"):
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
        for name in ("plain_batched", "plain_single"):
            if name in results:
                lines.append(f"calltune / {name}: {results['calltune']['tokens_per_s'] / results[name]['tokens_per_s']:.2f}x "
                             "tokens/s")
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
