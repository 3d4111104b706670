"""Model cards in the hub's terms: huggingface_hub's `ModelCard`, its card data (base model, license,
training datasets, pipeline, tags) and the measured results as model-index entries, above the
human-readable description. A card is built from the artifact's recipe and config alone, so any command
that measures a model cmoe wrote can record the result (`record_results`) and rebuild the card.

`base_model` is the source's hub id: the recorded source when it is a hub id, or the repository of a
local path inside the hub cache (`.../models--OWNER--NAME/snapshots/REV`, a GGUF file there too). A source
known only by a local path gets no `base_model`: a path on the carver's disk names nothing on the hub.
`base_model_relation` is left for the hub to infer: none of its relations (adapter, merge, quantized,
finetune) names a carve.
"""

import fcntl
import json
import numbers
import os
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Iterator

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData, try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import PreTrainedConfig

from cmoe.errors import CmoeError
from cmoe.io.artifacts import log
from cmoe.io.recipe_file import RECIPE_FILE, has_recipe, read_recipe, recipe_text, replace_files
from cmoe.modeling import CMoEConfig, mean_active_neurons, shared_experts_per_layer
from cmoe.routers import ROUTERS

if TYPE_CHECKING:
    from cmoe.io.loading import ModelSource

CARD_FILE = "README.md"
TAGS = ("cmoe", "mixture-of-experts", "carved")
TASK_TYPE = "text-generation"
LICENSE_FIELDS = ("license", "license_name", "license_link")
DATASET_FIELDS = ("name", "type", "config", "split", "revision")
METRIC_FIELDS = ("type", "value", "name", "stderr")
PROTOCOL_CELL_LIMIT = 24  # longer settings (paths, hashes, the protocol's prose) stay in the recipe only


def hub_model_id(source_model: str | None) -> str | None:
    """The hub id of a recorded source model, or None when it is known only by a local path (records hold
    local models as absolute paths, hub models by their id)."""
    if not source_model:
        return None
    path = PurePath(source_model)
    if not path.is_absolute():
        return source_model if _is_repo_id(source_model) else None
    parts = path.parts
    for index, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[index + 1] == "snapshots":
            repo_id = part.removeprefix("models--").replace("--", "/")
            return repo_id if _is_repo_id(repo_id) else None
    return None


def _is_repo_id(text: str) -> bool:
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def source_name(source_model: str | None) -> str:
    """How a card names the source: its hub id, else its directory's or file's name (not the whole path)."""
    return hub_model_id(source_model) or PurePath(source_model or "a dense model").name


def source_license(source_model: str | None) -> dict:
    """The license fields of the source's own model card, read from disk only: a local directory's (or a
    GGUF file's directory's) README.md, or a hub source's when the hub cache holds it. Empty when unknown."""
    card_path = _source_card_path(source_model)
    if card_path is None:
        return {}
    try:
        data = ModelCard.load(str(card_path), ignore_metadata_errors=True).data
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return {field: getattr(data, field) for field in LICENSE_FIELDS if getattr(data, field, None)}


def _source_card_path(source_model: str | None) -> Path | None:
    if not source_model:
        return None
    path = Path(source_model)
    if path.is_absolute():
        card = (path if path.is_dir() else path.parent) / CARD_FILE
        return card if card.is_file() else None
    repo_id = hub_model_id(source_model)
    cached = try_to_load_from_cache(repo_id, CARD_FILE) if repo_id else None
    return Path(cached) if isinstance(cached, str) else None


def training_datasets(record: dict) -> list[str]:
    """Hub ids of the datasets the model was built from: calibration and fine-tuning text from the hub."""
    descriptions = [record.get("calibration") or {}, *(record.get("finetune") or {}).get("data", [])]
    ids = [description.get("repo_id") for description in descriptions if isinstance(description, dict)]
    return list(dict.fromkeys(repo_id for repo_id in ids if repo_id))


def model_name(record: dict) -> str:
    """The model's name in the model-index: source, shape and what was done after the carve."""
    parts = [PurePath(source_name(record.get("source_model"))).name.removesuffix(".gguf"), record.get("config", "cmoe")]
    if "finetune" in record:
        parts.append("finetuned")
    if "export" in record:
        parts.append(record["export"]["format"])
    return "-".join(parts)


def eval_results(evaluations: list[dict]) -> list[EvalResult]:
    """One hub EvalResult per recorded metric (the hub groups them by task and dataset)."""
    results = []
    for entry in evaluations:
        dataset = entry["dataset"]
        for metric in entry["metrics"]:
            results.append(
                EvalResult(
                    task_type=TASK_TYPE,
                    task_name=entry["task"],
                    dataset_type=dataset["type"],
                    dataset_name=dataset["name"],
                    dataset_config=dataset.get("config"),
                    dataset_split=dataset.get("split"),
                    dataset_revision=dataset.get("revision"),
                    metric_type=metric["type"],
                    metric_value=metric["value"],
                    metric_name=metric.get("name"),
                )
            )
    return results


def card_data(record: dict, model_type: str) -> ModelCardData:
    """The card's metadata, what the hub indexes and filters on (fields without a value are left out)."""
    license_fields = record.get("source_license") or source_license(record.get("source_model"))
    evaluations = record.get("evaluations") or []
    return ModelCardData(
        base_model=hub_model_id(record.get("source_model")),
        datasets=training_datasets(record) or None,
        library_name="transformers",
        pipeline_tag=TASK_TYPE,
        tags=[*TAGS, model_type] if "export" in record else list(TAGS),
        model_name=model_name(record) if evaluations else None,
        eval_results=eval_results(evaluations) or None,
        **license_fields,
    )


def build_card(record: dict, config: PreTrainedConfig | dict) -> ModelCard:
    """The card of a carved, exported or fine-tuned model from its record and its config (the config
    object, or config.json as a dict)."""
    model_type = config["model_type"] if isinstance(config, dict) else config.model_type
    if "export" in record:
        sections = [_export_description(record, model_type)]
    else:
        carved = CMoEConfig.from_dict(config) if isinstance(config, dict) else config
        sections = [_carved_description(record, carved)]
    if "finetune" in record:
        sections.append(_finetune_section(record["finetune"]))
    if record.get("evaluations"):
        sections.append(_evaluation_section(record["evaluations"]))
    if "export" not in record:
        sections.append(_timings_section(record))
    sections.append(f"\nThe full recipe (resolved options, versions, data, timings) is in `{RECIPE_FILE}`.\n")
    return ModelCard(f"---\n{card_data(record, model_type).to_yaml()}\n---\n" + "".join(sections))


def write_card(directory: Path, record: dict, config: PreTrainedConfig | dict) -> None:
    """The card of a model being saved, written atomically."""
    replace_files({directory / CARD_FILE: str(build_card(record, config))})


def record_results(directory: Path, results: list[dict]) -> None:
    """Keep measured `results` in the artifact's recipe (under `evaluations`, an earlier entry of the same
    task on the same dataset name, config and split replaced, the others kept) and rebuild its card so its
    model-index holds them; both files are replaced atomically, under a lock on the directory. An entry:
    {"task": "perplexity", "dataset": {"name", "type", optional "config", "split", "revision"},
    "metrics": [{"type", "value", optional "name", "stderr"}], "protocol": {free-form settings}}."""
    directory = Path(directory)
    entries = [_evaluation_entry(result) for result in results]
    if not directory.is_dir():
        raise CmoeError(f"{directory}: no such model directory to record results in")
    if not has_recipe(directory):
        raise CmoeError(
            f"{directory}: not a model directory written by cmoe (no {RECIPE_FILE}); results are recorded only "
            "into cmoe's carved, exported and fine-tuned models"
        )
    with _locked(directory):
        record = read_recipe(directory)
        record["evaluations"] = merged_evaluations(record.get("evaluations") or [], entries)
        card = build_card(record, _artifact_config(directory, record))
        replace_files({directory / RECIPE_FILE: recipe_text(record), directory / CARD_FILE: str(card)})


def recording_directory(source: "ModelSource", record: bool | None) -> Path | None:
    """Where a command records what it measured: the model's own directory when cmoe wrote it and it may
    be written (`record` None: there if so, else nowhere with a note; False: nowhere). `record=True` where
    it cannot be is refused, before any work."""
    directory = Path(source.location) if source.is_local and not source.gguf_file else None
    ours = directory is not None and has_recipe(directory)
    if record and not ours:
        raise CmoeError(f"--record: {source.description} is not a model directory written by cmoe (no {RECIPE_FILE})")
    if not ours or record is False:
        return None
    unwritable = _why_not_writable(directory)
    if unwritable and record:
        raise CmoeError(f"--record: {directory}: {unwritable}")
    if unwritable:
        log.warning(f"the result is not recorded: {directory}: {unwritable}")
        return None
    return directory


def _why_not_writable(directory: Path) -> str | None:
    if hub_model_id(str(directory)):
        return "a hub cache snapshot (the hub's copy: record into a directory of your own)"
    if not os.access(directory, os.W_OK | os.X_OK):
        return "not writable"
    return None


def merged_evaluations(recorded: list[dict], new: list[dict]) -> list[dict]:
    """The recorded entries with `new` ones replacing those they measure again, in place; others appended."""
    merged = {_entry_key(entry): entry for entry in recorded}
    merged.update((_entry_key(entry), entry) for entry in new)
    return list(merged.values())


def _entry_key(entry: dict) -> tuple:
    dataset = entry["dataset"]
    return entry["task"], dataset["name"], dataset.get("config"), dataset.get("split")


def _evaluation_entry(result: dict) -> dict:
    """One result checked and reduced to the fields the recipe and the model-index hold."""
    task, dataset, metrics = result.get("task"), result.get("dataset") or {}, result.get("metrics") or []
    if not isinstance(task, str) or not task:
        raise ValueError(f"result without a task name: {result!r}")
    if not all(isinstance(dataset.get(field), str) and dataset[field] for field in ("name", "type")):
        raise ValueError(f"{task}: the dataset needs a name and a type, got {dataset!r}")
    if not metrics or not all(
        isinstance(metric.get("type"), str) and _is_number(metric.get("value")) for metric in metrics
    ):
        raise ValueError(f"{task}: every metric needs a type and a numeric value, got {metrics!r}")
    return {
        "task": task,
        "dataset": {field: dataset[field] for field in DATASET_FIELDS if dataset.get(field) is not None},
        "metrics": [
            {field: _plain_number(metric[field]) for field in METRIC_FIELDS if metric.get(field) is not None}
            for metric in metrics
        ],
        "protocol": dict(result.get("protocol") or {}),
    }


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _plain_number(value):
    """Numbers as floats (numpy scalars included), so that the YAML recipe holds plain values."""
    return float(value) if _is_number(value) else value


def _artifact_config(directory: Path, record: dict) -> dict:
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CmoeError(f"{path}: cannot read the model's config ({type(error).__name__})") from None
    if "export" not in record and config.get("model_type") != CMoEConfig.model_type:
        raise CmoeError(f"{path}: model_type {config.get('model_type')!r}, but {RECIPE_FILE} records a cmoe carve")
    return config


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One recorder at a time per directory (two evaluations finishing together keep both results)."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _carved_description(record: dict, config: CMoEConfig) -> str:
    text_config = config.text_config
    spec = next(spec for spec in config.layer_specs if spec)
    dense_ffn = text_config.intermediate_size
    active = mean_active_neurons(config)
    per_layer = ", ".join(str(layer.top_k) if layer else "dense" for layer in config.layer_specs)
    budget = "fixed by --budget-from" if record.get("active_per_layer") else f"budget {record.get('budget', 'uniform')}"
    calibration = record.get("calibration") or {}
    source = source_name(record.get("source_model"))
    shape = (
        f"{record.get('config')} (shared {record.get('shared_experts')}, active routed {record.get('active_experts')}, "
        f"experts {record.get('experts')})"
    )
    widths = (
        f"{dense_ffn} dense; shared block {spec.shared_size}, {spec.num_experts} routed experts of {spec.expert_size}"
    )
    if len({layer.shared_size for layer in config.layer_specs if layer}) > 1:
        counts = shared_experts_per_layer(config, record.get("experts"))
        shared = ", ".join("dense" if count is None else str(count) for count in counts)
        budget = "the shape's active total split per layer by --shared-width adaptive"
        widths = f"{dense_ffn} dense; experts of {spec.expert_size}, shared experts per layer {shared}"
        widths += " (--shared-width adaptive)"
    method = record.get("method", "cmoe")
    if record.get("rescale"):
        method += ", routed outputs rescaled by n/k"
    if record.get("refit_down"):
        method += ", down projections refitted by least squares on the calibration tokens"
        if record.get("refit_weighting", "uniform") != "uniform":
            method += f" ({record['refit_weighting']} token weighting)"
    if record.get("refit_drift"):
        method += f", fitted towards the dense model's layer outputs (drift {record['refit_drift']:g})"
    if record.get("refit_router"):
        errors = record.get("router_refit_error") or []
        kept = sum(entry["after"] < entry["before"] for entry in errors)
        method += f", router refitted to the refitted experts in {kept} of {len(errors)} routed layers (where it "
        method += "lowered the calibration error)"
    router = "training-free" if ROUTERS[spec.router].training_free else "random start: train it with `cmoe finetune`"
    data = calibration.get("source") or PurePath(calibration.get("path", "profile")).name
    windows = f"{record.get('nsamples', '-')} windows of {record.get('seqlen', '-')} tokens, seed {record.get('seed')}"
    return f"""# {record.get("config", "CMoE")} carved from {source}

A Mixture-of-Experts model carved without training by cmoe (CMoE, Pei et al. 2025,
arXiv 2502.04416) from the dense `{text_config.model_type}` model `{source}`.

| | |
|---|---|
| configuration | {shape} |
| FFN neurons per layer | {widths} |
| active FFN neurons per token | {active:g} of {dense_ffn} ({active / dense_ffn:.1%}), mean over layers |
| active routed experts per layer | {per_layer} ({budget}) |
| construction method | {method} |
| router | {spec.router} ({router}) |
| K_a | {record.get("ka")} |
| calibration | {data}: {windows} |
| mode | {record.get("mode")} |

## Load
```python
import cmoe  # registers the architecture; without cmoe pass trust_remote_code=True instead
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("PATH")  # PATH: this directory or its hub repo id
tokenizer = AutoTokenizer.from_pretrained("PATH")
```
"""


def _export_description(record: dict, model_type: str) -> str:
    source = source_name(record.get("source_model"))
    return f"""# {record.get("config", "CMoE")} carved from {source}, as {record["export"]["format"]}

Carved without training by cmoe (CMoE, Pei et al. 2025, arXiv 2502.04416) and exported to the standard
`{model_type}` architecture: transformers, vLLM, SGLang and llama.cpp load it natively (no custom code).

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("PATH")  # PATH: this directory or its hub repo id
tokenizer = AutoTokenizer.from_pretrained("PATH")
```
"""


def _finetune_section(finetune: dict) -> str:
    """Training after the carve: the description above tells the model as carved."""
    options = finetune["options"]
    method = f"LoRA r {options['lora_r']} / alpha {options['lora_alpha']} (merged)"
    if options["full"]:
        method = "every weight (--full)"
    curve = finetune["eval_curve"]
    quality = ""
    if len(curve) > 1:
        quality = f"perplexity on the eval data {curve[0]['perplexity']:.3f} -> {curve[-1]['perplexity']:.3f}; "
    if options.get("distill"):
        method += (
            f", distilled from the dense {finetune['teacher']} (loss {1 - options['distill']:g} x LM + "
            f"{options['distill']:g} x KL at temperature {options['distill_temperature']:g})"
        )
    return f"""
## Fine-tuning
Fine-tuned with `cmoe finetune`: {method}, router scale u {"trained" if options["train_router"] else "frozen"},
balancing bias b by the sign rule (speed {options["bias_speed"]:g}); {finetune["steps"]} steps, {finetune["tokens"]}
tokens, {options["mixture"]} mixture of {len(finetune["data"])} source(s), LR {options["lr"]:g}, seed {options["seed"]};
{quality}loss curve, routing load before/after and every option under `finetune` in `{RECIPE_FILE}`
(`cmoe finetune --recipe {RECIPE_FILE} -o OUT` replays the run).
"""


def _evaluation_section(evaluations: list[dict]) -> str:
    rows = "\n".join(
        f"| {_cell(entry['task'])} | {_dataset_cell(entry['dataset'])} | {_cell(metric['type'])} | "
        f"{_value_cell(metric)} | {_protocol_cell(entry.get('protocol') or {})} |"
        for entry in evaluations
        for metric in entry["metrics"]
    )
    return f"""
## Evaluation
Measured on this model by cmoe (`cmoe eval`); each entry's whole protocol, with the versions, is under
`evaluations` in `{RECIPE_FILE}`.

| task | dataset | metric | value | protocol |
|---|---|---|---|---|
{rows}
"""


def _dataset_cell(dataset: dict) -> str:
    details = [dataset[field] for field in ("type", "config", "split") if dataset.get(field)]
    details = [detail for detail in details if detail != dataset["name"]]
    return _cell(dataset["name"] + (f" ({', '.join(details)})" if details else ""))


def _value_cell(metric: dict) -> str:
    stderr = metric.get("stderr")
    return f"{metric['value']:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def _protocol_cell(protocol: dict) -> str:
    """The protocol's short settings; paths, hashes and nested ones stay in the recipe."""
    settings = []
    for key, value in protocol.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        if isinstance(value, (bool, int, str)) and len(str(value)) <= PROTOCOL_CELL_LIMIT:
            settings.append(f"{key} {value}")
    return _cell(", ".join(settings))


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _timings_section(record: dict) -> str:
    timings = "\n".join(f"| {stage} | {seconds:.2f} |" for stage, seconds in record.get("timings_s", {}).items())
    return f"""
## Timings (seconds)
| stage | seconds |
|---|---|
{timings}
"""
