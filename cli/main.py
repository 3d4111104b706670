"""The `cmoe` command line: parses options, shows progress, calls the library."""

import json
import logging
import os
import signal
import sys
import time
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cmoe.carving import carve as carve_from_recipe
from cmoe.carving import run_profile
from cmoe.errors import CmoeError
from cmoe.eval.perplexity import run_perplexity
from cmoe.eval.routing import run_routing_eval
from cmoe.eval.tasks import DEFAULT_TASKS, TaskOptions, parse_tasks, run_tasks
from cmoe.export import EXPORT_FORMATS, run_export
from cmoe.finetune import MIXTURES, FinetuneOptions, build_finetune_recipe
from cmoe.finetune import finetune as finetune_from_recipe
from cmoe.io.artifacts import ABANDONED
from cmoe.io.memory import release_large_blocks_on_free
from cmoe.io.push import push_artifact
from cmoe.methods import GROUPINGS, METHODS, REPRESENTATIVES, SHARED_BY
from cmoe.numerics.statistics import MARK_STATISTICS
from cmoe.numerics.reconstruction import TOKEN_WEIGHTINGS
from cmoe.numerics.refit import RIDGE_SCALES
from cmoe.pipeline.reconstruct import RECONSTRUCTED_PARTS
from cmoe.pipeline.sequential import PROPAGATIONS
from cmoe.pipeline.stages import BUDGETS, SHARED_WIDTHS
from cmoe.recipes import PRESETS, Calibration, Compute, active_experts_of, build_carve_recipe
from cmoe.registry import Registry
from cmoe.routers import GATINGS, ROUTERS
from cmoe.shape import MoEShape

app = typer.Typer(
    help="Carve a dense LLaMA-style model into a Mixture-of-Experts without training (CMoE).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
eval_app = typer.Typer(help="Evaluate dense and carved models.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

console = Console(stderr=True)


def _choices(registry: Registry, lead: str) -> str:
    """An option's help: what it chooses, then every registered name with its one-line help."""
    return f"{lead} One of {registry.help_text()}."


ModelArg = Annotated[
    str,
    typer.Argument(help="Dense model: a local Hugging Face directory, a hub id, or a .gguf file.", show_default=False),
]
DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help="Calibration text: wikitext2, c4, ptb (need the hub), a dataset (hf:OWNER/NAME[:CONFIG][@SPLIT][#COLUMN] "
        "streamed from the hub, or a local dataset directory) or a local .txt/.jsonl/.json/.parquet file.",
    ),
]
NSamplesOpt = Annotated[int, typer.Option("--nsamples", help="Number of calibration windows.")]
SeqlenOpt = Annotated[int, typer.Option("--seqlen", help="Tokens per window (at most the model's maximum positions).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for the calibration windows and everything random.")]
KaOpt = Annotated[int, typer.Option("--ka", help="K_a: neurons marked active per token when profiling.")]
CarveDataOpt = Annotated[
    Optional[str],
    typer.Option(
        "--data",
        help="Calibration text: wikitext2, c4, ptb (need the hub), a dataset (hf:OWNER/NAME[:CONFIG][@SPLIT][#COLUMN] "
        "streamed from the hub, or a local dataset directory) or a local .txt/.jsonl/.json/.parquet file (default "
        "wikitext2).",
    ),
]
CarveNSamplesOpt = Annotated[
    Optional[int],
    typer.Option(
        "--nsamples",
        help="Number of calibration windows (default 8; with --preset quality 32, measured better on held-out text).",
    ),
]
CarveSeqlenOpt = Annotated[
    Optional[int],
    typer.Option("--seqlen", help="Tokens per window, at most the model's maximum positions (default 2048)."),
]
CarveSeedOpt = Annotated[
    Optional[int], typer.Option("--seed", help="Seed for the calibration windows and everything random (default 0).")
]
CarveKaOpt = Annotated[
    Optional[int], typer.Option("--ka", help="K_a: neurons marked active per token when profiling (default 10).")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda if available), cpu or cuda.")]
DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype", help="auto (float32 on CPU, checkpoint dtype or bfloat16 on GPU), float32, bfloat16, float16."
    ),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Windows per forward batch.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace the output if it exists.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result (paths, figures, timings) as JSON on stdout.")]
RecordOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--record/--no-record",
        help="Save the result into the model's recipe and model card (default: when MODEL is a directory written "
        "by cmoe).",
        show_default=False,
    ),
]
StatisticOpt = Annotated[
    Optional[str],
    typer.Option(
        "--statistic",
        help=_choices(MARK_STATISTICS, "Per-token neuron score whose top-K_a are marked (default normalized)."),
    ),
]


def _print_version(value: bool) -> None:
    if value:
        print(f"cmoe {version('cmoe')}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks on errors (or set CMOE_DEBUG=1).")
    ] = False,
    show_version: Annotated[
        bool,
        typer.Option("--version", help="Print cmoe's version and exit.", callback=_print_version, is_eager=True),
    ] = False,
) -> None:
    """`--debug` is read by `main` from the arguments before parsing; declared here for --help."""


class _Progress:
    """Progress of a long loop, shown from its first report (so that input errors, found before any
    heavy work, print nothing but their one line): a rich bar on a terminal; otherwise (a log file, a CI
    job) one plain line per report, at most one every `every` steps, and always the last."""

    def __init__(self, columns: tuple, every: int = 1):
        self.bar = Progress(*columns, console=console) if console.is_terminal else None
        self.every = every
        self.task = None
        self.started = time.perf_counter()

    def update(self, done: int, total: int, description: str, **fields) -> None:
        if self.bar is None:
            if done % self.every == 0 or done == total:
                elapsed = time.perf_counter() - self.started
                extra = "".join(f" {value}" for value in fields.values() if isinstance(value, str))
                console.print(f"{description}{extra} ({elapsed:.0f} s)", highlight=False, soft_wrap=True, markup=False)
            return
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task(description, total=total, **fields)
        self.bar.update(self.task, completed=done, total=total, description=description, **fields)

    def stop(self) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.stop()


@contextmanager
def _layer_progress(label: str) -> Iterator:
    """Progress of a per-layer loop, labelled `LABEL layer i/N`; yields the callback."""
    progress = _Progress(
        (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
    )
    try:
        yield lambda done, total: progress.update(done, total, f"{label} layer {done}/{total}")
    finally:
        progress.stop()


def _report(as_json: bool, result: dict, line: str) -> None:
    """The command's result: one line on stderr, or with --json the whole result as JSON on stdout."""
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
    else:
        console.print(line, soft_wrap=True, markup=False, highlight=False)


def _compute(device: str, dtype: str, batch_size: int) -> Compute:
    return Compute(device=device, dtype=dtype, batch_size=batch_size)


@app.command()
def profile(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Profile file to write (.safetensors).")],
    data: DataOpt = "wikitext2",
    nsamples: NSamplesOpt = 8,
    seqlen: SeqlenOpt = 2048,
    seed: SeedOpt = 0,
    ka: KaOpt = 10,
    statistic: StatisticOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: BatchOpt = 1,
    overwrite: OverwriteOpt = False,
    gram: Annotated[
        bool,
        typer.Option(
            "--gram",
            help="Also keep the d_h x d_h contribution Gram that --grouping kmeans needs (8 d_h^2 bytes per layer: "
            "0.9 GiB at LLaMA-2-7B's width, 6.1 GiB at 70B's).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Profile neuron activations of a dense model on calibration text, one layer at a time.

    The profile holds every statistic the carving options need (the k-means Gram with --gram), so one
    profile serves many carves."""
    with _layer_progress("profile") as on_layer:
        recipe = run_profile(
            model,
            output,
            Calibration(data, nsamples, seqlen, seed),
            ka,
            _compute(device, dtype, batch_size),
            overwrite,
            on_layer,
            statistic or "normalized",
            gram,
        )
    _report(
        as_json,
        {"output": str(output), **recipe},
        f"wrote {output} ({recipe['num_layers']} layers, {recipe['calibration']['calibration_tokens']} tokens, "
        f"{recipe['timings_s']['profile']:.1f} s)",
    )


@app.command()
def carve(
    model: Annotated[
        Optional[str],
        typer.Argument(
            help="Dense model: a local Hugging Face directory, a hub id, or a .gguf file (default with --recipe: the "
            "recipe's).",
            show_default=False,
        ),
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write the carved model to.")] = ...,
    recipe_file: Annotated[
        Optional[Path],
        typer.Option(
            "--recipe",
            help="Replay a carve: its cmoe_recipe.yaml (or its directory). Options given on the command line override "
            "the file's.",
        ),
    ] = None,
    config: Annotated[
        Optional[str],
        typer.Option(
            "--config",
            help="S<shared>A<active>E<experts>, e.g. S3A3E8 (default S3A3E8 unless the three counts are given).",
        ),
    ] = None,
    shared: Annotated[
        Optional[int], typer.Option("--shared", help="Shared (always-on) experts N_s, instead of --config.")
    ] = None,
    active: Annotated[
        Optional[int], typer.Option("--active", help="Routed experts selected per token N_k, instead of --config.")
    ] = None,
    experts: Annotated[Optional[int], typer.Option("--experts", help="Total experts N, instead of --config.")] = None,
    profile_file: Annotated[
        Optional[Path],
        typer.Option(
            "--profile",
            help="Reuse a profile of the dense model (`cmoe profile`) instead of sequential calibration: faster, "
            "slightly worse.",
        ),
    ] = None,
    data: CarveDataOpt = None,
    nsamples: CarveNSamplesOpt = None,
    seqlen: CarveSeqlenOpt = None,
    seed: CarveSeedOpt = None,
    ka: CarveKaOpt = None,
    preset: Annotated[
        Optional[str],
        typer.Option(
            "--preset",
            help=_choices(
                PRESETS, "A measured set of options (default reference); options given explicitly override it."
            ),
        ),
    ] = None,
    statistic: StatisticOpt = None,
    shared_by: Annotated[
        Optional[str],
        typer.Option("--shared-by", help=_choices(SHARED_BY, "Which neurons form the shared experts (default rate).")),
    ] = None,
    grouping: Annotated[
        Optional[str],
        typer.Option(
            "--grouping",
            help=_choices(GROUPINGS, "How the other neurons are grouped into routed experts (default hamming)."),
        ),
    ] = None,
    kmeans_iterations: Annotated[
        Optional[int],
        typer.Option(
            "--kmeans-iterations",
            help="Refinement passes of --grouping kmeans and --method clustering (0: one assignment to the seeds; "
            "default 5).",
        ),
    ] = None,
    representative: Annotated[
        Optional[str],
        typer.Option(
            "--representative",
            help=_choices(REPRESENTATIVES, "The analytic router's neuron per expert (default centroid)."),
        ),
    ] = None,
    router: Annotated[
        Optional[str],
        typer.Option("--router", help=_choices(ROUTERS, "How tokens pick their experts (default analytic).")),
    ] = None,
    method: Annotated[
        Optional[str],
        typer.Option(
            "--method",
            help=_choices(
                METHODS, "Expert construction (default cmoe); only cmoe and sharing-inter build shared experts."
            ),
        ),
    ] = None,
    rescale: Annotated[
        Optional[bool],
        typer.Option(
            "--rescale/--no-rescale",
            help="Scale the selected experts' outputs by n/k (LLaMA-MoE), folded into their down_proj (default off).",
        ),
    ] = None,
    budget: Annotated[
        Optional[str],
        typer.Option(
            "--budget",
            help=_choices(BUDGETS, "Active experts per layer (default uniform); adaptive is not with --refit-down."),
        ),
    ] = None,
    budget_from: Annotated[
        Optional[Path],
        typer.Option(
            "--budget-from",
            help="Give each layer the number of active experts an earlier carve chose (its directory or recipe "
            "file; e.g. one with --budget adaptive), so the refit fits each layer for it: a two-pass adaptive "
            "budget (--budget uniform only; no --format).",
        ),
    ] = None,
    shared_width: Annotated[
        Optional[str],
        typer.Option(
            "--shared-width",
            help=_choices(
                SHARED_WIDTHS,
                "Shared experts per layer (default uniform); adaptive scores each layer's candidates on the "
                "calibration tokens (--budget uniform only; no --format).",
            ),
        ),
    ] = None,
    refit_down: Annotated[
        Optional[bool],
        typer.Option(
            "--refit-down/--no-refit-down",
            help="Refit every layer's down projections by least squares to the dense outputs on the calibration "
            "tokens, routing fixed (closed form, no inference cost; sequential carving and --budget uniform only).",
        ),
    ] = None,
    refit_ridge: Annotated[
        Optional[float],
        typer.Option(
            "--refit-ridge",
            help="Strength of --refit-down's pull towards the carved weights, times the mean feature energy "
            "(default 0.01).",
        ),
    ] = None,
    refit_ridge_scale: Annotated[
        Optional[str],
        typer.Option(
            "--refit-ridge-scale",
            help=_choices(RIDGE_SCALES, "Which feature energy --refit-ridge multiplies (default mean)."),
        ),
    ] = None,
    refit_weighting: Annotated[
        Optional[str],
        typer.Option(
            "--refit-weighting",
            help=_choices(TOKEN_WEIGHTINGS, "How --refit-down weighs each token's squared error (default uniform)."),
        ),
    ] = None,
    refit_drift: Annotated[
        Optional[float],
        typer.Option(
            "--refit-drift",
            help="How much of the carved stream's drift from the dense model's the refit and the reconstruction "
            "correct, 0 to 1: 0 fits each block to the dense FFN on its carved inputs (default), 1 to the dense "
            "model's layer output (the dense stream runs beside the carved one: one more layer pass per layer); with "
            "--refit-down or --reconstruct-steps (default 0; --preset quality 0.5).",
        ),
    ] = None,
    refit_router: Annotated[
        Optional[bool],
        typer.Option(
            "--refit-router/--no-refit-router",
            help="After --refit-down, fit the linear router to what each refitted expert removes from the layer's "
            "error on each calibration token, then refit the down projections for the new routing; a layer keeps "
            "whichever fit has the lower calibration error (--router linear or linear-gate; default off).",
        ),
    ] = None,
    reconstruct_steps: Annotated[
        Optional[int],
        typer.Option(
            "--reconstruct-steps",
            help="Optimiser steps per layer that train its MoE block towards the dense FFN's outputs on the "
            "calibration tokens, after the refit (0: off, the default; --preset quality: 50 where the shape keeps at "
            "most 25% of the FFN active; sequential carving and --budget uniform only).",
        ),
    ] = None,
    reconstruct_lr: Annotated[
        Optional[float], typer.Option("--reconstruct-lr", help="Adam learning rate of --reconstruct-steps (1e-3).")
    ] = None,
    reconstruct_tokens: Annotated[
        Optional[int],
        typer.Option("--reconstruct-tokens", help="Calibration tokens per reconstruction step, drawn seeded (1024)."),
    ] = None,
    reconstruct_parts: Annotated[
        Optional[str],
        typer.Option(
            "--reconstruct-parts",
            help=_choices(RECONSTRUCTED_PARTS, "What --reconstruct-steps trains (default experts)."),
        ),
    ] = None,
    reconstruct_weighting: Annotated[
        Optional[str],
        typer.Option(
            "--reconstruct-weighting",
            help=_choices(TOKEN_WEIGHTINGS, "How the reconstruction weighs calibration tokens (default uniform)."),
        ),
    ] = None,
    gating: Annotated[
        Optional[str],
        typer.Option("--gating", help=_choices(GATINGS, "How the selected experts are weighted (default cmoe).")),
    ] = None,
    flat_gate: Annotated[
        Optional[bool],
        typer.Option(
            "--flat-gate/--no-flat-gate",
            help="Under a renormalising --gating, weight every selected expert about 1 (as the cmoe rule does): "
            "the linear router's logits scaled down, the routed experts' outputs up by k (default on with "
            "--format, else off).",
        ),
    ] = None,
    propagate: Annotated[
        Optional[str],
        typer.Option(
            "--propagate",
            help=_choices(PROPAGATIONS, "What each layer is profiled on (default carved)."),
        ),
    ] = None,
    device: Annotated[
        Optional[str], typer.Option("--device", help="auto (cuda if available), cpu or cuda (default auto).")
    ] = None,
    dtype: Annotated[
        Optional[str],
        typer.Option(
            "--dtype",
            help="auto (float32 on CPU, checkpoint dtype or bfloat16 on GPU), float32, bfloat16, float16 (default "
            "auto).",
        ),
    ] = None,
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", help="Windows per forward batch (default 1).")
    ] = None,
    export_format: Annotated[
        Optional[str],
        typer.Option(
            "--format",
            help=_choices(
                EXPORT_FORMATS,
                "Write a standard MoE checkpoint instead of cmoe's format, carving with the router and gating rule "
                "it holds (linear-gate, its rule) unless given.",
            ),
        ),
    ] = None,
    overwrite: OverwriteOpt = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue a carve of the same -o that was killed or interrupted: the layers it finished are "
            "kept (same options and data required); the result has the bytes of an uninterrupted carve.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Carve a dense model into a Mixture-of-Experts (shared + routed experts, training-free router)."""
    shape = _shape(config, shared, active, experts)
    options = {
        "ka": ka,
        "method": method,
        "seed": seed,
        "rescale": rescale,
        "statistic": statistic,
        "shared_by": shared_by,
        "grouping": grouping,
        "kmeans_iterations": kmeans_iterations,
        "representative": representative,
        "router": router,
        "budget": budget,
        "active_per_layer": None if budget_from is None else active_experts_of(budget_from),
        "shared_width": shared_width,
        "refit_down": refit_down,
        "refit_ridge": refit_ridge,
        "refit_ridge_scale": refit_ridge_scale,
        "refit_weighting": refit_weighting,
        "refit_drift": refit_drift,
        "refit_router": refit_router,
        "propagate": propagate,
        "gating": gating,
        "flat_gate": flat_gate,
        "reconstruct_steps": reconstruct_steps,
        "reconstruct_lr": reconstruct_lr,
        "reconstruct_tokens": reconstruct_tokens,
        "reconstruct_parts": reconstruct_parts,
        "reconstruct_weighting": reconstruct_weighting,
    }
    calibration = {"source": data, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    compute = {"device": device, "dtype": dtype, "batch_size": batch_size}
    recipe = build_carve_recipe(
        model, recipe_file, shape, preset, profile_file, options, calibration, compute, export_format
    )
    name = recipe.options.shape.name
    with _layer_progress(f"carve {name}") as on_layer:
        record = carve_from_recipe(recipe, output, overwrite, on_layer, resume)
    note = (
        f"; {record['leftover_neurons_in_shared']} leftover neurons joined the shared expert"
        if "leftover_neurons_in_shared" in record
        else ""
    )
    _report(
        as_json,
        {"output": str(output), **record},
        f"wrote {output} ({name}, {record['timings_s']['total']:.1f} s{note})",
    )


def _shape(config, shared, active, experts):
    """The --config or the three counts, or None when neither is given."""
    counts = (shared, active, experts)
    if config is not None and any(count is not None for count in counts):
        raise CmoeError("give either --config or --shared/--active/--experts, not both")
    if config is None and any(count is not None for count in counts):
        if any(count is None for count in counts):
            raise CmoeError("--shared, --active and --experts must be given together")
        return MoEShape(shared, active, experts).validated()
    if config is None:
        return None
    shape = MoEShape.parse(config)
    if config != shape.name:
        console.print(f"note: read --config {config} as {shape.name}", highlight=False)
    return shape


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="Carved model directory (from `cmoe carve`).", show_default=False)],
    export_format: Annotated[
        str, typer.Option("--format", help=_choices(EXPORT_FORMATS, "The standard MoE architecture to write."))
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write the exported model to.")],
    dtype: Annotated[
        str, typer.Option("--dtype", help="auto (the carved model's), float32, bfloat16 or float16.")
    ] = "auto",
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Export a carved model to a standard MoE architecture that transformers, vLLM, SGLang and llama.cpp load."""
    with _layer_progress(f"export {export_format}") as on_layer:
        record = run_export(model, export_format, output, dtype, overwrite, on_layer)
    _report(
        as_json,
        {"output": str(output), **record},
        f"wrote {output} ({record['export']['model_type']}, {record['export']['dtype']})",
    )


@app.command()
def push(
    directory: Annotated[
        Path,
        typer.Argument(help="Finished model directory from cmoe carve, export or finetune.", show_default=False),
    ],
    repo_id: Annotated[
        str, typer.Argument(help="Hub model repository, OWNER/NAME (created if missing).", show_default=False)
    ],
    private: Annotated[
        bool, typer.Option("--private", help="Create the repository private (an existing one keeps its visibility).")
    ] = False,
    revision: Annotated[
        Optional[str], typer.Option("--revision", help="Branch to upload to, created if missing (default main).")
    ] = None,
    commit_message: Annotated[
        Optional[str], typer.Option("--commit-message", help="The commit's message (default: Upload NAME (cmoe)).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a finished model to the Hugging Face hub with its recipe and model card (log in first: hf auth login)."""
    result = push_artifact(directory, repo_id, private, revision, commit_message)
    _report(as_json, result, f"pushed {directory} to {result['url']} ({result['revision']}, commit {result['commit']})")


@eval_app.command()
def perplexity(
    model: Annotated[
        str, typer.Argument(help="Dense or carved model: a directory, a hub id, or a .gguf file.", show_default=False)
    ],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="Evaluation text: wikitext2, c4, ptb (need the hub), hf:OWNER/NAME[:CONFIG][@SPLIT][#COLUMN] or a "
            "local dataset directory (streamed; at most 256 windows unless --max-windows), or a local file.",
        ),
    ] = "wikitext2",
    seqlen: SeqlenOpt = 2048,
    max_windows: Annotated[
        Optional[int], typer.Option("--max-windows", help="Evaluate only the first N windows (quick runs).")
    ] = None,
    split: Annotated[str, typer.Option("--split", help="Split of a named source: test, validation or train.")] = "test",
    record: RecordOpt = None,
    as_json: JsonOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: BatchOpt = 1,
) -> None:
    """Perplexity under the GPTQ protocol (non-overlapping windows, text tokenised once)."""
    compute = _compute(device, dtype, batch_size)
    with _layer_progress("eval") as on_layer:
        result = run_perplexity(model, data, seqlen, max_windows, split, compute, on_layer, record)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
    else:
        recorded = f"; recorded in {result.recorded_in}" if result.recorded_in else ""
        typer.echo(
            f"perplexity {result.perplexity:.4f} (seqlen {result.seqlen}, {result.windows} windows, {result.tokens} "
            f"tokens){recorded}"
        )


@eval_app.command()
def routing(
    model: Annotated[str, typer.Argument(help="Carved model directory (from `cmoe carve`).", show_default=False)],
    data: Annotated[
        list[str],
        typer.Option(
            "--data",
            help="A data source as NAME=SOURCE, repeatable (e.g. --data wiki=wikitext2 --data stories=stories.txt).",
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write the PNGs and routing.json to.")],
    layer: Annotated[
        Optional[int],
        typer.Option(
            "--layer",
            help="Layer of the distance matrix and the per-source load figure (default: the last carved layer).",
        ),
    ] = None,
    seqlen: SeqlenOpt = 2048,
    max_windows: Annotated[
        Optional[int], typer.Option("--max-windows", help="Windows per source (first N, GPTQ protocol).")
    ] = 8,
    split: Annotated[str, typer.Option("--split", help="Split of a named source: test, validation or train.")] = "test",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: BatchOpt = 1,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Expert load per layer and data source, balance figures, heatmaps and routing distances (LLaMA-MoE figs 4, 5)."""
    with _layer_progress("routing") as on_layer:
        report = run_routing_eval(
            model, data, output, layer, seqlen, max_windows, split, device, dtype, batch_size, overwrite, on_layer
        )
    _report(
        as_json,
        {"output": str(output), **report},
        f"wrote {output} ({len(report['sources'])} sources, {len(report['layers'])} layers, distances at layer "
        f"{report['distance_layer']})",
    )


@eval_app.command()
def tasks(
    model: Annotated[
        str,
        typer.Argument(
            help="Dense, carved or exported model: a directory, a hub id, or a .gguf file.", show_default=False
        ),
    ],
    task_names: Annotated[
        str,
        typer.Option(
            "--tasks",
            help="Comma-separated lm-eval task names (default: the papers' zero-shot suite; lm-eval downloads their "
            "data, or use --include-path with local tasks).",
        ),
    ] = ",".join(DEFAULT_TASKS),
    limit: Annotated[
        Optional[float],
        typer.Option(
            "--limit", help="Examples per task: a count (1 or more) or a fraction in (0, 1); quick runs only."
        ),
    ] = None,
    num_fewshot: Annotated[
        Optional[int], typer.Option("--num-fewshot", help="Few-shot examples per prompt (default: each task's own).")
    ] = None,
    include_path: Annotated[
        Optional[Path], typer.Option("--include-path", help="A folder of local lm-eval task YAMLs, as lm-eval's.")
    ] = None,
    record: RecordOpt = None,
    as_json: JsonOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: BatchOpt = 1,
) -> None:
    """Downstream accuracy with lm-evaluation-harness (pip install "cmoe[eval]"), no remote code needed."""
    options = TaskOptions(parse_tasks(task_names), limit, num_fewshot, include_path)
    result = run_tasks(model, options, _compute(device, dtype, batch_size), record)
    lines = [
        f"{name}: " + ", ".join(f"{metric} {value:.4f}" for metric, value in task["metrics"].items())
        for name, task in result["tasks"].items()
    ]
    _report(as_json, result, "\n".join(lines))


@contextmanager
def _training_progress() -> Iterator:
    """Progress over optimizer steps with loss, tokens/s and ETA (plain lines every 10 steps off a terminal)."""
    columns = (
        TextColumn("finetune"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[losses]}"),
        TextColumn("{task.fields[speed]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    progress = _Progress(columns, every=10)

    def on_step(report) -> None:
        losses = f"loss {report.loss:.4f}" + (
            "" if report.balance_loss is None else f" balance {report.balance_loss:.4f}"
        )
        losses += "" if report.distill_loss is None else f" distill {report.distill_loss:.4f}"
        speed = f"{report.tokens_per_second:.0f} tok/s"
        progress.update(
            report.step, report.total, f"finetune step {report.step}/{report.total}", losses=losses, speed=speed
        )

    try:
        yield on_step
    finally:
        progress.stop()


FINETUNE_DEFAULTS = FinetuneOptions()


@app.command()
def finetune(
    model: Annotated[
        Optional[str],
        typer.Argument(
            help="Carved model directory (from `cmoe carve`; default with --recipe: the recipe's).", show_default=False
        ),
    ] = None,
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Directory to write the fine-tuned carved model to; checkpoints go to OUT.checkpoints/.",
        ),
    ] = ...,
    recipe_file: Annotated[
        Optional[Path],
        typer.Option(
            "--recipe",
            help="Replay a fine-tuning: its cmoe_recipe.yaml (or the fine-tuned model's directory). "
            "Options given on the command line override the file's.",
        ),
    ] = None,
    data: Annotated[
        Optional[list[str]],
        typer.Option(
            "--data",
            help="Training text, repeatable for a mixture: SOURCE or SOURCE:WEIGHT (e.g. a.jsonl:0.7 --data "
            "b.txt:0.3; weight 1 by default). Required unless --recipe gives it; replaces the recipe's list.",
        ),
    ] = None,
    mixture: Annotated[
        Optional[str],
        typer.Option(
            "--mixture",
            help=_choices(MIXTURES, f"How the --data domains are weighted (default {FINETUNE_DEFAULTS.mixture})."),
        ),
    ] = None,
    mixture_every: Annotated[
        Optional[int],
        typer.Option(
            "--mixture-every",
            help=f"Steps between dynamic mixture updates (default {FINETUNE_DEFAULTS.mixture_every}).",
        ),
    ] = None,
    reference: Annotated[
        Optional[str],
        typer.Option(
            "--reference",
            help="Dense model for --mixture dynamic and --distill's teacher (default: the carved model's source "
            "when it is a local path).",
        ),
    ] = None,
    heldout_windows: Annotated[
        Optional[int],
        typer.Option(
            "--heldout-windows",
            help="Windows at the end of each --data source held out of training to measure the dynamic "
            f"mixture's losses (default {FINETUNE_DEFAULTS.heldout_windows}).",
        ),
    ] = None,
    full: Annotated[
        Optional[bool],
        typer.Option("--full/--lora", help="Train every weight (--full) or LoRA adapters (--lora, the default)."),
    ] = None,
    train_router: Annotated[
        Optional[bool],
        typer.Option(
            "--train-router/--freeze-router",
            help="Train the routers: scales u, and a noisy-topk gate's weights (own learning "
            "rate --router-lr; default --train-router).",
        ),
    ] = None,
    lr: Annotated[
        Optional[float],
        typer.Option(
            "--lr",
            help="Learning rate of the LoRA adapters (or of every weight with --full; default "
            f"{FINETUNE_DEFAULTS.lr:g}, the CMoE paper's).",
        ),
    ] = None,
    router_lr: Annotated[
        Optional[float],
        typer.Option(
            "--router-lr",
            help="Learning rate of the router parameters (scales u; noisy-topk gate and noise weights; default "
            f"{FINETUNE_DEFAULTS.router_lr:g}).",
        ),
    ] = None,
    bias_speed: Annotated[
        Optional[float],
        typer.Option(
            "--bias-speed",
            help="Step of the sign-rule update of the balancing bias b after each optimizer step (0: frozen; "
            f"default {FINETUNE_DEFAULTS.bias_speed:g}).",
        ),
    ] = None,
    balance_coef: Annotated[
        Optional[float],
        typer.Option(
            "--balance-coef",
            help="Weight of the balance loss of routers that define one (e.g. noisy top-k); others add "
            f"nothing (default {FINETUNE_DEFAULTS.balance_coef:g}).",
        ),
    ] = None,
    distill: Annotated[
        Optional[float],
        typer.Option(
            "--distill",
            help="Weight W in [0, 1] of distillation from the dense model (--reference): the loss is (1 - W) x LM "
            f"loss + W x KL(teacher || student) per token (default {FINETUNE_DEFAULTS.distill:g}: LM loss only).",
        ),
    ] = None,
    distill_temperature: Annotated[
        Optional[float],
        typer.Option(
            "--distill-temperature",
            help="Temperature T of --distill: both logits divided by T, the KL multiplied by T^2 (default "
            f"{FINETUNE_DEFAULTS.distill_temperature:g}).",
        ),
    ] = None,
    lora_r: Annotated[
        Optional[int], typer.Option("--lora-r", help=f"LoRA rank (default {FINETUNE_DEFAULTS.lora_r}).")
    ] = None,
    lora_alpha: Annotated[
        Optional[int], typer.Option("--lora-alpha", help=f"LoRA alpha (default {FINETUNE_DEFAULTS.lora_alpha}).")
    ] = None,
    lora_dropout: Annotated[
        Optional[float],
        typer.Option("--lora-dropout", help=f"LoRA dropout (default {FINETUNE_DEFAULTS.lora_dropout:g})."),
    ] = None,
    epochs: Annotated[
        Optional[int],
        typer.Option("--epochs", help=f"Passes over the --nsamples windows (default {FINETUNE_DEFAULTS.epochs})."),
    ] = None,
    max_steps: Annotated[
        Optional[int],
        typer.Option(
            "--max-steps",
            help="Stop after this many optimizer steps, keeping a checkpoint for --resume (default: run the "
            "whole schedule).",
        ),
    ] = None,
    batch_size: Annotated[
        Optional[int],
        typer.Option(
            "--batch-size", help=f"Windows per micro-batch, per process (default {FINETUNE_DEFAULTS.batch_size})."
        ),
    ] = None,
    grad_accum: Annotated[
        Optional[int],
        typer.Option(
            "--grad-accum", help=f"Micro-batches per optimizer step (default {FINETUNE_DEFAULTS.grad_accum})."
        ),
    ] = None,
    grad_checkpointing: Annotated[
        Optional[bool],
        typer.Option(
            "--grad-checkpointing/--no-grad-checkpointing",
            help="Recompute activations in the backward pass to save memory (default off).",
        ),
    ] = None,
    eval_data: Annotated[
        Optional[str],
        typer.Option(
            "--eval-data",
            help="Held-out text for perplexity at the start, every --eval-every steps and at the end (default: none).",
        ),
    ] = None,
    eval_every: Annotated[
        Optional[int],
        typer.Option(
            "--eval-every",
            help="Steps between evaluations on --eval-data (0: start and end only; default "
            f"{FINETUNE_DEFAULTS.eval_every}).",
        ),
    ] = None,
    eval_windows: Annotated[
        Optional[int],
        typer.Option(
            "--eval-windows",
            help="Windows of --eval-data evaluated (GPTQ protocol, first N; default "
            f"{FINETUNE_DEFAULTS.eval_windows}).",
        ),
    ] = None,
    checkpoint_every: Annotated[
        Optional[int],
        typer.Option(
            "--checkpoint-every",
            help="Steps between checkpoints (0: only when stopped by --max-steps; default "
            f"{FINETUNE_DEFAULTS.checkpoint_every}).",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue from the last checkpoint in OUT.checkpoints/ with the same options (default: start afresh).",
        ),
    ] = False,
    nsamples: Annotated[
        Optional[int],
        typer.Option("--nsamples", help=f"Training windows per epoch (default {FINETUNE_DEFAULTS.nsamples})."),
    ] = None,
    seqlen: Annotated[
        Optional[int],
        typer.Option("--seqlen", help=f"Tokens per training window (default {FINETUNE_DEFAULTS.seqlen})."),
    ] = None,
    seed: Annotated[
        Optional[int],
        typer.Option(
            "--seed",
            help=f"Seed for the windows, the adapters and everything random (default {FINETUNE_DEFAULTS.seed}).",
        ),
    ] = None,
    device: Annotated[
        Optional[str], typer.Option("--device", help="auto (cuda if available), cpu or cuda (default auto).")
    ] = None,
    dtype: Annotated[
        Optional[str],
        typer.Option(
            "--dtype",
            help="auto (float32 on CPU, checkpoint dtype or bfloat16 on GPU), float32, bfloat16, float16 (default "
            "auto).",
        ),
    ] = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Recovery fine-tuning of a carved model (CMoE's LoRA recipe; LLaMA-MoE's static or dynamic data mixtures)."""
    options = {
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "epochs": epochs,
        "max_steps": max_steps,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "lr": lr,
        "router_lr": router_lr,
        "full": full,
        "lora_r": lora_r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "train_router": train_router,
        "bias_speed": bias_speed,
        "balance_coef": balance_coef,
        "distill": distill,
        "distill_temperature": distill_temperature,
        "grad_checkpointing": grad_checkpointing,
        "mixture": mixture,
        "mixture_every": mixture_every,
        "heldout_windows": heldout_windows,
        "eval_every": eval_every,
        "eval_windows": eval_windows,
        "checkpoint_every": checkpoint_every,
    }
    recipe = build_finetune_recipe(model, recipe_file, options, data, eval_data, reference, device, dtype)
    with _training_progress() as on_step:
        record = finetune_from_recipe(recipe, output, overwrite, resume, on_step)
    if record is None:  # not the main process of an `accelerate launch` run: that one reports
        return
    summary = record["finetune"]
    curve = summary["eval_curve"]
    quality = f", perplexity {curve[0]['perplexity']:.2f} -> {curve[-1]['perplexity']:.2f}" if len(curve) > 1 else ""
    _report(
        as_json,
        {"output": str(output), **record},
        f"wrote {output} ({summary['steps']} steps, {summary['tokens']} tokens, "
        f"{summary['tokens_per_second'] or 0:.0f} tok/s{quality})",
    )


class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised in the main thread (not a KeyboardInterrupt, which the CLI framework
    would turn into a silent exit code)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum: int, frame) -> None:
    """First signal: unwind (temporary outputs are removed on the way). A second one ends at once."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Interrupted(signum)


# Typer vendors click: its exceptions are not the installed click's. Found through a public class.
_CLICK_ERROR = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException")
_USAGE_ERROR = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "UsageError")


def main(argv: list[str] | None = None) -> None:
    """Entry point. Bad input: one line, exit 2 (usage errors add the usage line). Ctrl-C / SIGTERM:
    one line saying what was kept, exit 130 / 143. Anything else: one line, exit 1. Tracebacks only with
    --debug or CMOE_DEBUG=1."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("CMOE_DEBUG", "") not in ("", "0")
    previous = {signum: signal.signal(signum, _on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    release_large_blocks_on_free()
    ABANDONED.clear()  # what this command abandoned (in-process callers run many commands)
    try:
        _quiet_libraries()
        code = app(args=args, prog_name="cmoe", standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except Interrupted as interrupt:
        _interrupted(interrupt.signum)
    except CmoeError as error:
        if debug:
            raise
        _fail(str(error), 2)
    except _USAGE_ERROR as error:
        if type(error).__name__ == "NoArgsIsHelpError":  # `cmoe` or `cmoe eval` alone: the help was shown
            if error.format_message().strip():
                console.print(error.format_message(), highlight=False, soft_wrap=True, markup=False)
            sys.exit(2)
        if error.ctx is not None:
            console.print(error.ctx.get_usage(), highlight=False, soft_wrap=True, markup=False)
        _fail(f"{error.format_message()} (see cmoe --help)", 2)
    except _CLICK_ERROR as error:
        _fail(f"{error.format_message()} (see cmoe --help)", 2)
    except Exception as error:  # the CLI's last line of defence: one line, never a traceback by default
        if debug:
            raise
        _fail(f"{type(error).__name__}: {error} (rerun with --debug for the traceback)", 1)
    finally:
        # Done (or failing): a late Ctrl-C must not interrupt the interpreter's exit with a traceback;
        # SIGTERM keeps its default, so a supervisor can still stop a process that hangs on exit.
        for signum, handler in previous.items():
            if argv is None and signum == signal.SIGINT:
                signal.signal(signum, signal.SIG_IGN)
            elif handler is not None:
                signal.signal(signum, handler)


def _interrupted(signum: int) -> None:
    kept = [f"{path}: {note}" for path, note in ABANDONED if note]
    lost = [str(path) for path, note in ABANDONED if not note]
    what = "; ".join([*kept, *(f"nothing was written to {path}" for path in lost)]) or "nothing was written"
    console.print(f"interrupted; {what}", highlight=False, soft_wrap=True, markup=False)
    sys.exit(128 + signum)


class _NoteHandler(logging.Handler):
    """cmoe's own notices (e.g. a stale partial output removed): one line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        console.print(f"note: {record.getMessage()}", highlight=False, soft_wrap=True, markup=False)


def _quiet_libraries() -> None:
    """Our own progress bars and one-line errors replace the libraries' bars and warnings."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    notes = logging.getLogger("cmoe")
    if not any(isinstance(handler, _NoteHandler) for handler in notes.handlers):
        notes.addHandler(_NoteHandler())
    notes.propagate = False


def _fail(message: str, code: int) -> None:
    first_line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    kept = [f"{path}: {note}" for path, note in ABANDONED if note]
    if kept:
        first_line += f" (kept: {'; '.join(kept)})"
    console.print(f"[red]error:[/red] {escape(first_line)}", highlight=False, soft_wrap=True)
    sys.exit(code)
