"""Loading dense and carved models: a local directory, a hub id, or a `.gguf` file.

Everything cheap is checked first (config, architecture on the meta device) so that a bad input
fails in one line before any weight is read.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig

import cmoe.modeling  # noqa: F401  (registers the carved architecture with the Auto classes)
from cmoe.checks import DTYPE_NAMES, check_device_name, check_dtype_name
from cmoe.errors import CmoeError
from cmoe.io.carved import check_carved_checkpoint
from cmoe.io.lazy import LazyWeights, lazy_weights

GATED_MLP_PARTS = ("gate_proj", "up_proj", "down_proj")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a local directory or hub id, plus the GGUF file name if any."""

    location: str
    gguf_file: str | None = None

    @property
    def is_local(self) -> bool:
        return Path(self.location).is_dir()

    @property
    def description(self) -> str:
        return os.path.join(self.location, self.gguf_file) if self.gguf_file else self.location

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_source(spec: str) -> ModelSource:
    """Map the user's MODEL argument to a source, or fail with one line if it is a missing path."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CmoeError(f"{spec}: expected a model directory, a hub id or a .gguf file")
        return ModelSource(str(path.resolve().parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CmoeError(f"{spec}: no config.json in this directory (is it a Hugging Face model?)")
        return ModelSource(str(path.resolve()))
    if spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or not _HUB_ID.match(spec):
        raise CmoeError(f"{spec}: no such file or directory")
    if len(path.parts) > 1 and Path(path.parts[0]).is_dir():
        # `out/ts-S3A3E8` where ./out exists is a local path that is missing, not a hub id to retry.
        raise CmoeError(f"{spec}: no such file or directory (./{path.parts[0]} exists; hub ids are OWNER/NAME)")
    return ModelSource(spec)


def load_config(source: ModelSource) -> PreTrainedConfig:
    try:
        return AutoConfig.from_pretrained(source.location, **source.kwargs())
    except OSError as error:
        raise CmoeError(f"cannot load the config of {source.description}: {_first_line(error)}") from error
    except (ValueError, KeyError) as error:
        raise CmoeError(f"{source.description}: unsupported model config: {_first_line(error)}") from error


def load_tokenizer(source: ModelSource):
    try:
        return AutoTokenizer.from_pretrained(source.location, **source.kwargs())
    except (OSError, ValueError, KeyError) as error:
        raise CmoeError(f"cannot load the tokenizer of {source.description}: {_first_line(error)}") from error


def text_config_of(config: PreTrainedConfig) -> PreTrainedConfig:
    return getattr(config, "text_config", None) or config


def is_carved(config: PreTrainedConfig) -> bool:
    return getattr(config, "model_type", "") == "cmoe"


def is_gated_mlp(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Linear) for name in GATED_MLP_PARTS)


def check_decoder_stack(config: PreTrainedConfig, description: str, gated: bool = True) -> None:
    """Fail unless the model has decoder layers at `model.layers` (what the layer runner drives) and, with
    `gated`, every one a gated MLP with gate_proj/up_proj/down_proj (what carving splits).

    The model is built on the meta device, so this costs no memory and reads no weights.
    """
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as error:
        raise CmoeError(f"{description}: not a causal LM that transformers can build: {_first_line(error)}") from error
    layers = getattr(getattr(skeleton, "model", None), "layers", None)
    expected = "decoder layers at model.layers with a gated MLP (mlp.gate_proj, mlp.up_proj, mlp.down_proj)"
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise CmoeError(
            f"{description} ({config.model_type}): expected {expected if gated else 'decoder layers at model.layers'}"
        )
    for index, layer in enumerate(layers if gated else ()):
        if not is_gated_mlp(getattr(layer, "mlp", None)):
            raise CmoeError(f"{description} ({config.model_type}): layer {index} has no gated MLP; expected {expected}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device_name(name)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CmoeError(f"--device {name}: no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, config: PreTrainedConfig) -> torch.dtype:
    """`auto`: float32 on the CPU (fast and exact), the checkpoint's dtype (or bfloat16) on a GPU."""
    check_dtype_name(name)
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    stored = getattr(text_config_of(config), "dtype", None) or getattr(config, "dtype", None)
    if isinstance(stored, str):
        stored = DTYPES.get(stored)
    return stored if stored in (torch.bfloat16, torch.float16) else torch.bfloat16


def load_model(source: ModelSource, dtype: torch.dtype) -> nn.Module:
    """Load weights on the CPU; the runner moves one layer at a time to the compute device."""
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **source.kwargs())
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise CmoeError(f"cannot load {source.description}: {_first_line(error)}") from error
    return model.eval()


def load_layerwise(prepared: "PreparedModel") -> tuple[nn.Module, LazyWeights | None]:
    """The model for a layer-by-layer pipeline: its decoder layers read one at a time from a safetensors
    checkpoint whose tensors are the model's own (with the lazy weights that read them), else whole (a
    GGUF file, `.bin` weights, tensors `from_pretrained` converts)."""
    source = prepared.source
    weights = lazy_weights(source.location, source.gguf_file, prepared.dtype)
    model = weights.skeleton(prepared.config) if weights is not None else None
    if model is None:
        return load_model(source, prepared.dtype), None
    return model, weights


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@dataclass(frozen=True)
class PreparedModel:
    """A model checked before any weight is read: where it comes from, its config, where and how it runs."""

    source: ModelSource
    config: PreTrainedConfig
    device: torch.device
    dtype: torch.dtype


def prepare_model(model: str, device: str, dtype: str, kind: str = "any") -> PreparedModel:
    """Resolve and check MODEL for a command: `kind` is "dense" (a model to carve: gated MLPs, not carved),
    "carved" (a cmoe model) or "any" (anything with a LLaMA-style decoder stack, e.g. an exported
    Qwen2-MoE). Reads the config only."""
    source = resolve_source(model)
    config = load_config(source)
    if kind == "dense" and is_carved(config):
        raise CmoeError(f"{model}: already a carved model; pass the dense model")
    if kind == "carved" and not is_carved(config):
        raise CmoeError(
            f"{model}: not a carved model (model_type {config.model_type!r}); carve it first with `cmoe carve`"
        )
    if not is_carved(config):
        check_decoder_stack(config, source.description, gated=kind == "dense")
    elif source.is_local:
        check_carved_checkpoint(Path(source.location), config)
    compute_device = resolve_device(device)
    return PreparedModel(source, config, compute_device, resolve_dtype(dtype, compute_device, config))


def estimated_weight_bytes(config: PreTrainedConfig, dtype: torch.dtype) -> int:
    """Bytes of a LLaMA-style model's weights in `dtype` (a carve's output is within a few percent of
    it: the same neurons, plus small routers), computed from the config before any weight is read."""
    text = text_config_of(config)
    hidden, layers = text.hidden_size, text.num_hidden_layers
    head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
    heads, kv_heads = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * text.intermediate_size
    embeddings = text.vocab_size * hidden * (1 if getattr(text, "tie_word_embeddings", False) else 2)
    parameters = embeddings + layers * (attention + mlp + 2 * hidden) + hidden
    return parameters * torch.empty((), dtype=dtype).element_size()


def check_seqlen(seqlen: int, config: PreTrainedConfig) -> None:
    """Windows of `seqlen` tokens must predict something and fit the model's positions."""
    limit = getattr(text_config_of(config), "max_position_embeddings", None)
    if seqlen < 2:
        raise CmoeError(f"--seqlen {seqlen}: must be at least 2")
    if limit and seqlen > limit:
        raise CmoeError(f"--seqlen {seqlen}: above the model's maximum of {limit} positions")


def load_pretrained(model: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """(model, tokenizer) of a dense or carved MODEL (a directory, a hub id or a .gguf file), on the CPU."""
    source = resolve_source(model)
    return load_model(source, dtype), load_tokenizer(source)
