"""Fine-tune SmolLM2-135M carved at S1A1E8 on a CPU and measure how much of the gap to dense it closes.

Carving: sequential, 8 seeded windows of 2,048 tokens of wiki.valid.tokens. Fine-tuning: `cmoe finetune`
on wiki.valid.tokens, --nsamples windows of --seqlen tokens (CMoE's LoRA recipe; --lr is raised above the
paper's 5.95e-5 because the run is ~60x shorter than the paper's 4M tokens). Evaluation: the first
--eval-windows windows of 2,048 tokens of wiki.test.raw (GPTQ protocol) for dense, training-free and
fine-tuned models. Every command runs as a real `cmoe` process (peak RSS per process). Writes the
"Fine-tuning SmolLM2-135M" section of RESULTS.md.

    flock /tmp/cmoe-bench.lock python benchmarks/bench_finetune.py [--nsamples 128 --seqlen 512 --lr 1e-3]
"""

import argparse
import math
import tempfile
from pathlib import Path

import cmoe

from common import (
    WIKI_VALID,
    cli_perplexity,
    dump,
    machine,
    run_cli,
    smollm2_gguf,
    write_section,
)


CONFIG = "S1A1E8"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--work", type=Path, default=None, help="Keep the models here (default: a temporary directory)."
    )
    args = parser.parse_args()
    gguf = smollm2_gguf()
    work = args.work or Path(tempfile.mkdtemp(prefix="cmoe-bench-ft-"))
    work.mkdir(parents=True, exist_ok=True)
    carved, tuned = work / CONFIG, work / f"{CONFIG}-finetuned"

    results = {"dense": cli_perplexity(str(gguf), args.eval_windows)}
    seconds, rss, _ = run_cli(
        "carve",
        str(gguf),
        "--config",
        CONFIG,
        "-o",
        str(carved),
        "--data",
        str(WIKI_VALID),
        "--nsamples",
        "8",
        "--seqlen",
        "2048",
        "--device",
        "cpu",
        "--overwrite",
    )
    results["carve"] = {"wall_s": seconds, "peak_rss_mib": rss}
    results["training_free"] = cli_perplexity(str(carved), args.eval_windows)
    seconds, rss, _ = run_cli(
        "finetune",
        str(carved),
        "--data",
        str(WIKI_VALID),
        "-o",
        str(tuned),
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--batch-size",
        str(args.batch_size),
        "--grad-accum",
        str(args.grad_accum),
        "--lr",
        str(args.lr),
        "--device",
        "cpu",
        "--overwrite",
    )
    recipe = cmoe.read_recipe(tuned)["finetune"]
    results["finetune"] = {"wall_s": seconds, "peak_rss_mib": rss, "recipe": recipe}
    results["finetuned"] = cli_perplexity(str(tuned), args.eval_windows)
    (work / "results.json").write_text(dump(results))
    print(dump({name: value for name, value in results.items() if name != "finetune"}))
    write_section("Fine-tuning SmolLM2-135M (bench_finetune.py)", report(results, args))


def gap_closed(dense: float, before: float, after: float) -> float:
    """Share of the log-perplexity gap to dense that fine-tuning removes."""
    return (math.log(before) - math.log(after)) / (math.log(before) - math.log(dense))


def imbalance(loads: list[list[float]]) -> float:
    """Mean over layers of the busiest expert's share divided by the uniform share."""
    return sum(max(layer) * len(layer) for layer in loads) / len(loads)


def report(results: dict, args) -> str:
    dense, free, tuned = (results[name]["perplexity"] for name in ("dense", "training_free", "finetuned"))
    run = results["finetune"]
    recipe = run["recipe"]
    losses = recipe["loss_curve"]
    head = sum(point["loss"] for point in losses[:5]) / min(5, len(losses))
    tail = sum(point["loss"] for point in losses[-5:]) / min(5, len(losses))
    options = recipe["options"]
    evaluated = results["dense"]
    return "\n".join(
        [
            f"Machine: {machine()}.",
            f"Model: SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32) carved {CONFIG} (sequential, calibration "
            "8 windows x 2048 tokens of wiki.valid.tokens, seed 0).",
            f"Fine-tuning: `cmoe finetune` on wiki.valid.tokens, {options['nsamples']} random windows x "
            f"{options['seqlen']} tokens, batch {options['batch_size']} x grad-accum {options['grad_accum']}, "
            f"{recipe['steps']} optimizer steps ({recipe['tokens']} tokens), one epoch, LoRA r {options['lora_r']} / "
            f"alpha {options['lora_alpha']} / dropout {options['lora_dropout']}, LR {options['lr']:g} (paper 5.95e-5 "
            f"for 4M tokens; this run is much shorter), router u LR {options['router_lr']:g}, bias speed "
            f"{options['bias_speed']:g}, seed {options['seed']}, fp32 on the CPU.",
            f"Evaluation: wiki.test.raw, first {evaluated['windows']} windows x {evaluated['seqlen']} tokens "
            f"({evaluated['tokens']} tokens), GPTQ protocol.",
            "",
            "| model | perplexity | gap to dense (ln ppl - ln dense) |",
            "|---|---|---|",
            f"| dense | {dense:.2f} | - |",
            f"| {CONFIG} training-free | {free:.2f} | {math.log(free / dense):.2f} |",
            f"| {CONFIG} fine-tuned | {tuned:.2f} | {math.log(tuned / dense):.2f} |",
            "",
            f"Fine-tuning closes {gap_closed(dense, free, tuned):.0%} of the log-perplexity gap to dense "
            f"(perplexity {free:.1f} -> {tuned:.1f}). Training loss: mean of the first 5 steps {head:.3f}, of the "
            "last 5 "
            f"{tail:.3f}.",
            f"Training speed: {recipe['tokens_per_second']:.0f} tokens/s (optimizer steps only); whole `cmoe finetune` "
            f"command {run['wall_s']:.0f} s, peak RSS {run['peak_rss_mib']:.0f} MiB (carve "
            f"{results['carve']['peak_rss_mib']:.0f} MiB, eval {results['finetuned']['peak_rss_mib']:.0f} MiB).",
            f"Routing load on the first 8 training windows, busiest expert / uniform share averaged over layers: "
            f"{imbalance(recipe['routing_load_before']):.2f} before, {imbalance(recipe['routing_load_after']):.2f} "
            "after.",
        ]
    )


if __name__ == "__main__":
    main()
