"""cmoe: carve a dense LLaMA-style model into a Mixture-of-Experts without training.

Importing cmoe registers the carved architecture with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(carved_dir)` works without `trust_remote_code`.

The public API: `carve` / `run_carve` / `run_profile` (cmoe.carving), `run_perplexity` /
`perplexity_of` (cmoe.eval.perplexity), `load_carved`, the typed recipes (cmoe.recipes) and the
registries every interchangeable piece is looked up in (methods, routers, presets, ...).
"""

from cmoe.modeling import CMoEBlock, CMoEConfig, CMoEForCausalLM, MoELayerSpec, Router, mean_active_neurons
from cmoe.carving import carve, carve_model, run_carve, run_profile
from cmoe.errors import CmoeError
from cmoe.eval.perplexity import perplexity_of, run_perplexity
from cmoe.io.artifacts import StageTimer
from cmoe.io.carved import load_carved
from cmoe.io.loading import load_pretrained
from cmoe.io.recipe_file import read_recipe
from cmoe.methods import GROUPINGS, METHODS, REPRESENTATIVES, SHARED_BY, ConstructionMethod, LayerEvidence
from cmoe.numerics.grouping import Partition
from cmoe.numerics.statistics import MARK_STATISTICS
from cmoe.pipeline.stages import BUDGETS
from cmoe.recipes import PRESETS, Calibration, CarveOptions, CarveRecipe, Compute
from cmoe.routers import ROUTERS, RouterKind
from cmoe.shape import MoEShape

__version__ = "0.1.0"
__all__ = [
    "BUDGETS",
    "CMoEBlock",
    "CMoEConfig",
    "CMoEForCausalLM",
    "Calibration",
    "CarveOptions",
    "CarveRecipe",
    "CmoeError",
    "Compute",
    "ConstructionMethod",
    "GROUPINGS",
    "LayerEvidence",
    "MARK_STATISTICS",
    "METHODS",
    "MoELayerSpec",
    "MoEShape",
    "Partition",
    "PRESETS",
    "REPRESENTATIVES",
    "ROUTERS",
    "Router",
    "RouterKind",
    "SHARED_BY",
    "StageTimer",
    "__version__",
    "carve",
    "carve_model",
    "load_carved",
    "load_pretrained",
    "mean_active_neurons",
    "perplexity_of",
    "read_recipe",
    "run_carve",
    "run_perplexity",
    "run_profile",
]
