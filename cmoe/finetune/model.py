"""The carved model as `cmoe finetune` trains it: loading, LoRA adapters and the trainable router
parameters, the optimizer's parameter groups, and the merge back into a plain carved model."""

import importlib.util
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedConfig

from cmoe.errors import CmoeError
from cmoe.finetune.recipe import FinetuneOptions
from cmoe.io.carved import carved_config
from cmoe.io.loading import (
    ModelSource,
    PreparedModel,
    is_carved,
    load_config,
    load_model,
    resolve_source,
    text_config_of,
)
from cmoe.io.recipe_file import has_recipe, read_recipe
from cmoe.modeling.modeling_cmoe import finetuned_router_parameters

# CMoE's LoRA targets: attention q/k/v/o and the gate/up/down of every expert (routed and shared) and of
# any layer left dense; the routers' own projections are not adapted.
LORA_TARGETS = (
    r".*\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)"
    r"|mlp\.((experts\.\d+|shared)\.)?(gate_proj|up_proj|down_proj))"
)


def carved_record(source: ModelSource) -> dict:
    """The carve's record saved with a local carved model ({} for a hub model, which has none here)."""
    return read_recipe(source.location) if has_recipe(source.location) else {}


def reference_source(reference: str | None, carved: ModelSource, needed_by: str) -> ModelSource:
    """The dense model that the dynamic mixture's losses aim at and that --distill learns from (`needed_by`
    names the option, for the error): --reference, or the carved model's source when that is a local path."""
    if reference is None:
        source_model = carved_record(carved).get("source_model")
        if not source_model or not Path(source_model).exists():
            raise CmoeError(f"{needed_by} needs the dense model: pass --reference DENSE_MODEL")
        reference = source_model
    source = resolve_source(reference)
    if is_carved(load_config(source)):
        raise CmoeError(f"--reference {reference}: expected the dense model, got a carved one")
    return source


def check_teacher(teacher: ModelSource, carved: PreTrainedConfig) -> None:
    """--distill compares next-token distributions position by position: the vocabularies must agree
    (read from the configs, before any weight)."""
    theirs, ours = text_config_of(load_config(teacher)).vocab_size, text_config_of(carved).vocab_size
    if theirs != ours:
        raise CmoeError(
            f"--distill: the teacher {teacher.description} has a vocabulary of {theirs} tokens, the carved model {ours}"
        )


def load_teacher(teacher: ModelSource, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The dense model --distill learns from, whole on the training device in the training dtype, frozen in
    eval mode (no dropout: its logits are a fixed target)."""
    model = load_model(teacher, dtype).to(device)
    model.config.use_cache = False
    return model.requires_grad_(False)


def mixed_precision(device: torch.device, dtype: torch.dtype) -> str:
    """Autocast in the checkpoint's half precision on a GPU; plain fp32 arithmetic on the CPU."""
    if device.type != "cuda":
        return "no"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def load_for_training(prepared: PreparedModel, device: torch.device, grad_checkpointing: bool) -> nn.Module:
    """The carved model in its dtype, without KV cache, with flash-attn on a GPU when it is installed."""
    extra = {}
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        extra["attn_implementation"] = "flash_attention_2"
    location = prepared.source.location
    config = carved_config(location)
    model = AutoModelForCausalLM.from_pretrained(location, config=config, dtype=prepared.dtype, **extra)
    model.config.use_cache = False
    if grad_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def with_trainable_parameters(model: nn.Module, options: FinetuneOptions) -> nn.Module:
    """LoRA adapters (or every weight with --full), plus with --train-router what each router declares
    trainable (the scale u; a noisy top-k gate's own weights); trainable tensors in fp32."""
    if not options.full:
        lora = LoraConfig(
            r=options.lora_r,
            lora_alpha=options.lora_alpha,
            lora_dropout=options.lora_dropout,
            target_modules=LORA_TARGETS,
            bias="none",
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():  # peft calls a transformers property that is deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, lora)
    router = {id(parameter) for parameter in finetuned_router_parameters(model)}
    for parameter in model.parameters():
        if id(parameter) in router:
            parameter.requires_grad_(options.train_router)
        elif options.full:
            parameter.requires_grad_(True)
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    return model


def param_groups(model: nn.Module, options: FinetuneOptions) -> list[dict]:
    """The adapters (or all weights) at --lr and the router parameters at --router-lr."""
    router = {id(parameter) for parameter in finetuned_router_parameters(model)}
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    weights = [parameter for parameter in trainable if id(parameter) not in router]
    routers = [parameter for parameter in trainable if id(parameter) in router]
    groups = [{"params": weights, "lr": options.lr}] if weights else []
    if routers:
        groups.append({"params": routers, "lr": options.router_lr})
    return groups


def merged_model(model: nn.Module, prepared: PreparedModel, options: FinetuneOptions, accelerator) -> nn.Module | None:
    """The trained weights as a plain carved model in the checkpoint's dtype on the main process (None on
    the others). The full state dict is gathered through accelerate, since under FSDP each process holds
    only a shard, and loaded into a fresh copy whose LoRA is then folded into the weights."""
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    fresh = load_for_training(prepared, accelerator.device, grad_checkpointing=False)
    fresh = with_trainable_parameters(fresh, options)
    fresh.load_state_dict(state)
    if not options.full:
        fresh = fresh.merge_and_unload()
    for parameter in fresh.parameters():
        parameter.requires_grad_(False)
    fresh.config.use_cache = True
    return fresh.to(accelerator.device, prepared.dtype).eval()
