"""How `--preset quality` was chosen: candidate option sets scored on held-out wiki.valid windows only.

The calibration windows (8 x 2,048 tokens of wiki.valid.tokens, seed 0) are the ablation's (a candidate
may ask for more: the first 16 or 32 of the same seeded draw; beyond 32 the draw goes on, skipping every
window that overlaps a held-out one); the held-out windows are the last --heldout consecutive 2,048-token
windows of wiki.valid.tokens that overlap none of the first 32 calibration windows. No
evaluation text of the ablation table (wiki.test.raw, the TinyStories excerpt) is read here. The preset is
the candidate with the smallest summed log held-out
perplexity over the configurations. Carve time is measured by bench_ablation.py, not here: balanced
k-means grouping (2.3x one dense forward pass) is not a candidate because it breaks the preset's 1.3x
budget; the contribution statistic lost alone and the representative choice does nothing with the
linear router; the adaptive budget cannot be combined with the down-projection refit in one pass (the
refit needs each layer's number of active experts before the next layer is profiled, the budget
fixes it after the last layer). Rows stream to a JSON-lines log (a rerun with
the same --log resumes), then the "Preset selection (bench_preset_selection.py)" section of
RESULTS.md is written.

    python benchmarks/bench_preset_selection.py [--configs S3A3E8,S1A1E8] [--candidates NAME,...]
"""

import argparse
import json
import math
import random
import tempfile
from pathlib import Path

import torch

from bench_ablation import RECONSTRUCTION_50_STEPS, carve, perplexity
from common import dense_smollm2, machine, read_log, wiki_valid_tokens, write_section

# The candidates named "quality + ..." start from the preset's options before --refit-drift joined it.
QUALITY_BEFORE_DRIFT = {"router": "linear", "refit_down": True}
CANDIDATES: dict[str, dict] = {
    "reference": {},
    "linear router": {"router": "linear"},
    "linear router + adaptive budget": {"router": "linear", "budget": "adaptive"},
    "linear router + adaptive budget + shared by contribution": {
        "router": "linear",
        "budget": "adaptive",
        "shared_by": "contribution",
    },
    "down-projection refit": {"refit_down": True},
    "linear router + down-projection refit": {"router": "linear", "refit_down": True},
    "quality + ridge 0.3": {**QUALITY_BEFORE_DRIFT, "refit_ridge": 0.3},
    "quality + ridge 1": {**QUALITY_BEFORE_DRIFT, "refit_ridge": 1.0},
    "quality + ridge 0.3 + 32 windows": {**QUALITY_BEFORE_DRIFT, "refit_ridge": 0.3, "nsamples": 32},
    "quality + feature ridge 0.1": {**QUALITY_BEFORE_DRIFT, "refit_ridge": 0.1, "refit_ridge_scale": "feature"},
    "quality + feature ridge 0.3": {**QUALITY_BEFORE_DRIFT, "refit_ridge": 0.3, "refit_ridge_scale": "feature"},
    "quality + 32 windows": {**QUALITY_BEFORE_DRIFT, "nsamples": 32},
    "quality + drift 0.5": {**QUALITY_BEFORE_DRIFT, "refit_drift": 0.5, "nsamples": 8},
    "quality + drift 1": {**QUALITY_BEFORE_DRIFT, "refit_drift": 1.0, "nsamples": 8},
    "quality + 32 windows + drift 0.5": {**QUALITY_BEFORE_DRIFT, "refit_drift": 0.5, "nsamples": 32},
    "quality + drift 0.5 + router refit": {
        **QUALITY_BEFORE_DRIFT,
        "refit_drift": 0.5,
        "refit_router": True,
        "nsamples": 8,
    },
    "quality + 32 windows + drift 0.75": {**QUALITY_BEFORE_DRIFT, "refit_drift": 0.75, "nsamples": 32},
    "quality + 64 windows + drift 0.5": {**QUALITY_BEFORE_DRIFT, "refit_drift": 0.5, "nsamples": 64},
    "quality + 32 windows + drift 0.5 + router refit": {
        **QUALITY_BEFORE_DRIFT,
        "refit_drift": 0.5,
        "refit_router": True,
        "nsamples": 32,
    },
    "quality + 32 windows + drift 0.5 + router refit + reconstruction 100 steps at 1e-3": {
        **QUALITY_BEFORE_DRIFT,
        "refit_drift": 0.5,
        "refit_router": True,
        "nsamples": 32,
        **RECONSTRUCTION_50_STEPS,
        "reconstruct_steps": 100,
        "reconstruct_lr": 1e-3,
    },
    "quality + 32 windows + drift 0.5 + reconstruction 50 steps at 1e-3": {
        **QUALITY_BEFORE_DRIFT,
        "refit_drift": 0.5,
        "nsamples": 32,
        **RECONSTRUCTION_50_STEPS,
        "reconstruct_lr": 1e-3,
    },
    "quality + drift 0.5 + residual weighting": {
        **QUALITY_BEFORE_DRIFT,
        "refit_drift": 0.5,
        "refit_weighting": "residual",
        "nsamples": 8,
    },
    "quality + ridge 0.3 + reconstruction 50 steps": {
        **QUALITY_BEFORE_DRIFT,
        "refit_ridge": 0.3,
        **RECONSTRUCTION_50_STEPS,
    },
}
# Held-out windows overlap none of the first 32 windows of the seeded draw (a smaller draw of the same seed is
# its prefix), so that every candidate is scored on the same unseen text; a candidate that asks for more
# windows continues the draw, skipping the windows that overlap a held-out one (`calibration_draw`).
MAX_CALIBRATION_WINDOWS = 32


def heldout_starts(tokens: torch.Tensor, seqlen: int, heldout: int) -> list[int]:
    """The starts of the last `heldout` consecutive windows that overlap none of the seeded draw's first
    MAX_CALIBRATION_WINDOWS (same seed and draw as `calibration_windows`)."""
    rng = random.Random(0)
    starts = [rng.randint(0, tokens.numel() - seqlen) for _ in range(MAX_CALIBRATION_WINDOWS)]
    free = [
        index * seqlen
        for index in range(tokens.numel() // seqlen)
        if all((index + 1) * seqlen <= start or index * seqlen >= start + seqlen for start in starts)
    ]
    return free[-heldout:]


def calibration_draw(tokens: torch.Tensor, nsamples: int, seqlen: int, held: list[int]) -> torch.Tensor:
    """`nsamples` windows of the seeded draw, in its order, leaving out every window that shares a token
    position with a held-out one: up to MAX_CALIBRATION_WINDOWS none does, so smaller draws are prefixes."""
    rng = random.Random(0)
    windows = []
    while len(windows) < nsamples:
        start = rng.randint(0, tokens.numel() - seqlen)
        if all(start + seqlen <= other or start >= other + seqlen for other in held):
            windows.append(tokens[start : start + seqlen])
    return torch.stack(windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="S3A3E8,S1A1E8")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated names from CANDIDATES")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--heldout", type=int, default=8)
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "cmoe-preset-selection.jsonl")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    from cmoe.calibration import calibration_windows

    dense, tokenizer = dense_smollm2()
    tokens = wiki_valid_tokens(tokenizer)
    held = heldout_starts(tokens, args.seqlen, args.heldout)
    heldout = torch.stack([tokens[start : start + args.seqlen] for start in held])
    assert torch.equal(
        calibration_draw(tokens, MAX_CALIBRATION_WINDOWS, args.seqlen, held),
        calibration_windows(tokens, MAX_CALIBRATION_WINDOWS, args.seqlen, 0),
    )

    rows = read_log(args.log)
    with args.log.open("a") as log:
        if not any(row["candidate"] == "dense" for row in rows):
            rows.append({"config": "-", "candidate": "dense", "heldout_ppl": perplexity(dense, heldout)})
            log.write(json.dumps(rows[-1]) + "\n")
        done = {(row["config"], row["candidate"]) for row in rows}
        for shape_name in args.configs.split(","):
            for name in args.candidates.split(","):
                if (shape_name, name) in done:
                    continue
                settings = dict(CANDIDATES[name])
                calibration = calibration_draw(tokens, settings.pop("nsamples", args.nsamples), args.seqlen, held)
                carved, _, _ = carve(dense, calibration, shape_name, settings)
                rows.append(
                    {
                        "config": shape_name,
                        "candidate": name,
                        "heldout_ppl": perplexity(carved, heldout),
                        "active_experts_per_layer": [spec.top_k for spec in carved.config.layer_specs],
                    }
                )
                log.write(json.dumps(rows[-1]) + "\n")
                log.flush()
                print(json.dumps(rows[-1]), flush=True)
                del carved
    write_section("Preset selection (bench_preset_selection.py)", report(rows, args, heldout.shape[0]))


def report(rows: list, args, heldout_windows: int) -> str:
    dense = next(row["heldout_ppl"] for row in rows if row["candidate"] == "dense")
    carved = [row for row in rows if row["candidate"] != "dense"]
    configs = sorted({row["config"] for row in carved})
    scores = {
        name: sum(math.log(row["heldout_ppl"] / dense) for row in carved if row["candidate"] == name)
        for name in {row["candidate"] for row in carved}
        if {row["config"] for row in carved if row["candidate"] == name} == set(configs)
    }
    winner = min(scores, key=scores.get)
    lines = [
        f"Machine: {machine()}.",
        f"SmolLM2-135M, calibration {args.nsamples} x {args.seqlen} tokens of wiki.valid.tokens (seed 0; a candidate "
        f"that names more windows takes the first of the same draw, beyond {MAX_CALIBRATION_WINDOWS} skipping the "
        f"windows that overlap a held-out one); scored on {heldout_windows} held-out windows x "
        f"{args.seqlen} of wiki.valid.tokens that overlap none of {MAX_CALIBRATION_WINDOWS} calibration windows "
        f"(dense perplexity {dense:.2f}). Score: summed ln(ppl / dense) over {', '.join(configs)}; lowest: "
        f"**{winner}**.",
        "",
        "| config | candidate | held-out wiki.valid ppl | gap (ppl / dense - 1) | active routed experts per layer |",
        "|---|---|---|---|---|",
    ]
    for row in carved:
        per_layer = row["active_experts_per_layer"]
        layout = "uniform" if len(set(per_layer)) == 1 else " ".join(map(str, per_layer))
        lines.append(
            f"| {row['config']} | {row['candidate']} | {row['heldout_ppl']:.2f} | "
            f"{row['heldout_ppl'] / dense - 1:.2f} | {layout} |"
        )
    lines += ["", "| candidate | score |", "|---|---|"] + [
        f"| {name} | {score:.3f} |" for name, score in sorted(scores.items(), key=lambda item: item[1])
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
