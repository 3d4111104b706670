"""Carve SmolLM2-135M at S3A3E8 and S1A1E8 and measure quality, carve cost and MoE speed.

Calibration: 8 seeded windows of 2,048 tokens of wiki.valid.tokens. Evaluation: the first
--eval-windows windows of 2,048 tokens of wiki.test.raw (GPTQ protocol). Carve and eval run as
real `cmoe` commands in fresh processes (peak RSS per process); speed ratios are measured in this
process, dense and carved side by side. Writes the "Carving SmolLM2-135M" section of RESULTS.md.

    python benchmarks/bench_carve.py [--eval-windows 16]
"""

import argparse
import math
import tempfile
from pathlib import Path

import torch

import cmoe

from common import (
    WIKI_VALID,
    cli_perplexity,
    dump,
    machine,
    median_seconds,
    run_cli,
    smollm2_gguf,
    wiki_valid_tokens,
    write_section,
)

CONFIGS = ("S3A3E8", "S1A1E8")


def calibration_windows_of(gguf: Path, nsamples: int, seqlen: int) -> torch.Tensor:
    from cmoe.calibration import calibration_windows

    _, tokenizer = cmoe.load_pretrained(str(gguf))
    return calibration_windows(wiki_valid_tokens(tokenizer), nsamples, seqlen, 0)


@torch.no_grad()
def speed_ratios(dense, carved, window: torch.Tensor, layer: int) -> dict:
    """Carved/dense time of one FFN block (real layer input) and of a whole forward pass."""
    captured = {}
    hook = dense.model.layers[layer].mlp.register_forward_pre_hook(lambda _, args: captured.setdefault("x", args[0]))
    dense(window)
    hook.remove()
    x = captured["x"]
    dense_mlp, carved_mlp = dense.model.layers[layer].mlp, carved.model.layers[layer].mlp
    ffn_dense = median_seconds(lambda: dense_mlp(x), repeats=15, warmup=3)
    ffn_carved = median_seconds(lambda: carved_mlp(x), repeats=15, warmup=3)
    full_dense = median_seconds(lambda: dense(window), repeats=3)
    full_carved = median_seconds(lambda: carved(window), repeats=3)
    return {
        "ffn_dense_ms": 1e3 * ffn_dense,
        "ffn_carved_ms": 1e3 * ffn_carved,
        "ffn_ratio": ffn_carved / ffn_dense,
        "forward_dense_s": full_dense,
        "forward_carved_s": full_carved,
        "forward_ratio": full_carved / full_dense,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    args = parser.parse_args()
    gguf = smollm2_gguf()
    torch.set_grad_enabled(False)
    work = Path(tempfile.mkdtemp(prefix="cmoe-bench-"))
    calib = [
        "--data",
        str(WIKI_VALID),
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--device",
        "cpu",
    ]

    results = {"dense": cli_perplexity(str(gguf), args.eval_windows, args.seqlen)}
    profile = work / "dense.profile.safetensors"
    seconds, rss, _ = run_cli("profile", str(gguf), "-o", str(profile), *calib)
    results["profile"] = {"wall_s": seconds, "peak_rss_mib": rss}
    for config in CONFIGS:
        for mode, extra in (("sequential", calib), ("from-profile", ["--profile", str(profile), "--device", "cpu"])):
            out = work / f"{config}-{mode}"
            seconds, rss, _ = run_cli("carve", str(gguf), "--config", config, "-o", str(out), *extra)
            recipe = cmoe.read_recipe(out)
            results[f"{config}/{mode}"] = {
                "carve_wall_s": seconds,
                "carve_peak_rss_mib": rss,
                "timings_s": recipe["timings_s"],
                "eval": cli_perplexity(str(out), args.eval_windows, args.seqlen),
                "path": str(out),
            }

    dense, _ = cmoe.load_pretrained(str(gguf), torch.float32)
    windows = calibration_windows_of(gguf, args.nsamples, args.seqlen)
    with torch.no_grad():
        dense_calib_s = median_seconds(lambda: [dense(w[None]).logits.shape for w in windows], repeats=1, warmup=0)
    results["dense_forward_over_calibration_s"] = dense_calib_s
    for config in CONFIGS:
        carved = cmoe.load_carved(results[f"{config}/sequential"]["path"])
        results[f"{config}/speed"] = speed_ratios(
            dense, carved, windows[0][None], layer=dense.config.num_hidden_layers // 2
        )
    print(dump(results))
    write_section("Carving SmolLM2-135M (bench_carve.py)", report(results, args, dense_calib_s))


def report(results: dict, args, dense_calib_s: float) -> str:
    dense = results["dense"]
    lines = [
        f"Machine: {machine()}.",
        "Model: SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32, 30 layers, FFN 1536). Calibration: "
        f"{args.nsamples} "
        f"windows x {args.seqlen} tokens of wiki.valid.tokens, seed 0, K_a 10. Evaluation: wiki.test.raw, first "
        f"{dense['windows']} windows x {dense['seqlen']} tokens ({dense['tokens']} tokens), GPTQ protocol.",
        f"One dense forward pass over the calibration tokens: {dense_calib_s:.1f} s. `carve / dense forward` divides "
        "the "
        "carving stages (capture, profile, group, propagate) by it; loading the model and tokenising are listed but "
        "not counted.",
        "",
        "| model | mode | perplexity | gap (ln ppl - ln dense) | carve stages (s) | carve / dense forward | whole "
        "command (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|",
        f"| dense | - | {dense['perplexity']:.2f} | - | - | - | - | {dense['peak_rss_mib']:.0f} (eval) |",
    ]
    for config in CONFIGS:
        for mode in ("sequential", "from-profile"):
            row = results[f"{config}/{mode}"]
            timings = row["timings_s"]
            stages = sum(v for k, v in timings.items() if k in ("capture", "profile", "group", "propagate"))
            stage_text = ", ".join(f"{k} {v:.1f}" for k, v in timings.items() if k not in ("total",))
            gap = math.log(row["eval"]["perplexity"]) - math.log(dense["perplexity"])
            lines.append(
                f"| {config} | {mode} | {row['eval']['perplexity']:.2f} | {gap:.2f} | {stage_text} | "
                f"{stages / dense_calib_s:.2f}x | {row['carve_wall_s']:.0f} | {row['carve_peak_rss_mib']:.0f} |"
            )
    lines += [
        "",
        f"`from-profile` rows reuse one `cmoe profile` run ({results['profile']['wall_s']:.0f} s whole command, "
        f"peak RSS {results['profile']['peak_rss_mib']:.0f} MiB); their carve has no calibration pass.",
        "",
        "Speed at 2,048 tokens (batch 1, fp32, median of repeats, same process):",
        "",
        "| config | FFN block dense (ms) | FFN block carved (ms) | FFN ratio | forward dense (s) | forward carved (s) "
        "| forward ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for config in CONFIGS:
        s = results[f"{config}/speed"]
        lines.append(
            f"| {config} | {s['ffn_dense_ms']:.1f} | {s['ffn_carved_ms']:.1f} | {s['ffn_ratio']:.2f}x | "
            f"{s['forward_dense_s']:.2f} | {s['forward_carved_s']:.2f} | {s['forward_ratio']:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
