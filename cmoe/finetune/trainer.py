"""Light recovery training of a carved model: CMoE's LoRA recipe plus LLaMA-MoE's domain mixtures.

`FinetuneRun` runs one recipe in four phases (setup, train with checkpoints, finish). The loop runs
through `accelerate`, so the same code trains on the CPU, one GPU, or many GPUs under `accelerate
launch` (data parallel or FSDP). Where each piece lives: the recipe and options in `recipe.py`, the
windows in `data.py`, the model's adapters and merge in `model.py`, the routers in `routing.py`,
checkpoints in `checkpoints.py`, the saved record and card in `record.py`, the arithmetic in
`cmoe.numerics.training`.
"""

import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed

from cmoe.finetune.checkpoints import (
    TrainingState,
    checkpoint_root,
    checkpoint_to_resume,
    latest_checkpoint,
    save_checkpoint,
)
from cmoe.finetune.data import load_eval_data, load_training_data
from cmoe.finetune.evaluation import evaluation_point, windows_nll
from cmoe.finetune.model import (
    carved_record,
    check_teacher,
    load_for_training,
    load_teacher,
    merged_model,
    mixed_precision,
    param_groups,
    reference_source,
    with_trainable_parameters,
)
from cmoe.finetune.recipe import FinetuneOptions, FinetuneRecipe, parse_data_spec
from cmoe.finetune.record import finetune_record
from cmoe.finetune.routing import RoutingMeter, routing_load, update_biases
from cmoe.io.artifacts import StageTimer, claimed_output
from cmoe.io.carved import save_carved
from cmoe.io.loading import check_seqlen, load_model, load_tokenizer, prepare_model
from cmoe.numerics.mixture import dynamic_weights
from cmoe.numerics.training import distillation_kl, planned_steps


@dataclass(frozen=True)
class StepReport:
    """What the progress bar shows after each optimizer step."""

    step: int
    total: int
    loss: float
    tokens_per_second: float
    balance_loss: float | None = None
    distill_loss: float | None = None


StepCallback = Callable[[StepReport], None]
DEFAULT_OPTIONS = FinetuneOptions()


class FinetuneRun:
    """One fine-tuning run of a recipe: `setup()` checks and loads everything (cheap checks first) and
    builds the model, optimizer and accelerator; `train()` takes the optimizer steps, saving a
    `checkpoint()` as asked; `finish()` merges, evaluates and writes the output atomically."""

    def __init__(
        self,
        recipe: FinetuneRecipe,
        output: Path,
        overwrite: bool = False,
        resume: bool = False,
        on_step: StepCallback | None = None,
    ):
        self.recipe = recipe
        self.options = recipe.options
        self.output = output
        self.overwrite = overwrite
        self.resume = resume
        self.on_step = on_step
        self.checkpoints = checkpoint_root(output)
        self.timer = StageTimer()
        self.started = time.perf_counter()

    def run(self) -> dict | None:
        """Claim the output first (the main process of a launch does), then setup, train and finish. A run
        stopped by --max-steps wrote its output: --resume may replace it."""
        if int(os.environ.get("RANK", "0")) != 0:
            return self._phases()
        with claimed_output(self.output, self.overwrite or self.resume) as self.slot:
            try:
                return self._phases()
            except BaseException:
                latest = latest_checkpoint(self.checkpoints)
                if latest is not None:
                    self.slot.kept = f"checkpoint kept at {latest} (continue with --resume)"
                raise

    def _phases(self) -> dict | None:
        self.setup()
        self.train()
        return self.finish()

    def setup(self) -> None:
        """Check and load every input, cheap checks first, so that a bad one fails in one line before any
        weight is read; then build the training objects and resume from the checkpoint or measure the start."""
        with self.timer.stage("load_data"):
            self._load_inputs()
        self._build_training()
        if self.resumed_from is not None:
            with self.timer.stage("checkpoint"):
                self.accelerator.load_state(str(self.resumed_from.path))
        else:
            self._measure_start()
            set_seed(self.options.seed)

    def _load_inputs(self) -> None:
        options = self.options
        self.resumed_from = checkpoint_to_resume(self.output, options, self.overwrite, self.resume)
        self.prepared = prepare_model(self.recipe.model, self.recipe.device, self.recipe.dtype, kind="carved")
        check_seqlen(options.seqlen, self.prepared.config)
        self.reference = None
        if options.reweights_mixture or options.distill:
            needed_by = "--mixture dynamic" if options.reweights_mixture else "--distill"
            self.reference = reference_source(self.recipe.reference, self.prepared.source, needed_by)
        if options.distill:
            check_teacher(self.reference, self.prepared.config)
        self.tokenizer = load_tokenizer(self.prepared.source)
        self.data = load_training_data(self.recipe.data, self.tokenizer, options)
        self.eval_data = None
        if self.recipe.eval_data is not None:
            self.eval_data = load_eval_data(self.recipe.eval_data, self.tokenizer, options.seqlen, options.eval_windows)
        self.carved_record = carved_record(self.prepared.source)

    def _build_training(self) -> None:
        """Accelerator, model with its adapters (seeded), --distill's teacher, routing meter, optimizer, state
        and step plan."""
        options = self.options
        # Experts that no token picked in a micro-batch leave their adapters without gradient: DDP must allow it.
        unused = DistributedDataParallelKwargs(find_unused_parameters=True)
        device, dtype = self.prepared.device, self.prepared.dtype
        self.accelerator = Accelerator(
            cpu=device.type == "cpu", mixed_precision=mixed_precision(device, dtype), kwargs_handlers=[unused]
        )
        if self.resumed_from is None and self.checkpoints.exists() and self.accelerator.is_main_process:
            shutil.rmtree(self.checkpoints)
        with self.timer.stage("load_model"):
            model = load_for_training(self.prepared, self.accelerator.device, options.grad_checkpointing)
        self.teacher = None
        if options.distill:
            with self.timer.stage("load_teacher"):
                self.teacher = load_teacher(self.reference, self.prepared.dtype, self.accelerator.device)
        set_seed(options.seed)
        model = with_trainable_parameters(model, options)
        self.meter = RoutingMeter(model)
        optimizer = torch.optim.Adam(param_groups(model, options), betas=options.betas)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.state = TrainingState(mixture_weights=self.recipe.mixture_weights())
        self.accelerator.register_for_checkpointing(self.state)
        self.samples_per_step = options.samples_per_step(self.accelerator.num_processes)
        self.planned_steps = planned_steps(options.nsamples, options.epochs, self.samples_per_step)
        self.last_step = min(self.planned_steps, options.max_steps or self.planned_steps)
        self.probe = self.data.probe_windows(self.recipe.mixture_weights())

    def train(self) -> None:
        options, state = self.options, self.state
        self.model.train()
        while state.step < self.last_step:
            if options.reweights_mixture and state.step and state.step % options.mixture_every == 0:
                with self.timer.stage("mixture"):
                    self._reweight()
            step_started = time.perf_counter()
            loss, balance_loss, distill_loss = self._train_step()
            state.train_seconds += time.perf_counter() - step_started
            state.step += 1
            state.tokens += self.samples_per_step * options.seqlen
            point = {"step": state.step, "loss": loss, "tokens": state.tokens}
            extra = {"balance_loss": balance_loss, "distill_loss": distill_loss}
            state.loss_curve.append({**point, **{name: value for name, value in extra.items() if value is not None}})
            if self.on_step is not None and self.accelerator.is_main_process:
                speed = state.tokens / max(state.train_seconds, 1e-9)
                self.on_step(StepReport(state.step, self.last_step, loss, speed, balance_loss, distill_loss))
            if options.eval_every and self.eval_data is not None and state.step % options.eval_every == 0:
                with self.timer.stage("eval"):
                    state.eval_curve.append(self._evaluation(self.model))
            stopping = state.step == self.last_step and self.last_step < self.planned_steps
            scheduled = options.checkpoint_every and state.step % options.checkpoint_every == 0
            if stopping or (scheduled and state.step < self.planned_steps):
                with self.timer.stage("checkpoint"):
                    self.checkpoint()
        self.meter.remove()

    def checkpoint(self) -> None:
        """Save the full training state (weights, optimizer, RNG, TrainingState) for --resume."""
        save_checkpoint(self.accelerator, self.checkpoints, self.state.step, self.options.resume_key())

    def finish(self) -> dict | None:
        """Merge the adapters, measure the routing load and the final perplexity, and write the fine-tuned
        carved model with its record. Returns the record on the main process, None on the others."""
        with self.timer.stage("merge"):
            merged = merged_model(self.model, self.prepared, self.options, self.accelerator)
        del self.model, self.optimizer, self.teacher
        self.accelerator.free_memory()
        record = None
        if self.accelerator.is_main_process:
            record = self._save(merged)
            if self.state.step >= self.planned_steps and self.checkpoints.exists():
                shutil.rmtree(self.checkpoints)
        self.accelerator.wait_for_everyone()
        return record

    def _save(self, merged: torch.nn.Module) -> dict:
        meter = RoutingMeter(merged)
        load_after = routing_load(merged, meter, self.probe, self.accelerator)
        meter.remove()
        state = self.state
        if self.eval_data is not None:
            if state.eval_curve and state.eval_curve[-1]["step"] == state.step:
                state.eval_curve.pop()
            with self.timer.stage("eval"):
                state.eval_curve.append(self._evaluation(merged))
        timings = self.timer.rounded()
        timings["train"] = round(state.train_seconds, 3)
        timings["total_this_process"] = round(time.perf_counter() - self.started, 3)
        record = dict(self.carved_record)
        record["finetune"] = finetune_record(
            self._portable_recipe(),
            self.prepared.source,
            self.data,
            self.eval_data,
            self.reference,
            state,
            self.planned_steps,
            self.samples_per_step,
            load_after,
            self.resumed_from,
            self.accelerator,
            str(self.prepared.dtype).removeprefix("torch."),
            timings,
        )
        with self.slot.staged() as staging, self.timer.stage("save"):
            save_carved(merged, self.tokenizer, staging, record)
        return record

    def _portable_recipe(self) -> FinetuneRecipe:
        """The recipe to replay this run: local paths absolute, and the dense model a dynamic mixture or
        --distill used."""
        portable = self.recipe.portable()
        return replace(portable, reference=self.reference.description) if self.reference else portable

    def _measure_start(self) -> None:
        """What a fresh run records before its first step: routing load, initial mixture, the dense model's
        per-domain losses (dynamic mixture) and the starting perplexity. None of it draws random numbers."""
        state = self.state
        state.load_before = routing_load(self.model, self.meter, self.probe, self.accelerator)
        state.mixture_history.append({"step": 0, "weights": list(state.mixture_weights)})
        if self.options.reweights_mixture:
            with self.timer.stage("reference"):
                state.reference_losses = self._reference_losses()
        if self.eval_data is not None:
            with self.timer.stage("eval"):
                state.eval_curve.append(self._evaluation(self.model))

    def _train_step(self) -> tuple[float, float | None, float | None]:
        """One optimizer step over `grad_accum` micro-batches, then the sign-rule update of every router bias.
        Returns the mean language-model loss, the mean summed balance loss (None when no router has one) and
        the mean distillation KL (None without --distill). With --distill W the step minimises
        (1 - W) * LM loss + W * KL(teacher || student); the teacher's logits are computed per micro-batch."""
        options, accelerator, meter = self.options, self.accelerator, self.meter
        step_losses, balance_losses, distill_losses = [], [], []
        first = self.state.step * self.samples_per_step
        for micro in range(options.grad_accum):
            slot = (micro * accelerator.num_processes + accelerator.process_index) * options.batch_size
            batch = self.data.windows(self.state.mixture_weights, first + slot, options.batch_size)
            batch = batch.to(accelerator.device)
            meter.active = True
            with accelerator.autocast():
                output = self.model(input_ids=batch, labels=batch, use_cache=False)
            meter.active = False
            balance_loss = meter.take_balance_loss()
            loss, total = output.loss, output.loss
            if self.teacher is not None:
                with torch.no_grad(), accelerator.autocast():
                    teacher_logits = self.teacher(input_ids=batch, use_cache=False).logits
                distill_loss = distillation_kl(output.logits, teacher_logits, options.distill_temperature)
                total = (1 - options.distill) * loss + options.distill * distill_loss
                distill_losses.append(distill_loss.detach())
            if balance_loss is not None:
                total = total + options.balance_coef * balance_loss
                balance_losses.append(balance_loss.detach())
            syncing = micro == options.grad_accum - 1
            with nullcontext() if syncing else accelerator.no_sync(self.model):
                accelerator.backward(total / options.grad_accum)
            step_losses.append(loss.detach().float())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_biases(meter, options.bias_speed, accelerator)
        return self._mean(step_losses), self._mean(balance_losses), self._mean(distill_losses)

    def _mean(self, losses: list[torch.Tensor]) -> float | None:
        """The mean over micro-batches and processes (None for a loss the step did not have)."""
        if not losses:
            return None
        return float(self.accelerator.reduce(torch.stack(losses).mean(), reduction="mean"))

    def _evaluation(self, model: torch.nn.Module) -> dict:
        windows, step = self.eval_data.windows, self.state.step
        return evaluation_point(model, windows, self.options.batch_size, self.accelerator, step)

    def _domain_losses(self, model: torch.nn.Module) -> list[float]:
        """Mean NLL on each domain's held-out windows."""
        return [
            windows_nll(
                model, domain.heldout, self.options.batch_size, self.accelerator.device, self.accelerator.autocast
            )
            for domain in self.data.domains
        ]

    def _reference_losses(self) -> list[float]:
        """The dense model's loss on each domain's held-out windows, measured once (by --distill's teacher
        when there is one, rather than a second copy)."""
        if self.teacher is not None:
            return self._domain_losses(self.teacher)
        dense = load_model(self.reference, self.prepared.dtype).to(self.accelerator.device)
        losses = self._domain_losses(dense)
        del dense
        return losses

    def _reweight(self) -> None:
        state = self.state
        losses = self._domain_losses(self.model)
        state.mixture_weights = dynamic_weights(state.mixture_weights, losses, state.reference_losses)
        state.mixture_history.append({"step": state.step, "losses": losses, "weights": list(state.mixture_weights)})


def finetune(
    recipe: FinetuneRecipe,
    output: Path,
    overwrite: bool = False,
    resume: bool = False,
    on_step: StepCallback | None = None,
) -> dict | None:
    """Fine-tune as `recipe` says and write a carved-model directory of the same format, atomically.

    The record (`finetune` key of `cmoe_recipe.yaml`) holds the replayable recipe, the resolved options,
    data, seeds, versions, timings, the loss and evaluation curves, the mixture weights over time and the
    routing load before and after. Returns the whole record on the main process, None on the others of a
    multi-process run.
    """
    return FinetuneRun(recipe, output, overwrite, resume, on_step).run()


def run_finetune(
    carved: str,
    data: list[str],
    output: Path,
    options: FinetuneOptions = DEFAULT_OPTIONS,
    eval_data: str | None = None,
    reference: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
    resume: bool = False,
    on_step: StepCallback | None = None,
) -> dict | None:
    """Fine-tune the carved model at `carved` on the `--data` entries `data` (SOURCE or SOURCE:WEIGHT);
    see `finetune`."""
    recipe = FinetuneRecipe(
        carved, tuple(parse_data_spec(spec) for spec in data), options, eval_data, reference, device, dtype
    )
    return finetune(recipe, output, overwrite, resume, on_step)
