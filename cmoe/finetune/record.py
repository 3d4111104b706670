"""What a fine-tuned model carries about its training: the `finetune` record of `cmoe_recipe.yaml` (the
model card's section on it is built from there, by cmoe.io.model_card)."""

from cmoe.finetune.checkpoints import Checkpoint, TrainingState
from cmoe.finetune.data import PROBE_WINDOWS, EvalData, TrainingData
from cmoe.finetune.model import LORA_TARGETS
from cmoe.finetune.recipe import FinetuneRecipe
from cmoe.io.artifacts import command_line, versions
from cmoe.io.loading import ModelSource

DEFAULTS_SOURCE = (
    "CMoE (Pei et al. 2025, arXiv 2502.04416) fine-tuning recipe; mixtures after LLaMA-MoE / Sheared-LLaMA"
)


def finetune_record(
    recipe: FinetuneRecipe,
    carved_model: ModelSource,
    data: TrainingData,
    eval_data: EvalData | None,
    reference: ModelSource | None,
    state: TrainingState,
    planned_steps: int,
    samples_per_step: int,
    routing_load_after: list,
    resumed_from: Checkpoint | None,
    accelerator,
    dtype: str,
    timings: dict,
) -> dict:
    """The resolved options, data, curves, mixture weights, routing loads, versions and timings of a run,
    with the replayable `recipe` (local paths absolute)."""
    options = recipe.options
    return {
        "tool": "cmoe finetune",
        "carved_model": carved_model.description,
        "command": command_line(),
        "recipe": recipe.to_dict(),
        "options": {**options.to_dict(), "lora_targets": None if options.full else LORA_TARGETS},
        "defaults_source": DEFAULTS_SOURCE,
        "data": [domain.description for domain in data.domains],
        "mixture": {
            "kind": options.mixture,
            "weights_over_time": state.mixture_history,
            "reference_model": reference.description if reference else None,
            "reference_losses": state.reference_losses,
        },
        "teacher": reference.description if options.distill else None,
        "eval_data": eval_data.description if eval_data else None,
        "eval_curve": state.eval_curve,
        "loss_curve": state.loss_curve,
        "steps": state.step,
        "planned_steps": planned_steps,
        "samples_per_step": samples_per_step,
        "tokens": state.tokens,
        "tokens_per_second": round(state.tokens / state.train_seconds, 2) if state.train_seconds else None,
        "routing_load_probe": f"the first {min(PROBE_WINDOWS, options.nsamples)} training windows",
        "routing_load_before": state.load_before,
        "routing_load_after": routing_load_after,
        "resumed_from_checkpoint": str(resumed_from.path) if resumed_from else None,
        "resumed_from_step": resumed_from.step if resumed_from else None,
        "processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "dtype": dtype,
        "mixed_precision": accelerator.mixed_precision,
        "seed": options.seed,
        "versions": versions(),
        "timings_s": timings,
    }
