"""`cmoe export` and `cmoe carve --format`: write a carved model as a standard MoE checkpoint one decoder
layer at a time (a 70B carve never sits whole in host memory), atomically, with its record."""

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig

from cmoe.checks import check_dtype_name
from cmoe.export.base import EXPORT_FORMATS, CarvedView, check_layer_exportable, check_model_exportable
from cmoe.io.artifacts import claimed_output, command_line, versions
from cmoe.io.carved import load_carved, without_gguf_quantization
from cmoe.io.lazy import LazyWeights
from cmoe.io.loading import DTYPES, PreparedModel, estimated_weight_bytes, load_layerwise, load_tokenizer, prepare_model
from cmoe.io.model_card import write_card
from cmoe.io.recipe_file import has_recipe, read_recipe, write_recipe
from cmoe.io.shards import ShardWriter
from cmoe.pipeline.sequential import LayerWork, Pipeline, Stage


class ExportWriter:
    """One export under way in `directory`: the model-level checks when it starts (a refused carve writes
    nothing), then each decoder layer checked and written to its own shard as soon as it is final, then
    the shard of the embeddings, final norm and LM head, the index, config, tokenizer and record."""

    def __init__(self, view: CarvedView, directory: Path, dtype: torch.dtype | None = None):
        self.view = view
        self.fmt = EXPORT_FORMATS.get(view.fmt)
        check_model_exportable(view, self.fmt)
        self.directory = directory
        self.dtype = dtype or view.embed_tokens.weight.dtype
        directory.mkdir(parents=True, exist_ok=True)
        self.shards = ShardWriter(directory, len(view.layers) + 1, dtype)

    def write_layer(self, index: int) -> None:
        """Check layer `index` as its weights are, then write it under the format's names."""
        check_layer_exportable(self.view, self.fmt, index)
        self.shards.write(index + 1, self.fmt.layer(self.view, index))

    def finish(self, tokenizer, generation_config, record: dict) -> dict:
        """Write everything but the decoder layers (all written by now) and return the full record."""
        view, fmt = self.view, self.fmt
        top = {"model.embed_tokens.weight": view.embed_tokens.weight, "model.norm.weight": view.norm.weight}
        if not view.text_config.tie_word_embeddings or fmt.untied_head:
            top["lm_head.weight"] = view.lm_head.weight
        self.shards.write(len(view.layers) + 1, top)
        self.shards.finish()
        values = {name: value for name, value in fmt.config(view).items() if name != "model_type"}
        config = AutoConfig.for_model(fmt.model_type, **values)
        config.dtype = str(self.dtype).removeprefix("torch.")
        config.save_pretrained(self.directory)
        generation_config.save_pretrained(self.directory)
        tokenizer.save_pretrained(self.directory)
        export = {
            "format": view.fmt,
            "model_type": fmt.model_type,
            "dtype": config.dtype,
            "command": command_line(),
            "versions": versions(),
        }
        full = {**record, "export": export}
        write_recipe(self.directory, full)
        write_card(self.directory, full, config)
        return full


class WriteExportedLayer(Stage):
    """A `--format` carve's writer: each layer exported to its shard as soon as it is final (a lazy carve
    then releases it)."""

    name = "write"

    def __init__(self, writer: ExportWriter):
        self.writer = writer

    def after(self, pipeline: Pipeline, work: LayerWork) -> None:
        with pipeline.timer.stage(self.name):
            self.writer.write_layer(work.index)


def export_model(
    model: nn.Module,
    tokenizer,
    directory: Path,
    fmt_name: str,
    record: dict,
    dtype=None,
    on_layer=None,
    weights: LazyWeights | None = None,
):
    """Write the carved `model` to the new `directory` as `fmt_name` (checked first: a carve the format
    cannot hold exactly is refused in one line that names the option to change). With lazy `weights` each
    decoder layer is read, checked, written and released in turn."""
    writer = ExportWriter(CarvedView.of(model, fmt_name), directory, dtype)
    total = len(writer.view.layers)
    for index in range(total):
        if weights is not None:
            weights.load(model, index)
        writer.write_layer(index)
        if weights is not None:
            weights.release(model, index)
        if on_layer:
            on_layer(index + 1, total)
    return writer.finish(tokenizer, model.generation_config, record)


def load_carved_layerwise(prepared: PreparedModel) -> tuple[nn.Module, LazyWeights | None]:
    """The carved model read as `load_carved` reads it (in the dtype its config records), one decoder layer
    at a time where its checkpoint allows, else whole (also when its config records no dtype)."""
    stored = getattr(prepared.config, "dtype", None)
    stored = DTYPES.get(stored) if isinstance(stored, str) else stored
    if stored is None:
        return load_carved(prepared.source.location), None
    config = without_gguf_quantization(prepared.config)
    return load_layerwise(PreparedModel(prepared.source, config, prepared.device, stored))


def run_export(
    carved: str, fmt_name: str, output: Path, dtype: str = "auto", overwrite: bool = False, on_layer=None
) -> dict:
    """`cmoe export CARVED --format F -o OUT`: every check before any weight is read, then the export."""
    EXPORT_FORMATS.check(fmt_name)
    with claimed_output(output, overwrite) as slot:
        prepared = prepare_model(carved, "cpu", "auto", kind="carved")
        check_dtype_name(dtype)
        location = Path(prepared.source.location)
        record = read_recipe(location) if has_recipe(location) else {}
        slot.require_space(int(1.05 * estimated_weight_bytes(prepared.config, DTYPES.get(dtype) or torch.float32)))
        model, weights = load_carved_layerwise(prepared)
        tokenizer = load_tokenizer(prepared.source)
        with slot.staged() as staging:
            return export_model(model, tokenizer, staging, fmt_name, record, DTYPES.get(dtype), on_layer, weights)
