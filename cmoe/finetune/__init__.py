"""`cmoe finetune`: light recovery training of a carved model.

`recipe.py` the typed recipe, its options and the mixture kinds; `data.py` the tokenised domains and the
windows drawn from them; `model.py` loading, LoRA, parameter groups and the merge; `routing.py` expert
loads and the balancing bias; `evaluation.py` losses during training; `checkpoints.py` checkpoints and
resume; `record.py` the saved record and model card; `trainer.py` the run itself (`FinetuneRun`).
"""

from cmoe.finetune.recipe import (
    MIXTURES,
    DataSpec,
    FinetuneOptions,
    FinetuneRecipe,
    build_finetune_recipe,
    parse_data_spec,
)
from cmoe.finetune.routing import RoutingMeter
from cmoe.finetune.trainer import FinetuneRun, StepReport, finetune, run_finetune

__all__ = [
    "MIXTURES",
    "DataSpec",
    "FinetuneOptions",
    "FinetuneRecipe",
    "FinetuneRun",
    "RoutingMeter",
    "StepReport",
    "build_finetune_recipe",
    "finetune",
    "parse_data_spec",
    "run_finetune",
]
