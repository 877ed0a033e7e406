"""Constrained decoding on and off: schema-valid rate, accuracy and tokens/s on a real eval set.

Run (the default model is the main job's tuned model; any calltune model with the hermes format works):

    python benchmarks/constrained_decoding.py [--model runs/bfcl-default/model] [--limit 40]
    python benchmarks/constrained_decoding.py --model smollm2-135m-instruct --limit 5   # smoke run

Owns the benchmark only: nothing in `calltune` imports it. Both settings run the same
`calltune.evaluate.runner.evaluate_model` on the same BFCL examples (the first ``--limit`` of each of
``--categories``, from the installed bfcl-eval), greedy, with the same batch size and token budget;
the only difference is ``EvalConfig.constrained`` (`calltune.infer.constrained`: llguidance masks every
token that would name a tool not offered or break the tool's JSON Schema). The settings alternate
``--repeats`` times; accuracy is the same each time (greedy), seconds are the median.

Reported per setting: parseable rate and schema-valid rate (over all examples: a no-call answer to
an irrelevance question counts as valid), schema-valid rate over the answers that call, function-name
and exact-call accuracy (`calltune.evaluate.toolcall_metrics`), BFCL's official AST-checker accuracy per
category (`calltune.evaluate.bfcl_checker`), generation seconds and generated tokens/s.

Writes ``--out`` (JSON, default runs/bench/constrained_decoding.json) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

ROWS = [("parseable_rate", "parseable rate"), ("schema_valid_rate", "schema-valid rate"),
        ("schema_valid_call_rate", "schema-valid rate of calling answers"),
        ("function_name_accuracy", "function name accuracy"), ("exact_call_accuracy", "exact-call accuracy")]


def main(argv: list[str] | None = None) -> dict:
    from calltune.evaluate.runner import EvalConfig, evaluate_model
    from calltune.formats import get_format
    from calltune.infer import load_for_inference
    from calltune.sources import load_source
    from calltune.sources.bfcl import NON_LIVE_EVAL

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="runs/bfcl-default/model")
    parser.add_argument("--categories", default=",".join(NON_LIVE_EVAL))
    parser.add_argument("--limit", type=int, default=40, help="first N examples of each category")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default="runs/bench/constrained_decoding.json")
    args = parser.parse_args(argv)

    examples = load_source("bfcl", args.categories, limit=args.limit)
    loaded = load_for_inference(args.model)
    fmt = loaded[2] or get_format("hermes")
    loaded = (loaded[0], loaded[1], fmt)
    results: dict[str, dict] = {}
    seconds: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for setting in ("off", "on"):
                cfg = EvalConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                 constrained=setting == "on")
                metrics = evaluate_model(args.model, examples, Path(tmp) / f"{setting}{r}", cfg, loaded=loaded)
                seconds[setting].append(metrics["eval_seconds"])
                results[setting] = metrics
    for setting, metrics in results.items():
        metrics["eval_seconds_median"] = statistics.median(seconds[setting])
        metrics["eval_seconds_all"] = seconds[setting]
        metrics["generated_tokens_per_s_median"] = round(metrics["generated_tokens"] / metrics["eval_seconds_median"], 1)
    summary = {"model": args.model, "format": fmt.name, "examples": len(examples), "categories": args.categories,
               "limit_per_category": args.limit, "batch_size": args.batch_size,
               "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")

    def cell(value) -> str:
        return "–" if value is None else f"{value:.3f}"

    off, on = results["off"], results["on"]
    lines = [f"{len(examples)} BFCL examples ({args.categories}, first {args.limit} each), model {args.model}", "",
             "| | constrained off | constrained on |", "| --- | ---: | ---: |"]
    lines += [f"| {label} | {cell(off.get(key))} | {cell(on.get(key))} |" for key, label in ROWS]
    for category in off.get("bfcl", {}).get("accuracy", {}):
        lines.append(f"| BFCL AST accuracy: {category} (n={off['bfcl']['total'][category]}) | "
                     f"{cell(off['bfcl']['accuracy'][category])} | {cell(on['bfcl']['accuracy'][category])} |")
    lines += [f"| generation seconds (median of {args.repeats}) | {off['eval_seconds_median']:.1f} | "
              f"{on['eval_seconds_median']:.1f} |",
              f"| generated tokens/s | {off['generated_tokens_per_s_median']:.1f} | "
              f"{on['generated_tokens_per_s_median']:.1f} |"]
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
