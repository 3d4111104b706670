"""The export-format registry and what every format shares: the view of a carve, the checks (the model's
before any layer is written, each layer's as it is written), the attention and expert tensors.

A format turns a carved model into a standard MoE checkpoint that transformers, vLLM, SGLang and
llama.cpp load natively (no `auto_map`, no custom code). Exact means: the exported model computes the
carved one's logits (tests compare them in a process where cmoe cannot be imported).
"""

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from cmoe.errors import CmoeError
from cmoe.modeling.configuration_cmoe import MoELayerSpec
from cmoe.modeling.modeling_cmoe import CMoEBlock, LinearGateRouter
from cmoe.registry import Registry


@dataclass(frozen=True)
class ExportFormat:
    """A standard MoE architecture: its `model_type`, the gating rule it weights experts by, whether it
    holds a shared block, dense layers ("any", "leading" or "none"), a selection bias, and whether its
    engines need an explicit LM head even when the embeddings are tied; `config(view)` its config,
    `layer(view, index)` one decoder layer's tensors under its names, `extra_check(view)` what else it
    cannot hold."""

    model_type: str
    gating: str
    config: Callable[["CarvedView"], dict]
    layer: Callable[["CarvedView", int], dict[str, torch.Tensor]]
    shared_block: bool = True
    dense_layers: str = "any"
    selection_bias: bool = False
    untied_head: bool = False
    extra_check: Callable[["CarvedView"], None] = lambda view: None


EXPORT_FORMATS: Registry[ExportFormat] = Registry("export format", "--format")


@dataclass
class CarvedView:
    """A carved model as the exporters read it: its text config, one MoE spec per layer, its decoder layers
    and top modules. The layers may be read one at a time (only the one being written need hold weights),
    and the specs may be known before any block is built (a `--format` carve plans them up front)."""

    fmt: str
    text_config: object
    specs: list[MoELayerSpec | None]
    layers: nn.ModuleList
    embed_tokens: nn.Module
    norm: nn.Module
    lm_head: nn.Module

    @classmethod
    def of(cls, model: nn.Module, fmt: str, config=None) -> "CarvedView":
        """The view of a carved `model` (or of a LLaMA-style model being carved, with the carved `config`
        it will have: its modules are the ones the carve replaces MLP by MLP)."""
        config = config or model.config
        decoder = model.model
        return cls(
            fmt,
            config.text_config,
            config.layer_specs,
            decoder.layers,
            decoder.embed_tokens,
            decoder.norm,
            model.lm_head,
        )

    @property
    def spec(self) -> MoELayerSpec:
        return next(spec for spec in self.specs if spec is not None)

    @property
    def dense_layers(self) -> list[int]:
        return [index for index, spec in enumerate(self.specs) if spec is None]

    def refuse(self, why: str, fix: str) -> None:
        raise CmoeError(f"--format {self.fmt} cannot hold this carve: {why}; {fix}")


def check_exportable(view: CarvedView, fmt: ExportFormat) -> None:
    """Every reason, in one line with the option that fixes it, why `fmt` cannot hold a carve whose every
    layer is in memory."""
    check_model_exportable(view, fmt)
    for index in range(len(view.layers)):
        check_layer_exportable(view, fmt, index)


def check_model_exportable(view: CarvedView, fmt: ExportFormat) -> None:
    """The reasons `fmt` cannot hold the carve that its config and specs give (no weight read): run before
    any layer is written, so a refusal costs nothing."""
    text = view.text_config
    if getattr(text, "attention_bias", False) or getattr(text, "mlp_bias", False):
        view.refuse("the dense model has attention or MLP biases", "export a model without them")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if head_dim * text.num_attention_heads != text.hidden_size:
        view.refuse(
            f"head_dim {head_dim} x {text.num_attention_heads} heads is not the hidden size", "keep cmoe's format"
        )
    carved = [spec for spec in view.specs if spec is not None]
    if not carved:
        view.refuse("no layer is carved", "carve the model first")
    if any(spec != view.spec for spec in carved):
        view.refuse(
            "its layers differ (per-layer top-k or widths)", "carve with --budget uniform (one top-k for all layers)"
        )
    spec = view.spec
    if view.dense_layers and fmt.dense_layers == "none":
        view.refuse("it keeps dense layers", "carve every layer")
    if fmt.dense_layers == "leading" and view.dense_layers != list(range(len(view.dense_layers))):
        view.refuse("its dense layers are not all at the start", "carve every layer after the first dense ones")
    if spec.shared_size and not fmt.shared_block:
        view.refuse(f"it has a shared block of {spec.shared_size} neurons", "carve with S0 (no shared experts)")
    fmt.extra_check(view)


def check_layer_exportable(view: CarvedView, fmt: ExportFormat, index: int) -> None:
    """The reasons `fmt` cannot hold layer `index` as its weights are (router type, balancing bias, trained
    scale): run on each layer just before it is written."""
    block = view.layers[index].mlp
    if not isinstance(block, CMoEBlock):
        return
    spec = view.spec
    router = block.router
    if not isinstance(router, LinearGateRouter):
        view.refuse(
            f"its router is {spec.router}, which the format's linear gate cannot compute",
            "carve with --router linear-gate",
        )
    if bool(router.bias.any()) and not (fmt.selection_bias and spec.gating == fmt.gating):
        view.refuse(f"layer {index} has a balancing bias the format lacks", "fine-tune with --bias-speed 0")
    same_rule = spec.gating == fmt.gating
    if not same_rule and not (spec.top_k == 1 and not bool(router.bias.any())):
        view.refuse(
            f"its experts are weighted by the {spec.gating} rule at k={spec.top_k}",
            f"carve with --gating {fmt.gating}",
        )
    if spec.gating == "cmoe" and bool(router.scale.any()):
        view.refuse(f"layer {index}'s trained scale u has no place in the format", "fine-tune with --freeze-router")


def require_whole_shared_experts(view: CarvedView) -> None:
    """Formats that count shared experts (not neurons) need the shared block to be whole experts."""
    spec = view.spec
    if spec.shared_size % spec.expert_size:
        view.refuse(
            f"its shared block ({spec.shared_size} neurons) is not a whole number of experts of {spec.expert_size} "
            "(the d_h mod N leftovers joined it)",
            "choose a number of experts that divides the FFN width",
        )


def check_options_exportable(options, fmt_name: str) -> None:
    """Before carving with `--format`: the options' own reasons the format could not hold the result."""
    fmt = EXPORT_FORMATS.get(fmt_name)

    def refuse(why: str, fix: str) -> None:
        raise CmoeError(f"--format {fmt_name} cannot hold this carve: {why}; {fix}")

    if options.router != "linear-gate":
        refuse(f"--router {options.router} is not the format's linear gate", "pass --router linear-gate")
    if options.budget != "uniform":
        refuse("--budget adaptive gives each layer its own top-k", "pass --budget uniform")
    if options.active_per_layer:
        refuse("--budget-from gives each layer its own top-k", "carve without it")
    if options.shared_width != "uniform":
        refuse("--shared-width adaptive gives each layer its own shared block", "pass --shared-width uniform")
    if options.shape.shared and not fmt.shared_block:
        refuse(f"{options.shape.name} has shared experts", "carve with S0 (no shared experts)")
    if options.gating != fmt.gating and options.shape.active != 1:
        refuse(f"--gating {options.gating} at k={options.shape.active}", f"pass --gating {fmt.gating}")


def attention_tensors(layer: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A LLaMA decoder layer's attention and norms under the names LLaMA-derived formats share."""
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    tensors = {f"{prefix}.{name}.weight": getattr(layer.self_attn, name.split(".")[1]).weight for name in names}
    tensors[f"{prefix}.input_layernorm.weight"] = layer.input_layernorm.weight
    tensors[f"{prefix}.post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
    return tensors


def swiglu_tensors(mlp: nn.Module, prefix: str, names=("gate_proj", "up_proj", "down_proj")) -> dict[str, torch.Tensor]:
    """A SwiGLU MLP's gate/up/down weights under `prefix`, named as the format names them."""
    return {
        f"{prefix}.{name}.weight": getattr(mlp, part).weight
        for part, name in zip(("gate_proj", "up_proj", "down_proj"), names)
    }


def experts_tensors(block: nn.Module, prefix: str, shared_name: str = "shared_experts") -> dict[str, torch.Tensor]:
    """A carved block's routed experts (`PREFIX.experts.E.*`) and shared block (`PREFIX.SHARED_NAME.*`)."""
    tensors = {}
    for expert_index, expert in enumerate(block.experts):
        tensors.update(swiglu_tensors(expert, f"{prefix}.experts.{expert_index}"))
    if block.shared is not None:
        tensors.update(swiglu_tensors(block.shared, f"{prefix}.{shared_name}"))
    return tensors


def common_config(view: CarvedView) -> dict:
    """The config fields every LLaMA-derived MoE format takes from the dense text config."""
    text = view.text_config
    names = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_act",
        "max_position_embeddings",
        "rms_norm_eps",
        "initializer_range",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    )
    values = {name: getattr(text, name, None) for name in names}
    values["rope_parameters"] = dict(text.rope_parameters) if getattr(text, "rope_parameters", None) else None
    values["tie_word_embeddings"] = bool(text.tie_word_embeddings)
    return values
