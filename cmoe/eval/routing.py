"""`cmoe eval routing`: how a carved model routes the tokens of several data sources.

Per carved layer and source: tokens routed to each expert, load-balance figures, heatmaps as in
LLaMA-MoE's figure 4 and the L2 distances between the sources' normalised routing distributions at one
layer as in its figure 5. Numerics are small pure functions; the model runs one layer at a time.
"""

import re
from pathlib import Path

import torch
from torch import nn

from cmoe.calibration import open_text, read_evaluation_windows
from cmoe.errors import CmoeError
from cmoe.io.artifacts import claimed_output, command_line, versions, write_json
from cmoe.io.loading import check_seqlen, load_layerwise, load_tokenizer, prepare_model
from cmoe.numerics.routing_stats import balance_figures, distance_matrix, routing_distributions
from cmoe.pipeline.sequential import Pipeline
from cmoe.pipeline.stages import CountRouting
from cmoe.recipes import Compute

SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def parse_sources(specs: list[str]) -> dict[str, str]:
    """`name=SOURCE` pairs, in order; names are file-name safe and distinct."""
    sources: dict[str, str] = {}
    for spec in specs:
        name, separator, source = spec.partition("=")
        if not separator or not source or not SOURCE_NAME.match(name):
            raise CmoeError(
                f"--data {spec}: expected NAME=SOURCE with NAME of letters, digits, '.', '_' or '-' (e.g. "
                "wiki=wiki.test.raw)"
            )
        if name in sources:
            raise CmoeError(f"--data {spec}: the name {name!r} is given twice")
        sources[name] = source
    if not sources:
        raise CmoeError("give at least one --data NAME=SOURCE")
    return sources


def count_routed_tokens(
    model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device, on_layer=None, weights=None
) -> torch.Tensor:
    """(carved layers, experts) int64: how many of the windows' tokens each layer routes to each expert,
    counted by forward hooks on the routers while the model runs one layer at a time."""
    counter = CountRouting()
    with torch.no_grad():
        Pipeline(model, [counter], windows, batch_size, device, on_layer=on_layer, weights=weights).run()
    return counter.counts


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(path: Path, values: torch.Tensor, rows: list[str], row_label: str, title: str, colorbar: str) -> None:
    """A readable heatmap of (rows, experts) values: expert and row tick labels, axis titles, colorbar."""
    plt = _pyplot()
    experts = values.shape[1]
    figure, axes = plt.subplots(figsize=(max(5.0, 0.5 * experts + 2.5), max(3.0, 0.32 * len(rows) + 1.8)))
    image = axes.imshow(values.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set_xticks(range(experts), [str(expert) for expert in range(experts)])
    axes.set_yticks(range(len(rows)), rows)
    axes.set_xlabel("routed expert")
    axes.set_ylabel(row_label)
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label=colorbar)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_distances(path: Path, distances: torch.Tensor, sources: list[str], layer: int) -> None:
    """LLaMA-MoE figure 5: the L2 distance matrix between sources, annotated (smaller = more similar)."""
    plt = _pyplot()
    size = max(4.0, 0.9 * len(sources) + 2.5)
    figure, axes = plt.subplots(figsize=(size, size * 0.85))
    image = axes.imshow(distances.numpy(), cmap="Blues", vmin=0)
    axes.set_xticks(range(len(sources)), sources, rotation=45, ha="right")
    axes.set_yticks(range(len(sources)), sources)
    dark = 0.5 * float(distances.max())
    for row in range(len(sources)):
        for column in range(len(sources)):
            value = float(distances[row, column])
            color = "white" if value > dark else "black"
            axes.text(column, row, f"{value:.3f}", ha="center", va="center", fontsize=9, color=color)
    axes.set_xlabel("data source")
    axes.set_ylabel("data source")
    axes.set_title(f"L2 distance between routing distributions, layer {layer}")
    figure.colorbar(image, ax=axes, label="L2 distance (smaller = more similar)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def routing_report(counts: dict[str, torch.Tensor], layers: list[int], top_k: list[int], layer: int) -> dict:
    """Every number of the analysis from the per-source (carved layers, experts) counts."""
    names = list(counts)
    position = layers.index(layer)
    at_layer = torch.stack([routing_distributions(counts[name][position]) for name in names])
    return {
        "layers": layers,
        "top_k": top_k,
        "sources": {
            name: {
                "counts": counts[name].tolist(),
                "fractions": routing_distributions(counts[name]).tolist(),
                "balance": [balance_figures(row) for row in counts[name]],
            }
            for name in names
        },
        "distance_layer": layer,
        "distances": distance_matrix(at_layer).tolist(),
    }


def run_routing_eval(
    model: str,
    data: list[str],
    output: Path,
    layer: int | None = None,
    seqlen: int = 2048,
    max_windows: int | None = 8,
    split: str = "test",
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 1,
    overwrite: bool = False,
    on_layer=None,
) -> dict:
    """Count, measure and plot the routing of a carved model on each named source; write PNGs and JSON."""
    sources = parse_sources(data)
    with claimed_output(output, overwrite) as slot:
        compute = Compute(device, dtype, batch_size)
        prepared = prepare_model(model, compute.device, compute.dtype, kind="carved")
        check_seqlen(seqlen, prepared.config)
        source, config = prepared.source, prepared.config
        layers = [index for index, spec in enumerate(config.layer_specs) if spec]
        chosen = layers[-1] if layer is None else layer
        if chosen not in layers:
            raise CmoeError(f"--layer {layer}: expected a carved layer ({layers[0]}..{layers[-1]})")
        tokenizer = load_tokenizer(source)
        windows = {
            name: read_evaluation_windows(open_text(text, split), tokenizer, seqlen, max_windows)[0]
            for name, text in sources.items()
        }
        loaded, weights = load_layerwise(prepared)
        counts = {
            name: count_routed_tokens(loaded, ids, batch_size, prepared.device, on_layer, weights)
            for name, ids in windows.items()
        }
        top_k = [config.layer_specs[index].top_k for index in layers]
        report = {
            "tool": "cmoe eval routing",
            "model": source.description,
            "data": {
                name: {
                    "source": text,
                    "windows": windows[name].shape[0],
                    "seqlen": seqlen,
                    "tokens": windows[name].numel(),
                }
                for name, text in sources.items()
            },
            **routing_report(counts, layers, top_k, chosen),
            "command": command_line(),
            "versions": versions(),
        }
        with slot.staged() as staging:
            staging.mkdir(parents=True)
            _write_figures(staging, counts, layers, chosen, report)
            write_json(staging / "routing.json", report)
        return report


def _write_figures(
    directory: Path, counts: dict[str, torch.Tensor], layers: list[int], chosen: int, report: dict
) -> None:
    layer_names = [str(index) for index in layers]
    for name, table in counts.items():
        plot_heatmap(
            directory / f"load_{name}.png",
            routing_distributions(table).float(),
            layer_names,
            "layer",
            f"Expert load per layer: {name} ({report['data'][name]['tokens']} tokens)",
            "fraction of routed assignments",
        )
    names = list(counts)
    at_layer = torch.stack([counts[name][layers.index(chosen)] for name in names]).float()
    # Each source's row as fractions: sources of different lengths are compared by their distributions.
    plot_heatmap(
        directory / f"load_layer{chosen}.png",
        at_layer / at_layer.sum(dim=1, keepdim=True).clamp_min(1),
        names,
        "data source",
        f"Expert load at layer {chosen}, per data source",
        "fraction of routed assignments",
    )
    plot_distances(directory / f"distances_layer{chosen}.png", torch.tensor(report["distances"]), names, chosen)
