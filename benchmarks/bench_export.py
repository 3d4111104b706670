"""Quality of carves written in standard MoE formats next to the best cmoe-native carve, on SmolLM2-135M.

Each row is `cmoe carve --preset quality` at one shape, in cmoe's own format (linear router with intercept,
the cmoe gating rule) or with `--format F` (the format's linear gate without intercept and its gating
rule, written as that architecture), then `cmoe eval perplexity` on the exported directory itself (loaded
by plain transformers classes). Calibration: 8 seeded windows of 2,048 tokens of wiki.valid.tokens;
evaluation: the first --eval-windows windows of 2,048 tokens of wiki.test.raw (GPTQ protocol). Every
command runs in a fresh process; rows stream to a JSON-lines log (a rerun with the same --log resumes).
Then the "Export quality (bench_export.py)" section of RESULTS.md is written.

flock /tmp/cmoe-bench.lock python benchmarks/bench_export.py [--configs S3A3E8,S1A1E8] [--formats native,qwen2-moe]
"""

import argparse
import json
import tempfile
from pathlib import Path

from common import WIKI_VALID, cli_perplexity, machine, read_log, run_cli, smollm2_gguf, write_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="S3A3E8,S1A1E8")
    parser.add_argument("--formats", default="native,qwen2-moe", help="native and/or export format names")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "cmoe-export.jsonl")
    args = parser.parse_args()
    gguf = str(smollm2_gguf())
    rows = read_log(args.log)
    done = {(row["config"], row["format"]) for row in rows}
    work = Path(tempfile.mkdtemp(prefix="cmoe-export-"))
    calibration = ["--data", str(WIKI_VALID), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    with args.log.open("a") as log:
        if ("dense", "dense") not in done:
            row = {
                "config": "dense",
                "format": "dense",
                "perplexity": cli_perplexity(gguf, args.eval_windows)["perplexity"],
            }
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
        for config in args.configs.split(","):
            for fmt in args.formats.split(","):
                if (config, fmt) in done:
                    continue
                out = work / f"{config}-{fmt}"
                extra = [] if fmt == "native" else ["--format", fmt]
                seconds, rss, _ = run_cli(
                    "carve",
                    gguf,
                    "--config",
                    config,
                    "--preset",
                    "quality",
                    *calibration,
                    "--device",
                    "cpu",
                    "-o",
                    str(out),
                    *extra,
                )
                evaluation = cli_perplexity(str(out), args.eval_windows, args.seqlen)
                row = {"config": config, "format": fmt, "perplexity": evaluation["perplexity"], "carve_wall_s": seconds}
                rows.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(json.dumps(row))
    write_section("Export quality (bench_export.py)", report(rows, args))


def report(rows: list, args) -> str:
    dense = next(row["perplexity"] for row in rows if row["format"] == "dense")
    native = {row["config"]: row["perplexity"] for row in rows if row["format"] == "native"}
    lines = [
        f"Machine: {machine()}. SmolLM2-135M fp32, `--preset quality`, calibration {args.nsamples} x {args.seqlen} "
        f"tokens of wiki.valid.tokens, perplexity on the first {args.eval_windows} x {args.seqlen} tokens of "
        f"wiki.test.raw (dense {dense:.2f}). Exported rows are evaluated on the exported directory (plain "
        "transformers classes); their carve uses the format's linear gate (no intercept) and gating rule.",
        "",
        "| config | format | perplexity | vs cmoe-native | carve wall (s) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        if row["format"] == "dense":
            continue
        base = native.get(row["config"])
        ratio = f"{row['perplexity'] / base - 1:+.1%}" if base and row["format"] != "native" else "-"
        lines.append(
            f"| {row['config']} | {row['format']} | {row['perplexity']:.2f} | {ratio} | {row['carve_wall_s']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
