"""Light recovery training of a carved model: CMoE's LoRA recipe plus LLaMA-MoE's domain mixtures.

The loop runs through `accelerate`, so the same code trains on the CPU, one GPU, or many GPUs under
`accelerate launch` (data parallel or FSDP). Numerics (the balancing sign rule, step counts, load
fractions) are small pure functions; the rest moves tensors and files.
"""

import importlib.util
import json
import math
import os
import random
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cmoe.artifacts import (
    StageTimer,
    atomic_output,
    check_output_path,
    command_line,
    versions,
)
from cmoe.calibration import evaluation_windows, load_text, tokenize_text
from cmoe.carved_io import RECIPE_FILE, carved_config, save_carved
from cmoe.commands import _check_seqlen
from cmoe.errors import CmoeError
from cmoe.loading import (
    ModelSource,
    is_carved,
    load_config,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_source,
)
from cmoe.mixture import (
    MIXTURES,
    DataSpec,
    draw_sample,
    dynamic_weights,
    normalized_weights,
    parse_data_spec,
)
from cmoe.modeling_cmoe import CMoEBlock, finetuned_router_parameters

# CMoE's LoRA targets: attention q/k/v/o and the gate/up/down of every expert (routed and shared) and of
# any layer left dense; the routers' own projections are not adapted.
LORA_TARGETS = (
    r".*\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)"
    r"|mlp\.((experts\.\d+|shared)\.)?(gate_proj|up_proj|down_proj))"
)
CHECKPOINT_PREFIX = "step-"
PROBE_WINDOWS = 8


@dataclass(frozen=True)
class FinetuneOptions:
    """Every training choice; the defaults are the CMoE paper's (LoRA on 2,048 windows of 2,048 tokens)."""

    nsamples: int = 2048
    seqlen: int = 2048
    seed: int = 0
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 2
    grad_accum: int = 1
    lr: float = 5.95e-5
    router_lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    full: bool = False
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    train_router: bool = True
    bias_speed: float = 1e-3
    balance_coef: float = 0.01
    grad_checkpointing: bool = False
    mixture: str = "static"
    mixture_every: int = 50
    heldout_windows: int = 4
    eval_every: int = 0
    eval_windows: int = 8
    checkpoint_every: int = 100

    def check(self) -> None:
        at_least_one = {
            "--nsamples": self.nsamples, "--epochs": self.epochs, "--batch-size": self.batch_size,
            "--grad-accum": self.grad_accum, "--mixture-every": self.mixture_every, "--lora-r": self.lora_r,
            "--eval-windows": self.eval_windows, "--heldout-windows": self.heldout_windows,
        }
        for option, value in at_least_one.items():
            if value < 1:
                raise CmoeError(f"{option} {value}: must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise CmoeError(f"--max-steps {self.max_steps}: must be at least 1")
        for option, value in {"--lr": self.lr, "--router-lr": self.router_lr}.items():
            if not value > 0:
                raise CmoeError(f"{option} {value}: must be positive")
        not_negative = {
            "--bias-speed": self.bias_speed, "--balance-coef": self.balance_coef, "--eval-every": self.eval_every,
            "--checkpoint-every": self.checkpoint_every,
        }
        for option, value in not_negative.items():
            if value < 0:
                raise CmoeError(f"{option} {value}: must not be negative")
        if not 0 <= self.lora_dropout < 1:
            raise CmoeError(f"--lora-dropout {self.lora_dropout}: must be in [0, 1)")
        if self.mixture not in MIXTURES:
            raise CmoeError(f"--mixture {self.mixture}: expected one of {', '.join(MIXTURES)}")

    def resume_key(self) -> dict:
        """The options a resumed run must share with the run it continues (stopping and evaluation may differ)."""
        free = {"max_steps", "eval_every", "eval_windows", "checkpoint_every"}
        return {item.name: _plain(getattr(self, item.name)) for item in fields(self) if item.name not in free}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


@dataclass
class TrainingState:
    """Everything besides weights, optimizer and RNG that a resumed run needs (checkpointed by accelerate)."""

    resume_key: dict = field(default_factory=dict)
    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    mixture_weights: list = field(default_factory=list)
    mixture_history: list = field(default_factory=list)
    reference_losses: list | None = None
    loss_curve: list = field(default_factory=list)
    eval_curve: list = field(default_factory=list)
    load_before: list = field(default_factory=list)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)


@dataclass(frozen=True)
class StepReport:
    """What the progress bar shows after each optimizer step."""

    step: int
    total: int
    loss: float
    tokens_per_second: float
    balance_loss: float | None = None


StepCallback = Callable[[StepReport], None]


def balancing_direction(loads: torch.Tensor) -> torch.Tensor:
    """Direction of DeepSeek-V3's auxiliary-loss-free balancing step on the bias b: +1 for experts below
    the mean load, -1 above it, 0 at it (the caller scales it by --bias-speed). Invariant to scaling the
    loads, so it does not matter how many processes or micro-batches counted them."""
    loads = loads.to(torch.float64)
    return torch.sign(loads.mean() - loads)


def planned_steps(nsamples: int, epochs: int, samples_per_step: int) -> int:
    return math.ceil(nsamples * epochs / samples_per_step)


def load_fractions(counts: torch.Tensor) -> list[float]:
    """Share of routed assignments per expert."""
    total = counts.sum().item()
    return [round(count / total, 6) if total else 0.0 for count in counts.tolist()]


def sample_position(seed: int, index: int, nsamples: int) -> int:
    """Which of the epoch's `nsamples` draws sample `index` is: every epoch revisits the same draws in
    its own seeded order."""
    epoch, offset = divmod(index, nsamples)
    return _epoch_order(seed, epoch, nsamples)[offset]


@lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, nsamples: int) -> tuple[int, ...]:
    order = list(range(nsamples))
    random.Random(f"cmoe-epoch:{seed}:{epoch}").shuffle(order)
    return tuple(order)


class RoutingMeter:
    """Forward hooks on every CMoE router: token counts per expert and any `balance_loss` a router sets.

    Only counts while `active`, so evaluation passes and gradient-checkpointing recomputation during the
    backward pass are not counted twice.
    """

    def __init__(self, model: nn.Module):
        self.routers = [module.router for module in model.modules() if isinstance(module, CMoEBlock)]
        self.counts = [torch.zeros(router.bias.numel(), dtype=torch.long) for router in self.routers]
        self.balance_losses: list[torch.Tensor] = []
        self.active = False
        self._handles = [router.register_forward_hook(self._hook(index)) for index, router in enumerate(self.routers)]

    def _hook(self, index: int):
        def record(module: nn.Module, args, routing) -> None:
            if not self.active:
                return
            counts = torch.bincount(routing.indices.reshape(-1), minlength=self.counts[index].numel())
            self.counts[index] = self.counts[index].to(counts.device) + counts
            balance_loss = getattr(module, "balance_loss", None)
            if isinstance(balance_loss, torch.Tensor):
                self.balance_losses.append(balance_loss)

        return record

    def take_balance_loss(self) -> torch.Tensor | None:
        losses, self.balance_losses = self.balance_losses, []
        return torch.stack([loss.float() for loss in losses]).sum() if losses else None

    def take_counts(self) -> list[torch.Tensor]:
        counts = self.counts
        self.counts = [torch.zeros_like(count) for count in counts]
        return counts

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class _Domain:
    spec: DataSpec
    description: dict
    train_tokens: torch.Tensor
    heldout: torch.Tensor | None


@dataclass
class _Inputs:
    """Everything validated and loaded before the heavy work starts."""

    source: ModelSource
    carved_recipe: dict
    device: torch.device
    dtype: torch.dtype
    tokenizer: object
    domains: list[_Domain]
    weights: list[float]
    eval_windows: torch.Tensor | None
    eval_description: dict | None
    reference: ModelSource | None
    checkpoint: Path | None


def checkpoint_root(output: Path) -> Path:
    """Checkpoints live next to the output (`OUT.checkpoints/`), never inside the atomically written output."""
    return output.with_name(f"{output.name}.checkpoints")


def latest_checkpoint(root: Path) -> Path | None:
    found = sorted(path for path in root.glob(f"{CHECKPOINT_PREFIX}*") if path.is_dir()) if root.is_dir() else []
    return found[-1] if found else None


def run_finetune(
    carved: str,
    data: list[str],
    output: Path,
    options: FinetuneOptions = FinetuneOptions(),
    eval_data: str | None = None,
    reference: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
    resume: bool = False,
    on_step: StepCallback | None = None,
) -> dict | None:
    """Fine-tune a carved model and write a carved-model directory of the same format, atomically.

    The recipe (`finetune` key of `cmoe_recipe.json`) holds the resolved options, data, seeds, versions,
    timings, the loss and evaluation curves, the mixture weights over time and the routing load before and
    after. Returns that recipe on the main process, None on the others of a multi-process run.
    """
    started = time.perf_counter()
    timer = StageTimer()
    with timer.stage("load_data"):
        inputs = _validated_inputs(carved, data, output, options, eval_data, reference, device, dtype, overwrite, resume)
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    # Experts that no token picked in a micro-batch leave their adapters without gradient: DDP must allow it.
    unused = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(cpu=inputs.device.type == "cpu", mixed_precision=_mixed_precision(inputs.device, inputs.dtype),
                              kwargs_handlers=[unused])
    root = checkpoint_root(output)
    if inputs.checkpoint is None and root.exists() and accelerator.is_main_process:
        shutil.rmtree(root)
    with timer.stage("load_model"):
        model = _load_carved_for_training(inputs, options, accelerator.device)
    set_seed(options.seed)
    model = _trainable(model, options)
    meter = RoutingMeter(model)
    optimizer = torch.optim.Adam(_param_groups(model, options), betas=options.betas)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainingState(resume_key=options.resume_key(), mixture_weights=list(inputs.weights))
    accelerator.register_for_checkpointing(state)
    samples_per_step = options.batch_size * options.grad_accum * accelerator.num_processes
    total_steps = planned_steps(options.nsamples, options.epochs, samples_per_step)
    probe = _probe_windows(inputs, options)
    if inputs.checkpoint is not None:
        with timer.stage("checkpoint"):
            accelerator.load_state(str(inputs.checkpoint))
    else:
        _measure_start(model, meter, probe, inputs, options, state, accelerator, timer)
        set_seed(options.seed)
    last_step = min(total_steps, options.max_steps or total_steps)
    model.train()
    while state.step < last_step:
        if options.mixture == "dynamic" and state.step and state.step % options.mixture_every == 0:
            with timer.stage("mixture"):
                _reweight(model, inputs, options, state, accelerator)
        step_started = time.perf_counter()
        loss, balance_loss = _train_step(model, optimizer, meter, inputs, options, state, accelerator)
        state.train_seconds += time.perf_counter() - step_started
        state.step += 1
        state.tokens += samples_per_step * options.seqlen
        point = {"step": state.step, "loss": loss, "tokens": state.tokens}
        state.loss_curve.append(point if balance_loss is None else {**point, "balance_loss": balance_loss})
        if on_step is not None and accelerator.is_main_process:
            on_step(StepReport(state.step, last_step, loss, state.tokens / max(state.train_seconds, 1e-9), balance_loss))
        if options.eval_every and inputs.eval_windows is not None and state.step % options.eval_every == 0:
            with timer.stage("eval"):
                state.eval_curve.append(_evaluation(model, inputs.eval_windows, options, accelerator, state.step))
        stopping = state.step == last_step and last_step < total_steps
        if stopping or (options.checkpoint_every and state.step % options.checkpoint_every == 0 and state.step < total_steps):
            with timer.stage("checkpoint"):
                _save_checkpoint(accelerator, root, state.step)
    meter.remove()
    with timer.stage("merge"):
        merged = _merged(model, inputs, options, accelerator)
    del model, optimizer
    accelerator.free_memory()
    if accelerator.is_main_process:
        final = RoutingMeter(merged)
        load_after = _routing_load(merged, final, probe, accelerator)
        final.remove()
        if inputs.eval_windows is not None:
            if state.eval_curve and state.eval_curve[-1]["step"] == state.step:
                state.eval_curve.pop()
            with timer.stage("eval"):
                state.eval_curve.append(_evaluation(merged, inputs.eval_windows, options, accelerator, state.step))
        recipe = _recipe(inputs, options, state, accelerator, total_steps, load_after, timer, started)
        with atomic_output(output, overwrite) as staging:
            with timer.stage("save"):
                save_carved(merged, inputs.tokenizer, staging, recipe)
                with (staging / "README.md").open("a") as card:
                    card.write(finetune_card(recipe["finetune"]))
        if state.step >= total_steps and root.exists():
            shutil.rmtree(root)
    accelerator.wait_for_everyone()
    return recipe if accelerator.is_main_process else None


def _measure_start(model, meter: RoutingMeter, probe: torch.Tensor, inputs: _Inputs, options: FinetuneOptions,
                   state: TrainingState, accelerator, timer: StageTimer) -> None:
    """What a fresh run records before its first step: routing load, initial mixture, the dense model's
    per-domain losses (dynamic mixture) and the starting perplexity. None of it draws random numbers."""
    state.load_before = _routing_load(model, meter, probe, accelerator)
    state.mixture_history.append({"step": 0, "weights": list(state.mixture_weights)})
    if options.mixture == "dynamic":
        with timer.stage("reference"):
            state.reference_losses = _reference_losses(inputs, options, accelerator)
    if inputs.eval_windows is not None:
        with timer.stage("eval"):
            state.eval_curve.append(_evaluation(model, inputs.eval_windows, options, accelerator, 0))


def _validated_inputs(carved, data, output, options, eval_data, reference, device_name, dtype_name, overwrite, resume) -> _Inputs:
    options.check()
    check_output_path(output, overwrite)
    checkpoint = _checkpoint_to_resume(output, options, overwrite, resume)
    source = resolve_source(carved)
    config = load_config(source)
    if not is_carved(config):
        raise CmoeError(f"{carved}: not a carved model (model_type {config.model_type!r}); carve it first with `cmoe carve`")
    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name, device, config)
    _check_seqlen(options.seqlen, config)
    specs = [parse_data_spec(spec) for spec in data]
    weights = normalized_weights([spec.weight for spec in specs])
    reference_source = _reference_source(reference, source, options) if options.mixture == "dynamic" else None
    tokenizer = load_tokenizer(source)
    reserved = options.heldout_windows * options.seqlen if options.mixture == "dynamic" else 0
    domains = [_domain(spec, tokenizer, options.seqlen, reserved) for spec in specs]
    eval_windows = eval_description = None
    if eval_data is not None:
        text = load_text(eval_data, split="test")
        eval_windows = evaluation_windows(tokenize_text(text.text, tokenizer), options.seqlen, options.eval_windows)
        eval_description = {**text.description, "windows": eval_windows.shape[0], "seqlen": options.seqlen}
    recipe_path = Path(source.location) / RECIPE_FILE
    carved_recipe = _read_json(recipe_path) if recipe_path.is_file() else {}
    return _Inputs(source, carved_recipe, device, dtype, tokenizer, domains, weights, eval_windows, eval_description,
                   reference_source, checkpoint)


def _checkpoint_to_resume(output: Path, options: FinetuneOptions, overwrite: bool, resume: bool) -> Path | None:
    root = checkpoint_root(output)
    latest = latest_checkpoint(root)
    if not resume:
        if latest is not None and not overwrite:
            raise CmoeError(f"{root} holds checkpoints of an earlier run: pass --resume to continue it or --overwrite to start over")
        return None
    if latest is None:
        raise CmoeError(f"--resume: no checkpoint in {root}")
    saved = torch.load(latest / "custom_checkpoint_0.pkl", weights_only=True)
    differing = sorted(name for name, value in options.resume_key().items() if saved["resume_key"].get(name) != value)
    if differing:
        raise CmoeError(f"--resume: {latest} was made with different options ({', '.join(differing)}); use the same options")
    return latest


def _reference_source(reference: str | None, carved: ModelSource, options: FinetuneOptions) -> ModelSource:
    """The dense model whose per-domain losses the dynamic mixture aims at: --reference, or the carved
    model's source when that is a local path."""
    if reference is None:
        recipe_path = Path(carved.location) / RECIPE_FILE
        source_model = _read_json(recipe_path).get("source_model") if recipe_path.is_file() else None
        if not source_model or not Path(source_model).exists():
            raise CmoeError("--mixture dynamic needs the dense model: pass --reference DENSE_MODEL")
        reference = source_model
    source = resolve_source(reference)
    if is_carved(load_config(source)):
        raise CmoeError(f"--reference {reference}: expected the dense model, got a carved one")
    return source


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _domain(spec: DataSpec, tokenizer, seqlen: int, reserved: int) -> _Domain:
    """A source tokenised once; with a dynamic mixture its last `reserved` tokens are held out for losses."""
    text = load_text(spec.source, split="train")
    tokens = tokenize_text(text.text, tokenizer)
    needed = seqlen + reserved
    if tokens.numel() < needed:
        what = f"one window of {seqlen}" + (f" plus {reserved} held-out tokens" if reserved else "")
        raise CmoeError(f"{spec.source}: {tokens.numel()} tokens, fewer than {what}: use a longer text or a smaller --seqlen")
    train_tokens = tokens[: tokens.numel() - reserved] if reserved else tokens
    heldout = tokens[-reserved:].reshape(-1, seqlen) if reserved else None
    description = {**text.description, "weight": spec.weight, "tokens": int(tokens.numel()), "train_tokens": int(train_tokens.numel())}
    return _Domain(spec, description, train_tokens, heldout)


def _mixed_precision(device: torch.device, dtype: torch.dtype) -> str:
    """Autocast in the checkpoint's half precision on a GPU; plain fp32 arithmetic on the CPU."""
    if device.type != "cuda":
        return "no"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def _load_carved_for_training(inputs: _Inputs, options: FinetuneOptions, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    import cmoe  # noqa: F401  (registers the carved architecture with the Auto classes)

    extra = {}
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        extra["attn_implementation"] = "flash_attention_2"
    model = AutoModelForCausalLM.from_pretrained(inputs.source.location, config=carved_config(inputs.source.location),
                                                 dtype=inputs.dtype, **extra)
    model.config.use_cache = False
    if options.grad_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def _trainable(model: nn.Module, options: FinetuneOptions) -> nn.Module:
    """LoRA adapters (or every weight with --full), plus with --train-router what each router declares
    trainable (the scale u; a noisy top-k gate's own weights); trainable tensors in fp32."""
    if not options.full:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                          target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM")
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


def _param_groups(model: nn.Module, options: FinetuneOptions) -> list[dict]:
    router = {id(parameter) for parameter in finetuned_router_parameters(model)}
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    weights = [parameter for parameter in trainable if id(parameter) not in router]
    routers = [parameter for parameter in trainable if id(parameter) in router]
    groups = [{"params": weights, "lr": options.lr}] if weights else []
    if routers:
        groups.append({"params": routers, "lr": options.router_lr})
    return groups


def _sample_windows(inputs: _Inputs, options: FinetuneOptions, weights: list[float], first: int, count: int) -> tuple[torch.Tensor, list[int]]:
    lengths = [domain.train_tokens.numel() for domain in inputs.domains]
    windows, domains = [], []
    for index in range(first, first + count):
        position = sample_position(options.seed, index, options.nsamples)
        domain, start = draw_sample(options.seed, position, weights, lengths, options.seqlen)
        windows.append(inputs.domains[domain].train_tokens[start : start + options.seqlen])
        domains.append(domain)
    return torch.stack(windows), domains


def _probe_windows(inputs: _Inputs, options: FinetuneOptions) -> torch.Tensor:
    """The windows the routing load is measured on before and after: the first training draws."""
    return _sample_windows(inputs, options, inputs.weights, 0, min(PROBE_WINDOWS, options.nsamples))[0]


def _train_step(model, optimizer, meter: RoutingMeter, inputs: _Inputs, options: FinetuneOptions,
                state: TrainingState, accelerator) -> tuple[float, float | None]:
    """One optimizer step over `grad_accum` micro-batches, then the sign-rule update of every router bias.
    Returns the mean language-model loss and the mean summed balance loss (None when no router has one)."""
    step_losses, balance_losses = [], []
    first = state.step * options.batch_size * options.grad_accum * accelerator.num_processes
    for micro in range(options.grad_accum):
        slot = (micro * accelerator.num_processes + accelerator.process_index) * options.batch_size
        batch, _ = _sample_windows(inputs, options, state.mixture_weights, first + slot, options.batch_size)
        batch = batch.to(accelerator.device)
        meter.active = True
        with accelerator.autocast():
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        meter.active = False
        balance_loss = meter.take_balance_loss()
        total = loss
        if balance_loss is not None:
            total = loss + options.balance_coef * balance_loss
            balance_losses.append(balance_loss.detach())
        syncing = micro == options.grad_accum - 1
        with nullcontext() if syncing else accelerator.no_sync(model):
            accelerator.backward(total / options.grad_accum)
        step_losses.append(loss.detach().float())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _update_biases(meter, options.bias_speed, accelerator)
    mean_loss = accelerator.reduce(torch.stack(step_losses).mean(), reduction="mean")
    if not balance_losses:
        return float(mean_loss), None
    return float(mean_loss), float(accelerator.reduce(torch.stack(balance_losses).mean(), reduction="mean"))


@torch.no_grad()
def _update_biases(meter: RoutingMeter, speed: float, accelerator) -> None:
    for router, counts in zip(meter.routers, meter.take_counts()):
        loads = accelerator.reduce(counts.to(accelerator.device), reduction="sum")
        router.bias.add_(speed * balancing_direction(loads).to(router.bias.device, router.bias.dtype))


@torch.no_grad()
def _mean_nll(model: nn.Module, windows: torch.Tensor, batch_size: int, accelerator) -> float:
    """Mean next-token negative log-likelihood over `windows` (eval mode, no dropout, no RNG)."""
    return windows_nll(model, windows, batch_size, accelerator.device, accelerator.autocast)


@torch.no_grad()
def windows_nll(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device, autocast=nullcontext) -> float:
    """Mean next-token NLL of a whole-model forward, as training evaluates it (a reloaded model gives the
    same number bit for bit when it holds the same weights)."""
    was_training = model.training
    model.eval()
    total, predicted = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        with autocast():
            logits = model(input_ids=batch, use_cache=False).logits.float()
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        predicted += batch[:, 1:].numel()
    model.train(was_training)
    return total / predicted


def _evaluation(model, windows: torch.Tensor, options: FinetuneOptions, accelerator, step: int) -> dict:
    nll = _mean_nll(model, windows, options.batch_size, accelerator)
    return {"step": step, "mean_nll": nll, "perplexity": math.exp(nll)}


@torch.no_grad()
def _routing_load(model, meter: RoutingMeter, windows: torch.Tensor, accelerator) -> list[list[float]]:
    """Share of routed assignments per expert, per carved layer, on the probe windows."""
    meter.take_counts()
    meter.active = True
    _mean_nll(model, windows, 2, accelerator)
    meter.active = False
    meter.take_balance_loss()
    return [load_fractions(counts.cpu()) for counts in meter.take_counts()]


def _reference_losses(inputs: _Inputs, options: FinetuneOptions, accelerator) -> list[float]:
    """The dense model's loss on each domain's held-out windows, measured once."""
    dense = load_model(inputs.reference, inputs.dtype).to(accelerator.device)
    losses = [_mean_nll(dense, domain.heldout, options.batch_size, accelerator) for domain in inputs.domains]
    del dense
    return losses


def _reweight(model, inputs: _Inputs, options: FinetuneOptions, state: TrainingState, accelerator) -> None:
    losses = [_mean_nll(model, domain.heldout, options.batch_size, accelerator) for domain in inputs.domains]
    state.mixture_weights = dynamic_weights(state.mixture_weights, losses, state.reference_losses)
    state.mixture_history.append({"step": state.step, "losses": losses, "weights": list(state.mixture_weights)})


def _save_checkpoint(accelerator, root: Path, step: int) -> None:
    """Write `root/step-NNNNNN` through a temporary name, then drop older checkpoints: a crash while
    saving leaves the previous checkpoint intact."""
    final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
    staging = root / f".{final.name}.partial"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(staging, final)
        for older in root.glob(f"{CHECKPOINT_PREFIX}*"):
            if older != final:
                shutil.rmtree(older)
    accelerator.wait_for_everyone()


def _merged(model: nn.Module, inputs: _Inputs, options: FinetuneOptions, accelerator) -> nn.Module | None:
    """The trained weights as a plain carved model in the checkpoint's dtype on the main process (None on
    the others). The full state dict is gathered through accelerate, since under FSDP each process holds
    only a shard, and loaded into a fresh copy on the CPU whose LoRA is then folded into the weights."""
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    fresh = _trainable(_load_carved_for_training(inputs, replace(options, grad_checkpointing=False), accelerator.device), options)
    fresh.load_state_dict(state)
    if not options.full:
        fresh = fresh.merge_and_unload()
    for parameter in fresh.parameters():
        parameter.requires_grad_(False)
    fresh.config.use_cache = True
    return fresh.to(accelerator.device, inputs.dtype).eval()


def _recipe(inputs: _Inputs, options: FinetuneOptions, state: TrainingState, accelerator, total_steps: int,
            load_after: list, timer: StageTimer, started: float) -> dict:
    carved = dict(inputs.carved_recipe)
    timings = timer.rounded()
    timings["train"] = round(state.train_seconds, 3)
    timings["total_this_process"] = round(time.perf_counter() - started, 3)
    finetune = {
        "tool": "cmoe finetune",
        "carved_model": inputs.source.description,
        "command": command_line(),
        "options": {**asdict(options), "lora_targets": None if options.full else LORA_TARGETS},
        "defaults_source": "CMoE (Pei et al. 2025, arXiv 2502.04416) fine-tuning recipe; mixtures after LLaMA-MoE / Sheared-LLaMA",
        "data": [domain.description for domain in inputs.domains],
        "mixture": {"kind": options.mixture, "weights_over_time": state.mixture_history,
                    "reference_model": inputs.reference.description if inputs.reference else None,
                    "reference_losses": state.reference_losses},
        "eval_data": inputs.eval_description,
        "eval_curve": state.eval_curve,
        "loss_curve": state.loss_curve,
        "steps": state.step,
        "planned_steps": total_steps,
        "samples_per_step": options.batch_size * options.grad_accum * accelerator.num_processes,
        "tokens": state.tokens,
        "tokens_per_second": round(state.tokens / state.train_seconds, 2) if state.train_seconds else None,
        "routing_load_probe": f"the first {min(PROBE_WINDOWS, options.nsamples)} training windows",
        "routing_load_before": state.load_before,
        "routing_load_after": load_after,
        "resumed_from_checkpoint": str(inputs.checkpoint) if inputs.checkpoint else None,
        "processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "dtype": str(inputs.dtype).removeprefix("torch."),
        "mixed_precision": accelerator.mixed_precision,
        "seed": options.seed,
        "versions": {**versions(), **_training_versions()},
        "timings_s": timings,
    }
    carved["finetune"] = finetune
    return carved


def finetune_card(finetune: dict) -> str:
    """The model card's section on training: the carved card above it describes the model as carved."""
    options = finetune["options"]
    method = "every weight (--full)" if options["full"] else f"LoRA r {options['lora_r']} / alpha {options['lora_alpha']} (merged)"
    curve = finetune["eval_curve"]
    quality = f"perplexity on the eval data {curve[0]['perplexity']:.3f} -> {curve[-1]['perplexity']:.3f}; " if len(curve) > 1 else ""
    return f"""
## Fine-tuning
Fine-tuned with `cmoe finetune`: {method}, router scale u {'trained' if options['train_router'] else 'frozen'},
balancing bias b by the sign rule (speed {options['bias_speed']:g}); {finetune['steps']} steps, {finetune['tokens']}
tokens, {options['mixture']} mixture of {len(finetune['data'])} source(s), LR {options['lr']:g}, seed {options['seed']};
{quality}loss curve, routing load before/after and every option under `finetune` in `{RECIPE_FILE}`.
"""


def _training_versions() -> dict:
    from importlib import metadata

    found = {}
    for name in ("peft", "accelerate"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found
