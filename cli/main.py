"""The `cmoe` command line: parses options, shows progress, calls the library."""

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

app = typer.Typer(
    help="Carve a dense LLaMA-style model into a Mixture-of-Experts without training (CMoE).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
eval_app = typer.Typer(help="Evaluate dense and carved models.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

console = Console(stderr=True)
_state = {"debug": False}

ModelArg = Annotated[str, typer.Argument(help="Dense model: a local Hugging Face directory, a hub id, or a .gguf file.", show_default=False)]
DataOpt = Annotated[str, typer.Option("--data", help="Calibration text: wikitext2, c4, ptb (need the hub) or a local .txt/.jsonl/.json/.parquet file.")]
NSamplesOpt = Annotated[int, typer.Option("--nsamples", help="Number of calibration windows.")]
SeqlenOpt = Annotated[int, typer.Option("--seqlen", help="Tokens per window (at most the model's maximum positions).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for the calibration windows and everything random.")]
KaOpt = Annotated[int, typer.Option("--ka", help="K_a: neurons marked active per token when profiling.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda if available), cpu or cuda.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (float32 on CPU, checkpoint dtype or bfloat16 on GPU), float32, bfloat16, float16.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Windows per forward batch.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace the output if it exists.")]
StatisticOpt = Annotated[Optional[str], typer.Option("--statistic", help="Per-token neuron score whose top-K_a are marked: normalized (reference: normalised SwiGLU state), raw (h), contribution (|h_i| |W_down[:, i]|).")]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors (or set CMOE_DEBUG=1).")] = False,
) -> None:
    _state["debug"] = debug or os.environ.get("CMOE_DEBUG", "") not in ("", "0")


@contextmanager
def _layer_progress(label: str) -> Iterator:
    """A rich progress bar for a per-layer loop, shown from the loop's first report (so that input
    errors, found before any heavy work, print nothing but their one line); yields the callback."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    progress = Progress(*columns, console=console)
    task = None

    def on_layer(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            progress.start()
            task = progress.add_task(label, total=total)
        progress.update(task, completed=done, total=total, description=f"{label} layer {done}/{total}")

    try:
        yield on_layer
    finally:
        progress.stop()


def _compute(device: str, dtype: str, batch_size: int):
    from cmoe.commands import Compute

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
) -> None:
    """Profile neuron activations of a dense model on calibration text, one layer at a time.

    The profile holds every statistic any carving option needs, so one profile serves many carves."""
    from cmoe.commands import Calibration, run_profile

    with _layer_progress("profile") as on_layer:
        recipe = run_profile(
            model, output, Calibration(data, nsamples, seqlen, seed), ka, _compute(device, dtype, batch_size), overwrite,
            on_layer, statistic or "normalized",
        )
    console.print(f"wrote {output} ({recipe['num_layers']} layers, {recipe['calibration']['calibration_tokens']} tokens, "
                  f"{recipe['timings_s']['profile']:.1f} s)")


@app.command()
def carve(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write the carved model to.")],
    config: Annotated[Optional[str], typer.Option("--config", help="S<shared>A<active>E<experts>, e.g. S3A3E8 (default S3A3E8 unless the three counts are given).")] = None,
    shared: Annotated[Optional[int], typer.Option("--shared", help="Shared (always-on) experts N_s, instead of --config.")] = None,
    active: Annotated[Optional[int], typer.Option("--active", help="Routed experts selected per token N_k, instead of --config.")] = None,
    experts: Annotated[Optional[int], typer.Option("--experts", help="Total experts N, instead of --config.")] = None,
    profile_file: Annotated[Optional[Path], typer.Option("--profile", help="Reuse a profile of the dense model (`cmoe profile`) instead of sequential calibration: faster, slightly worse.")] = None,
    data: DataOpt = "wikitext2",
    nsamples: NSamplesOpt = 8,
    seqlen: SeqlenOpt = 2048,
    seed: SeedOpt = 0,
    ka: KaOpt = 10,
    preset: Annotated[str, typer.Option("--preset", help="reference (the CMoE reference, faithfully) or quality (the measured winners: shared by contribution, k-means grouping, linear router). Options given explicitly override the preset.")] = "reference",
    statistic: StatisticOpt = None,
    shared_by: Annotated[Optional[str], typer.Option("--shared-by", help="Shared-expert neurons: rate (most often marked, reference) or contribution (largest mean |h_i| |W_down[:, i]|).")] = None,
    grouping: Annotated[Optional[str], typer.Option("--grouping", help="Routed experts: hamming (one balanced assignment on mark columns, reference) or kmeans (balanced k-means on contribution co-activation).")] = None,
    kmeans_iterations: Annotated[Optional[int], typer.Option("--kmeans-iterations", help="Refinement passes of --grouping kmeans (0: one assignment to the seeds).")] = None,
    representative: Annotated[Optional[str], typer.Option("--representative", help="Analytic router's neuron per expert: centroid (reference) or most-active.")] = None,
    router: Annotated[Optional[str], typer.Option("--router", help="analytic (reference: representative neurons) or linear (fitted in closed form to predict each expert's output).")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: BatchOpt = 1,
    overwrite: OverwriteOpt = False,
) -> None:
    """Carve a dense model into a Mixture-of-Experts (shared + routed experts, training-free router)."""
    from dataclasses import replace

    from cmoe.commands import Calibration, run_carve
    from cmoe.config import MoEShape
    from cmoe.options import CarveOptions, with_preset

    shape = _shape(config, shared, active, experts, MoEShape)
    explicit = {
        "statistic": statistic, "shared_by": shared_by, "grouping": grouping, "kmeans_iterations": kmeans_iterations,
        "representative": representative, "router": router,
    }
    options = with_preset(CarveOptions(shape=shape, ka=ka), preset)
    options = replace(options, **{name: value for name, value in explicit.items() if value is not None})
    calibration = None if profile_file else Calibration(data, nsamples, seqlen, seed)
    with _layer_progress(f"carve {shape.name}") as on_layer:
        recipe = run_carve(model, output, options, calibration, profile_file, _compute(device, dtype, batch_size), overwrite, on_layer)
    note = f"; {recipe['leftover_neurons_in_shared']} leftover neurons joined the shared expert" if "leftover_neurons_in_shared" in recipe else ""
    console.print(f"wrote {output} ({shape.name}, {recipe['timings_s']['total']:.1f} s{note})")


def _shape(config, shared, active, experts, shape_cls):
    from cmoe.errors import CmoeError

    counts = (shared, active, experts)
    if config is not None and any(count is not None for count in counts):
        raise CmoeError("give either --config or --shared/--active/--experts, not both")
    if config is None and any(count is not None for count in counts):
        if any(count is None for count in counts):
            raise CmoeError("--shared, --active and --experts must be given together")
        return shape_cls(shared, active, experts).validated()
    return shape_cls.parse(config or "S3A3E8")


@eval_app.command()
def perplexity(
    model: Annotated[str, typer.Argument(help="Dense or carved model: a directory, a hub id, or a .gguf file.", show_default=False)],
    data: Annotated[str, typer.Option("--data", help="Evaluation text: wikitext2, c4, ptb (need the hub) or a local file.")] = "wikitext2",
    seqlen: SeqlenOpt = 2048,
    max_windows: Annotated[Optional[int], typer.Option("--max-windows", help="Evaluate only the first N windows (quick runs).")] = None,
    split: Annotated[str, typer.Option("--split", help="Split of a named source: test, validation or train.")] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: BatchOpt = 1,
) -> None:
    """Perplexity under the GPTQ protocol (non-overlapping windows, text tokenised once)."""
    from cmoe.commands import run_perplexity

    with _layer_progress("eval") as on_layer:
        result = run_perplexity(model, data, seqlen, max_windows, split, _compute(device, dtype, batch_size), on_layer)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
    else:
        typer.echo(f"perplexity {result.perplexity:.4f} (seqlen {result.seqlen}, {result.windows} windows, {result.tokens} tokens)")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one line and exit 2; tracebacks only with --debug or CMOE_DEBUG=1."""
    from cmoe.errors import CmoeError

    args = sys.argv[1:] if argv is None else argv
    _quiet_libraries()
    debug = "--debug" in args or os.environ.get("CMOE_DEBUG", "") not in ("", "0")
    try:
        app(args=args, prog_name="cmoe", standalone_mode=False)
    except CmoeError as error:
        if debug:
            raise
        _fail(str(error), 2)
    except click.exceptions.ClickException as error:
        _fail(f"{error.format_message()} (see cmoe --help)", error.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("interrupted")
        sys.exit(130)
    except Exception as error:  # the CLI's last line of defence: one line, never a traceback by default
        if debug:
            raise
        _fail(f"{type(error).__name__}: {error} (rerun with --debug for the traceback)", 1)


def _quiet_libraries() -> None:
    """Our own progress bars and one-line errors replace the libraries' bars and warnings."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging

    disable_progress_bars()
    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _fail(message: str, code: int) -> None:
    first_line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    console.print(f"[red]error:[/red] {first_line}", highlight=False, soft_wrap=True)
    sys.exit(code)
