"""Saving and reloading carved models: a Hugging Face directory with its own modeling code."""

from pathlib import Path

import torch
from torch import nn

from transformers import AutoConfig, AutoModelForCausalLM
from transformers.dynamic_module_utils import custom_object_save

from cmoe.errors import CmoeError
from cmoe.io.model_card import write_card
from cmoe.io.recipe_file import write_recipe
from cmoe.io.shards import ShardWriter, tensor_shapes


def without_gguf_quantization(config):
    """Drop the `quantization_config` a carved config's text config inherits from a GGUF source: carved
    weights are plain tensors, and transformers would attach a GGUF quantizer that refuses to save them."""
    text_config = getattr(config, "text_config", None)
    quantization = getattr(text_config, "quantization_config", None)
    method = (
        quantization.get("quant_method")
        if isinstance(quantization, dict)
        else getattr(quantization, "quant_method", None)
    )
    if str(getattr(method, "value", method)) == "gguf":
        delattr(text_config, "quantization_config")
    return config


def carved_config(path: str | Path):
    """A carved model's config, ready for `from_pretrained(path, config=...)` (see without_gguf_quantization)."""
    return without_gguf_quantization(AutoConfig.from_pretrained(path))


def save_carved(model: nn.Module, tokenizer, directory: Path, record: dict, written: ShardWriter | None = None) -> None:
    """Weights as one safetensors shard per decoder layer plus one for the rest, with their index (the
    layers already `written` by a lazy carve are not written again), config with auto_map, modeling
    code, tokenizer, recipe and model card."""
    directory.mkdir(parents=True, exist_ok=True)
    without_gguf_quantization(model.config)
    layers = model.model.layers
    writer = written or ShardWriter(directory, len(layers) + 1)
    if written is None:
        for index, layer in enumerate(layers):
            writer.write(index + 1, layer_tensors(layer, index))
    top = {
        "model.embed_tokens.weight": model.model.embed_tokens.weight,
        "model.norm.weight": model.model.norm.weight,
    }
    if not model.config.tie_word_embeddings:
        top["lm_head.weight"] = model.lm_head.weight
    writer.write(len(layers) + 1, top)
    writer.finish()
    model.config.architectures = [type(model).__name__]
    model.config.dtype = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    # What save_pretrained does for a class registered for an auto class: the AutoModelForCausalLM entry of
    # auto_map and modeling_cmoe.py with the files it imports; the config's own save adds AutoConfig.
    custom_object_save(model, directory, config=model.config)
    model.config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    write_recipe(directory, record)
    write_card(directory, record, model.config)


def layer_tensors(layer: nn.Module, index: int) -> dict[str, torch.Tensor]:
    """A decoder layer's tensors under their names in the whole model's state dict."""
    return {f"model.layers.{index}.{name}": tensor for name, tensor in layer.state_dict().items()}


def load_carved(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Reload a carved model in one call: `model = cmoe.load_carved("out/S3A3E8")`."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CmoeError(f"{path}: not a model directory (no config.json)")
    try:
        config = carved_config(path)
    except ValueError as error:
        raise CmoeError(f"{path / 'config.json'}: {str(error).splitlines()[0]}") from None
    if getattr(config, "model_type", "") != "cmoe":
        raise CmoeError(f"{path}: not a carved model (model_type {config.model_type!r})")
    check_carved_checkpoint(path, config)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype or "auto")
    return model.to(device).eval()


def check_carved_checkpoint(directory: Path, config) -> None:
    """The per-layer specs against the tensors, before any weight is read: one line naming the first
    layer and config field that disagree with the checkpoint (rather than transformers' size errors)."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    expected = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    found = tensor_shapes(directory)
    problems = []
    for name in sorted(set(expected) | set(found)):
        if name not in found:
            problems.append((name, "is missing"))
        elif name not in expected:
            problems.append((name, "is not in the config's model"))
        elif found[name] != expected[name]:
            problems.append((name, f"has shape {list(found[name])}, the config says {list(expected[name])}"))
    if not problems:
        return
    name, what = min(problems, key=lambda problem: _layer_of(problem[0]))
    layer, count = _layer_of(name), len(problems)
    if layer >= len(config.cmoe_layers):
        raise CmoeError(f"{directory}: tensor {name} {what} ({count} tensors differ from config.json)")
    raise CmoeError(
        f"{directory}: layer {layer}: tensor {name} {what}: config.json's {_spec_field(name, what)} for this layer "
        f"disagrees with the weights ({count} tensors differ)"
    )


def _spec_field(name: str, what: str) -> str:
    """The MoE spec field a mismatched tensor points at: a missing or extra expert is the expert count,
    a wrong width the expert (or shared block) size."""
    if ".mlp.experts." in name:
        return "expert_size" if what.startswith("has shape") else "num_experts"
    if ".mlp.shared." in name:
        return "shared_size"
    if ".mlp.router." in name:
        return "router"
    return "cmoe_layers entry (dense or carved)" if ".mlp." in name else "text_config"


def _layer_of(name: str) -> int:
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return 1 << 30
