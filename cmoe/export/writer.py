"""`cmoe export`: write a carved model as a standard MoE checkpoint, atomically, with its record."""

from pathlib import Path

import torch
from transformers import AutoConfig

from cmoe.checks import check_dtype_name
from cmoe.export.base import EXPORT_FORMATS, CarvedView, check_exportable, write_sharded
from cmoe.io.artifacts import claimed_output, command_line, versions
from cmoe.io.carved import load_carved
from cmoe.io.loading import DTYPES, estimated_weight_bytes, load_tokenizer, prepare_model
from cmoe.io.model_card import write_card
from cmoe.io.recipe_file import has_recipe, read_recipe, write_recipe


def export_model(
    model: torch.nn.Module, tokenizer, directory: Path, fmt_name: str, record: dict, dtype=None, on_layer=None
):
    """Write the carved `model` to the new `directory` as `fmt_name` (checked first: a carve the format
    cannot hold exactly is refused in one line that names the option to change)."""
    fmt = EXPORT_FORMATS.get(fmt_name)
    view = CarvedView(model, fmt_name)
    check_exportable(view, fmt)
    directory.mkdir(parents=True, exist_ok=True)
    written_dtype = dtype or model.dtype
    values = {name: value for name, value in fmt.config(view).items() if name != "model_type"}
    config = AutoConfig.for_model(fmt.model_type, **values)
    config.dtype = str(written_dtype).removeprefix("torch.")
    config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    write_sharded(directory, view, fmt, dtype, on_layer)
    export = {
        "format": fmt_name,
        "model_type": fmt.model_type,
        "dtype": config.dtype,
        "command": command_line(),
        "versions": versions(),
    }
    full = {**record, "export": export}
    write_recipe(directory, full)
    write_card(directory, full, config)
    return full


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
        model = load_carved(location)
        tokenizer = load_tokenizer(prepared.source)
        with slot.staged() as staging:
            return export_model(model, tokenizer, staging, fmt_name, record, DTYPES.get(dtype), on_layer)
