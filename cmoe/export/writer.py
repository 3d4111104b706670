"""`cmoe export`: write a carved model as a standard MoE checkpoint, atomically, with its record."""

from pathlib import Path

import torch
from transformers import AutoConfig

from cmoe.checks import check_dtype_name
from cmoe.export.base import EXPORT_FORMATS, CarvedView, check_exportable, write_sharded
from cmoe.io.artifacts import claimed_output, command_line, versions
from cmoe.io.carved import load_carved
from cmoe.io.loading import DTYPES, estimated_weight_bytes, load_tokenizer, prepare_model
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
    (directory / "README.md").write_text(export_card(fmt_name, fmt.model_type, full))
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


def export_card(fmt_name: str, model_type: str, record: dict) -> str:
    source = record.get("source_model", "a dense model")
    return f"""---
library_name: transformers
base_model: {source}
tags: [cmoe, mixture-of-experts, carved, {model_type}]
---
# {record.get("config", "CMoE")} carved from {source}, as {fmt_name}

Carved without training by cmoe (CMoE, Pei et al. 2025, arXiv 2502.04416) and exported to the standard
`{model_type}` architecture: transformers, vLLM, SGLang and llama.cpp load it natively (no custom code).

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("PATH")
tokenizer = AutoTokenizer.from_pretrained("PATH")
```

The carve's recipe (options, calibration data, versions, timings) and the export's are in `cmoe_recipe.yaml`.
"""
