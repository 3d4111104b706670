"""Ablation of the carving options on SmolLM2-135M: the faithful reference, each option alone, the preset.

Calibration: --nsamples (8) seeded windows of 2,048 tokens of wiki.valid.tokens, or the windows a variant or
its preset names (`--preset quality`: 32). The preset's options were chosen by
bench_preset_selection.py on held-out wiki.valid windows, never on the evaluation texts. Evaluation: the first
--eval-windows windows of 2,048 tokens of wiki.test.raw and every 2,048-token window of the TinyStories validation
excerpt (a second domain). Everything runs in this process (the dense model is loaded once); carve
time is the sum of the carving stages, compared with one dense forward pass over the calibration
tokens measured (after a warm-up window) in the same process. Rows stream to a JSON-lines log as they
come; a rerun with the same --log resumes, keeping the rows already measured (each row keeps the dense
forward time of its own run). Then the "Carving options (bench_ablation.py)" section of RESULTS.md
is written from every row of the log.

    python benchmarks/bench_ablation.py [--configs S3A3E8,S2A2E8,S1A1E8] [--variants NAME,...] [--eval-windows 16]
"""

import argparse
from collections import Counter
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from common import TINYSTORIES_VALID, WIKI_TEST, dense_smollm2, machine, read_log, wiki_valid_tokens, write_section

# The reconstruction setting measured (layer 12 exploration: the held-out error fell most with these).
RECONSTRUCTION_50_STEPS = {"reconstruct_steps": 50, "reconstruct_lr": 3e-4, "reconstruct_parts": "experts"}
VARIANTS: dict[str, dict] = {
    "reference (default)": {},
    "--statistic contribution": {"statistic": "contribution"},
    "--representative most-active": {"representative": "most-active"},
    "--shared-by contribution": {"shared_by": "contribution"},
    "--grouping kmeans": {"grouping": "kmeans"},
    "--router linear": {"router": "linear"},
    "--budget adaptive": {"budget": "adaptive"},
    "--refit-down": {"refit_down": True},
    "--router linear --budget adaptive": {"router": "linear", "budget": "adaptive"},
    "--preset quality": {"preset": "quality"},
    "--preset quality --refit-ridge 0.3": {"preset": "quality", "refit_ridge": 0.3},
    "--preset quality --refit-ridge 0.3 --nsamples 32": {"preset": "quality", "refit_ridge": 0.3, "nsamples": 32},
    "--preset quality --refit-ridge 0.3 --reconstruct-steps 50": {
        "preset": "quality",
        "refit_ridge": 0.3,
        **RECONSTRUCTION_50_STEPS,
    },
    "--preset quality --refit-ridge 0.1 --refit-ridge-scale feature": {
        "preset": "quality",
        "refit_ridge": 0.1,
        "refit_ridge_scale": "feature",
    },
    "--preset quality --nsamples 8": {"preset": "quality", "nsamples": 8},
    "--preset quality --budget-from (--router linear --budget adaptive)": {
        "preset": "quality",
        "budget_from": {"router": "linear", "budget": "adaptive"},
    },
    "--preset quality --nsamples 32": {"preset": "quality", "nsamples": 32},
    "--preset quality --shared-width adaptive": {"preset": "quality", "shared_width": "adaptive"},
    "--preset quality --refit-router": {"preset": "quality", "refit_router": True},
    "--preset quality --nsamples 16": {"preset": "quality", "nsamples": 16},
    **{
        f"--preset quality --refit-drift {drift:g}": {"preset": "quality", "refit_drift": drift} for drift in (0.5, 1.0)
    },
    **{
        f"--preset quality{' --refit-router' * refit_router} --reconstruct-steps {steps}"
        + (f" --reconstruct-lr {lr:g}" if lr != RECONSTRUCTION_50_STEPS["reconstruct_lr"] else ""): {
            "preset": "quality",
            "refit_router": refit_router,
            **RECONSTRUCTION_50_STEPS,
            "reconstruct_steps": steps,
            "reconstruct_lr": lr,
        }
        for refit_router, steps, lr in (
            (False, 25, 3e-4),
            (False, 50, 3e-4),
            (False, 100, 3e-4),
            (False, 400, 3e-4),
            (False, 50, 1e-3),
            (True, 100, 3e-4),
            (True, 400, 3e-4),
            (True, 100, 1e-3),
            (True, 400, 1e-3),
        )
    },
}
CARVE_STAGES = (
    "capture",
    "profile",
    "group",
    "shared_width",
    "dense_stream",
    "refit",
    "refit_router",
    "reconstruct",
    "budget",
    "propagate",
)


def load_windows(tokenizer, path: Path, seqlen: int, max_windows: int | None) -> torch.Tensor:
    from cmoe.calibration import evaluation_windows, load_text, tokenize_text

    return evaluation_windows(tokenize_text(load_text(str(path), "test").text, tokenizer), seqlen, max_windows)


def perplexity(model, windows: torch.Tensor) -> float:
    import cmoe

    return cmoe.perplexity_of(model, windows)


def carve(dense, calibration: torch.Tensor, shape_name: str, variant: dict) -> tuple:
    import cmoe

    settings = dict(variant)
    options = cmoe.CarveOptions.resolved(
        cmoe.MoEShape.parse(shape_name), settings.pop("preset", "reference"), **settings
    )
    timer = cmoe.StageTimer()
    carved = cmoe.carve_model(copy.deepcopy(dense), calibration, options, timer=timer)
    return carved, options, timer.seconds


def router_multiply_adds(options, specs, hidden_size: int) -> float:
    """Per token and layer, mean over layers: the analytic router computes 2 rows per routed expert, the
    linear one 1."""
    rows = 2 if options.router == "analytic" else 1
    return rows * sum(spec.num_experts for spec in specs) / len(specs) * hidden_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="S3A3E8,S2A2E8,S1A1E8")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "cmoe-ablation.jsonl")
    parser.add_argument("--section", default="Carving options (bench_ablation.py)", help="RESULTS.md section written")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    import cmoe
    from cmoe.calibration import calibration_windows
    from cmoe import mean_active_neurons
    from cmoe.modeling import shared_experts_per_layer

    dense, tokenizer = dense_smollm2()
    config = dense.config
    calibration_tokens = wiki_valid_tokens(tokenizer)
    calibration = calibration_windows(calibration_tokens, args.nsamples, args.seqlen, 0)
    evaluations = {
        "wiki.test.raw": load_windows(tokenizer, WIKI_TEST, args.seqlen, args.eval_windows),
        "TinyStories-valid-excerpt": load_windows(tokenizer, TINYSTORIES_VALID, args.seqlen, None),
    }
    dense(calibration[:1, :256])
    start = time.perf_counter()
    for window in calibration:
        dense(window[None])
    dense_forward_s = time.perf_counter() - start
    logged = read_log(args.log)
    dense_row = next((row for row in logged if row.get("variant") == "dense"), None)
    log = args.log.open("a")
    if dense_row is None:
        dense_row = {"variant": "dense", **{name: perplexity(dense, windows) for name, windows in evaluations.items()}}
        log.write(json.dumps(dense_row) + "\n")
        log.flush()
    rows = [{"dense_forward_s": dense_forward_s, **row} for row in logged if row.get("variant") != "dense"]
    done = {(row["config"], row["variant"]) for row in rows}
    pending = [
        (shape, name)
        for shape in args.configs.split(",")
        for name in args.variants.split(",")
        if (shape, name) not in done
    ]

    with log:
        for shape_name, variant_name in pending:
            settings = dict(VARIANTS[variant_name])
            preset_windows = cmoe.PRESETS.get(settings.get("preset", "reference")).calibration.get("nsamples")
            windows = settings.pop("nsamples", preset_windows or args.nsamples)
            variant_calibration = calibration_windows(calibration_tokens, windows, args.seqlen, 0)
            first_pass = settings.pop("budget_from", None)
            if first_pass is not None:
                first, _, first_seconds = carve(dense, variant_calibration, shape_name, first_pass)
                settings["active_per_layer"] = tuple(spec.top_k for spec in first.config.layer_specs)
                del first
            carved, options, seconds = carve(dense, variant_calibration, shape_name, settings)
            if first_pass is not None:
                seconds = dict(Counter(seconds) + Counter(first_seconds))
            carve_s = sum(seconds.get(stage, 0.0) for stage in CARVE_STAGES)
            # One dense forward over the variant's own calibration tokens: the measured one, per window.
            variant_forward_s = dense_forward_s * windows / args.nsamples
            row = {
                "config": shape_name,
                "variant": variant_name,
                "nsamples": windows,
                "carve_s": carve_s,
                "stages_s": seconds,
                "carve_over_dense_forward": carve_s / variant_forward_s,
                "dense_forward_s": dense_forward_s,
                "active_neurons": mean_active_neurons(carved.config),
                "active_experts_per_layer": [spec.top_k for spec in carved.config.layer_specs],
                "shared_experts_per_layer": shared_experts_per_layer(carved.config, options.shape.experts),
                "router_madds": router_multiply_adds(options, carved.config.layer_specs, config.hidden_size),
                "reconstruct_steps": options.reconstruct_steps,
                **{name: perplexity(carved, windows) for name, windows in evaluations.items()},
            }
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(json.dumps(row), flush=True)
            del carved
    order = {
        (shape, name): i
        for i, (shape, name) in enumerate((s, n) for s in ("S3A3E8", "S2A2E8", "S1A1E8") for n in VARIANTS)
    }
    rows.sort(key=lambda row: order.get((row["config"], row["variant"]), len(order)))
    write_section(args.section, report(dense_row, rows, args, config, evaluations))


def report(dense: dict, rows: list, args, config, evaluations: dict) -> str:
    wiki, stories = evaluations
    forward_times = ", ".join(sorted({f"{row['dense_forward_s']:.1f}" for row in rows}))
    lines = [
        f"Machine: {machine()}.",
        f"Model: SmolLM2-135M-Instruct (GGUF, fp32, {config.num_hidden_layers} layers, FFN "
        f"{config.intermediate_size}). "
        f"Calibration: {args.nsamples} windows x {args.seqlen} tokens of wiki.valid.tokens, seed 0 (or the windows "
        "the variant names, or its preset's: --preset quality 32). Evaluation: "
        f"{wiki} first "
        f"{evaluations[wiki].shape[0]} windows x {args.seqlen} ({evaluations[wiki].numel()} tokens); {stories}: all "
        f"{evaluations[stories].shape[0]} windows x {args.seqlen} ({evaluations[stories].numel()} tokens); GPTQ "
        "protocol.",
        f"Dense perplexity: {wiki} {dense[wiki]:.2f}, {stories} {dense[stories]:.2f}. One dense forward pass over the "
        f"calibration tokens: {forward_times} s (measured in each run).",
        "Gap = ppl carved / ppl dense - 1 (the issue's definition). Active neurons: FFN neurons computed per token, "
        f"mean over layers (of {config.intermediate_size}); FFN madds: multiply-adds per token per layer, mean over "
        f"layers, of the active experts (3 x {config.hidden_size} per neuron) plus the router (dense FFN: "
        f"{3 * config.hidden_size * config.intermediate_size:,}). Carve time: the sum of the stages "
        f"{' + '.join(CARVE_STAGES)}, over one dense forward pass over the same "
        "calibration tokens (a variant "
        "with --nsamples 32 against 32 windows' forward: the measured pass per window times 32). "
        "A --budget-from row carves twice (the options in brackets, then the row's with that carve's active "
        "experts per layer) and its carve time is both passes'. `--router linear --budget adaptive` was "
        "`--preset quality` before `--refit-down` existed. Every --reconstruct-steps row also passes "
        f"--reconstruct-parts {RECONSTRUCTION_50_STEPS['reconstruct_parts']} and, unless it names another, "
        f"--reconstruct-lr {RECONSTRUCTION_50_STEPS['reconstruct_lr']:g}; a row whose options end in (+ the preset's N "
        "steps) had them from `--preset quality` (at 25% active or less) at the option defaults.",
        "",
        f"| config | options | active neurons | FFN madds | {wiki} ppl | gap | {stories} ppl | gap | carve (s) | "
        "carve / dense forward |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        madds = 3 * config.hidden_size * row["active_neurons"] + row["router_madds"]
        ratio = row.get("carve_over_dense_forward")
        ratio_text = f"{ratio:.2f}x" if ratio else f"{row['carve_s'] / row['dense_forward_s']:.2f}x*"
        steps = row.get("reconstruct_steps", 0)
        from_preset = steps and "--reconstruct-steps" not in row["variant"]
        preset_steps = f" (+ the preset's {steps} steps)" if from_preset else ""
        lines.append(
            f"| {row['config']} | {row['variant']}{preset_steps} | {row['active_neurons']:g} | {madds:,.0f} | "
            f"{row[wiki]:.2f} | {row[wiki] / dense[wiki] - 1:.2f} | {row[stories]:.2f} | "
            f"{row[stories] / dense[stories] - 1:.2f} | {row['carve_s']:.1f} | {ratio_text} |"
        )
    if any(not row.get("carve_over_dense_forward") for row in rows):
        lines += [
            "",
            "\\* logged before runs recorded their own dense forward time: timed against the dense forward pass of "
            "the run that wrote this table.",
        ]

    def varies(row: dict, key: str) -> bool:
        return len(set(row.get(key, [0]))) > 1

    budgeted = [
        row for row in rows if varies(row, "active_experts_per_layer") and not varies(row, "shared_experts_per_layer")
    ]
    if budgeted:
        lines += ["", "Active routed experts per layer (layer 0 first) chosen by the adaptive budget:", ""]
        lines += [
            f"- {row['config']} {row['variant']}: {' '.join(map(str, row['active_experts_per_layer']))}"
            for row in budgeted
        ]
    widened = [row for row in rows if varies(row, "shared_experts_per_layer")]
    if widened:
        lines += [
            "",
            "Shared experts per layer (layer 0 first; active routed experts: the shape's total minus these):",
            "",
        ]
        lines += [
            f"- {row['config']} {row['variant']}: {' '.join(map(str, row['shared_experts_per_layer']))}"
            for row in widened
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
