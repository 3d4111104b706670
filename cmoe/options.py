"""What decides the carved weights besides the model and the calibration tokens, and the presets."""

from dataclasses import dataclass, fields, replace

from cmoe.budget import BUDGETS
from cmoe.config import MoEShape
from cmoe.errors import CmoeError
from cmoe.partition import GROUPINGS, REPRESENTATIVES, SHARED_CHOICES
from cmoe.statistics import MARK_STATISTICS

ROUTER_NAMES = ("analytic", "linear", "noisy-topk")


@dataclass(frozen=True)
class CarveOptions:
    """The defaults are the reference CMoE; every other value is one measured option (README, Options)."""

    shape: MoEShape
    ka: int = 10
    method: str = "cmoe"
    statistic: str = "normalized"
    shared_by: str = "rate"
    grouping: str = "hamming"
    kmeans_iterations: int = 5
    representative: str = "centroid"
    router: str = "analytic"
    budget: str = "uniform"
    refit_down: bool = False
    preset: str = "reference"
    seed: int = 0
    rescale: bool = False

    def check(self, intermediate_size: int) -> None:
        self.shape.validated(intermediate_size)
        check_ka(self.ka, intermediate_size)
        from cmoe.construction import METHODS

        choices = {
            "method": tuple(METHODS),
            "statistic": MARK_STATISTICS,
            "shared_by": SHARED_CHOICES,
            "grouping": GROUPINGS,
            "representative": REPRESENTATIVES,
            "router": ROUTER_NAMES,
            "budget": BUDGETS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                flag = "--" + name.replace("_", "-")
                raise CmoeError(f"{flag} {getattr(self, name)}: expected one of {', '.join(allowed)}")
        if self.kmeans_iterations < 0:
            raise CmoeError(f"--kmeans-iterations {self.kmeans_iterations}: cannot be negative")
        METHODS[self.method].check(self.method, self)
        if self.rescale and self.budget == "adaptive":
            raise CmoeError("--rescale folds n/k for one k into the experts: not with --budget adaptive")
        if self.refit_down and self.budget == "adaptive":
            raise CmoeError(
                "--refit-down fits each layer for its number of active experts, which --budget adaptive only fixes "
                "after the last layer: pass --budget uniform or --no-refit-down"
            )

    def check_from_profile(self) -> None:
        """Refuse, in one line, the options that need the sequential pass over calibration data."""
        from cmoe.construction import METHODS

        if self.budget == "adaptive":
            raise CmoeError("--budget adaptive measures each carved layer on calibration data: drop --profile or pass --budget uniform")
        if self.refit_down:
            raise CmoeError(
                "--refit-down (part of --preset quality) fits each carved layer to its dense outputs on calibration data: "
                "drop --profile or pass --no-refit-down"
            )
        if METHODS[self.method].needs_gradients:
            raise CmoeError(f"--method {self.method} needs a gradient pass over calibration data: drop --profile")

    def needed_statistics(self) -> tuple[str, ...]:
        """The optional streaming statistics (see ActivationStats) these options read."""
        needed = []
        if self.shared_by == "contribution" or self.representative == "most-active":
            needed.append("contribution_sum")
        if self.grouping == "kmeans":
            needed.append("contribution_gram")
        if self.router == "linear":
            needed += ["input_gram", "input_target"]
        return tuple(needed)

    def as_recipe(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "shape"}


def check_ka(ka: int, intermediate_size: int) -> None:
    if not 1 <= ka <= intermediate_size:
        raise CmoeError(f"--ka {ka}: must be between 1 and the FFN width ({intermediate_size})")


PRESETS: dict[str, dict] = {
    "reference": {},
    "quality": {"router": "linear", "refit_down": True},
}


def with_preset(options: CarveOptions, preset: str) -> CarveOptions:
    """The options with a preset's values applied over them."""
    if preset not in PRESETS:
        raise CmoeError(f"--preset {preset}: expected one of {', '.join(PRESETS)}")
    return replace(options, preset=preset, **PRESETS[preset])
