"""Expert construction methods on SmolLM2-135M at equal active FFN neurons, training-free.

S0A2E8 for every method (2 of 8 experts of 192 neurons: 384 active) and S1A1E8 (one shared + one routed: 384
active) for the methods that build a shared block, then S0A4E8 (768 active) for every method; every carve uses
the analytic router, so the rows differ only in how the neurons were grouped. Calibration: --nsamples seeded
windows of --seqlen tokens of wiki.valid.tokens (the gradient methods also run their gradient pass on them).
Evaluation: perplexity on the first --eval-windows windows of 2,048 tokens of wiki.test.raw (GPTQ protocol).
Carve time = every carving stage, gradient pass included. Rows stream to a JSON-lines log; a rerun with the
same --log resumes. Then the "Construction methods (bench_methods.py)" section of RESULTS.md is written.

flock /tmp/cmoe-bench.lock python benchmarks/bench_methods.py [--rows NAME,...] [--nsamples 8] [--seqlen 2048]
"""

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch

from bench_ablation import carve, load_windows, perplexity
from common import WIKI_TEST, dense_smollm2, machine, read_log, wiki_valid_tokens, write_section

ROWS: dict[str, tuple[str, str]] = {
    "cmoe S0A2E8": ("cmoe", "S0A2E8"),
    "random S0A2E8": ("random", "S0A2E8"),
    "clustering S0A2E8": ("clustering", "S0A2E8"),
    "sharing-inner S0A2E8": ("sharing-inner", "S0A2E8"),
    "sharing-inter S0A2E8": ("sharing-inter", "S0A2E8"),
    "cmoe S1A1E8": ("cmoe", "S1A1E8"),
    "sharing-inter S1A1E8": ("sharing-inter", "S1A1E8"),
    "cmoe S0A4E8": ("cmoe", "S0A4E8"),
    "random S0A4E8": ("random", "S0A4E8"),
    "clustering S0A4E8": ("clustering", "S0A4E8"),
    "sharing-inner S0A4E8": ("sharing-inner", "S0A4E8"),
    "sharing-inter S0A4E8": ("sharing-inter", "S0A4E8"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated names from ROWS")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "cmoe-methods.jsonl")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    from cmoe.calibration import calibration_windows
    from cmoe import mean_active_neurons

    dense, tokenizer = dense_smollm2()
    calibration = calibration_windows(wiki_valid_tokens(tokenizer), args.nsamples, args.seqlen, 0)
    evaluation = load_windows(tokenizer, WIKI_TEST, 2048, args.eval_windows)
    logged = read_log(args.log)
    with args.log.open("a") as log:
        if not any(row["row"] == "dense" for row in logged):
            logged.append({"row": "dense", "perplexity": perplexity(dense, evaluation)})
            log.write(json.dumps(logged[-1]) + "\n")
            log.flush()
        done = {row["row"] for row in logged}
        for name in [name for name in args.rows.split(",") if name not in done]:
            method, shape_name = ROWS[name]
            carved, _, seconds = carve(dense, calibration, shape_name, {"method": method})
            row = {
                "row": name,
                "method": method,
                "config": shape_name,
                "carve_s": sum(seconds.values()),
                "stages_s": seconds,
                "active_neurons": mean_active_neurons(carved.config),
                "perplexity": perplexity(carved, evaluation),
                "nsamples": args.nsamples,
                "seqlen": args.seqlen,
            }
            logged.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(json.dumps(row), flush=True)
            del carved
    order = {name: index for index, name in enumerate(["dense", *ROWS])}
    logged.sort(key=lambda row: order.get(row["row"], len(order)))
    write_section("Construction methods (bench_methods.py)", report(logged, dense.config, evaluation))


def report(rows: list, config, evaluation: torch.Tensor) -> str:
    dense = next(row for row in rows if row["row"] == "dense")["perplexity"]
    carved = [row for row in rows if row["row"] != "dense"]
    calibrations = sorted({f"{row['nsamples']} windows x {row['seqlen']} tokens" for row in carved})
    lines = [
        f"Machine: {machine()}.",
        f"Model: SmolLM2-135M-Instruct (GGUF, fp32, {config.num_hidden_layers} layers, FFN "
        f"{config.intermediate_size}); "
        "every carve sequential with the analytic router, training-free, seed 0. Calibration: "
        f"{', '.join(calibrations)} "
        f"of wiki.valid.tokens. Evaluation: wiki.test.raw, first {evaluation.shape[0]} windows x {evaluation.shape[1]} "
        f"({evaluation.numel()} tokens), GPTQ protocol. Dense perplexity {dense:.2f}. Carve time: every stage, the "
        "gradient pass of the sharing methods included.",
        "",
        "| method | config | active neurons | wiki.test.raw ppl | gap (ln ppl - ln dense) | carve (s) | of which "
        "gradient pass (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in carved:
        lines.append(
            f"| {row['method']} | {row['config']} | {row['active_neurons']:g} | "
            f"{row['perplexity']:,.{2 if row['perplexity'] < 1000 else 0}f} | "
            f"{math.log(row['perplexity'] / dense):.2f} | {row['carve_s']:.1f} | "
            f"{row['stages_s'].get('gradients', 0.0):.1f} |"
        )
    best, worst = min(carved, key=lambda row: row["perplexity"]), max(carved, key=lambda row: row["perplexity"])
    lines += [
        "",
        f"What it shows: without training, every method loses most of the model at these budgets (ln gap "
        f"{math.log(best['perplexity'] / dense):.1f} to {math.log(worst['perplexity'] / dense):.1f}); "
        f"{best['method']} {best['config']} is the least damaged, {worst['perplexity'] / best['perplexity']:.0f}x "
        "lower "
        f"perplexity than {worst['method']} {worst['config']}, and the gradient pass is what makes the sharing "
        "methods slow to carve.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
