"""Typed, validated, replayable recipes: everything that decides a carve besides the model's weights.

`CarveOptions` holds the carving choices (validated against the registries when built), `Calibration`
the calibration text and windows, `Compute` where it runs, `CarveRecipe` all of them with the model.
Presets are merged in one place (`CarveOptions.resolved`: explicit options win). A recipe is saved in
every artifact (`cmoe_recipe.yaml`, key `recipe`) and `cmoe carve --recipe FILE` replays it.
"""

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from cmoe.checks import (
    check_device_name,
    check_dtype_name,
    check_integer,
    check_number,
    check_positive,
    given,
    portable_text_source,
    recipe_fields,
    reject_unknown_keys,
)
from cmoe.errors import CmoeError
from cmoe.export import EXPORT_FORMATS, check_options_exportable
from cmoe.io.recipe_file import read_recipe
from cmoe.methods import GROUPINGS, METHODS, REPRESENTATIVES, SHARED_BY
from cmoe.numerics.statistics import MARK_STATISTICS
from cmoe.numerics.reconstruction import TOKEN_WEIGHTINGS
from cmoe.numerics.refit import REFIT_RIDGE, RIDGE_SCALES
from cmoe.pipeline.reconstruct import RECONSTRUCTED_PARTS
from cmoe.pipeline.sequential import PROPAGATIONS
from cmoe.pipeline.stages import BUDGETS, SHARED_WIDTHS
from cmoe.registry import Registry
from cmoe.routers import GATINGS, ROUTERS
from cmoe.shape import MoEShape


# Routers whose scores are one linear map of the layer input (what --flat-gate scales, --refit-router refits).
LINEAR_ROUTERS = ("linear", "linear-gate")


@dataclass(frozen=True)
class Preset:
    """A measured set of carve options and the calibration windows they were chosen with: `calibration`
    fills the Calibration fields a fresh carve does not give (a replay keeps its recipe's windows). `sparse`
    adds options for shapes that keep at most `sparse_fraction` of the FFN active: what pays within the
    preset's carve budget there (the less a carve keeps, the more is left to recover) but not at every size."""

    options: dict
    calibration: dict = field(default_factory=dict)
    sparse: dict = field(default_factory=dict)
    sparse_fraction: float = 0.0

    def options_for(self, shape: MoEShape) -> dict:
        if isinstance(shape, MoEShape) and shape.active_fraction <= self.sparse_fraction:
            return {**self.options, **self.sparse}
        return dict(self.options)


PRESETS: Registry[Preset] = Registry("preset", "--preset")
PRESETS.register("reference", "the CMoE reference, faithfully", Preset({}))
QUALITY = Preset(
    {"router": "linear", "refit_down": True, "refit_drift": 0.5},
    {"nsamples": 32},
    sparse={"reconstruct_steps": 50},
    sparse_fraction=0.25,
)
PRESETS.register(
    "quality",
    "linear router + least-squares down-projection refit halfway towards the dense stream (--refit-drift 0.5) "
    f"on 32 calibration windows, plus {QUALITY.sparse['reconstruct_steps']} block-reconstruction steps "
    f"(--reconstruct-steps) where the shape keeps at most {QUALITY.sparse_fraction:.0%} of the FFN active (e.g. "
    "S1A1E8); chosen on held-out calibration-domain text within 3x one dense forward (sequential carving only)",
    QUALITY,
)

_CHOICES = {
    "method": METHODS,
    "statistic": MARK_STATISTICS,
    "shared_by": SHARED_BY,
    "grouping": GROUPINGS,
    "representative": REPRESENTATIVES,
    "router": ROUTERS,
    "budget": BUDGETS,
    "shared_width": SHARED_WIDTHS,
    "preset": PRESETS,
    "propagate": PROPAGATIONS,
    "gating": GATINGS,
    "reconstruct_parts": RECONSTRUCTED_PARTS,
    "reconstruct_weighting": TOKEN_WEIGHTINGS,
    "refit_ridge_scale": RIDGE_SCALES,
}


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
    active_per_layer: tuple[int, ...] = ()
    shared_width: str = "uniform"
    refit_down: bool = False
    refit_ridge: float = REFIT_RIDGE
    refit_ridge_scale: str = "mean"
    refit_weighting: str = "uniform"
    refit_drift: float = 0.0
    refit_router: bool = False
    preset: str = "reference"
    seed: int = 0
    rescale: bool = False
    propagate: str = "carved"
    gating: str = "cmoe"
    flat_gate: bool = False
    reconstruct_steps: int = 0
    # The measured recipe (benchmarks/RESULTS.md): training the experts at 1e-3, 100 steps do about what 400 do
    # at 3e-4 and 400 steps tie with them; training the router gained nothing measurable.
    reconstruct_lr: float = 1e-3
    reconstruct_tokens: int = 1024
    reconstruct_parts: str = "experts"
    reconstruct_weighting: str = "uniform"

    def __post_init__(self):
        if not isinstance(self.shape, MoEShape):
            raise CmoeError(f"shape {self.shape!r}: expected S<shared>A<active>E<experts>")
        self.shape.validated()
        for name, registry in _CHOICES.items():
            registry.check(getattr(self, name))
        TOKEN_WEIGHTINGS.check(self.refit_weighting, "--refit-weighting")  # the reconstruction's registry
        self._check_active_per_layer()
        check_integer("ka", self.ka, 1)
        check_integer("kmeans_iterations", self.kmeans_iterations, 0)
        check_integer("seed", self.seed, 0)
        check_integer("reconstruct_steps", self.reconstruct_steps, 0)
        check_integer("reconstruct_tokens", self.reconstruct_tokens, 1)
        check_positive("reconstruct_lr", self.reconstruct_lr)
        check_positive("refit_ridge", self.refit_ridge)
        check_number("refit_drift", self.refit_drift)
        if not 0 <= self.refit_drift <= 1:
            raise CmoeError(f"--refit-drift {self.refit_drift}: must be between 0 and 1")
        if self.refit_drift and self.propagate != "carved":
            raise CmoeError("--refit-drift corrects the carved layers' drift: with --propagate dense there is none")
        if self.refit_weighting != "uniform" and (not self.refit_down or self.refit_router):
            raise CmoeError(
                "--refit-weighting weighs the tokens of the down-projection refit: add --refit-down (not with "
                "--refit-router, which compares unweighted errors)"
            )
        if self.refit_router and not self.refit_down:
            raise CmoeError("--refit-router refits the router after the down-projection refit: add --refit-down")
        if self.refit_router and self.router not in LINEAR_ROUTERS:
            raise CmoeError(f"--refit-router fits a linear router's scores: --router {self.router} has none")
        if self.refit_router and self.gating != "cmoe" and not self.flat_gate:
            raise CmoeError(
                "--refit-router ranks experts by their output at a fixed gate value: under a renormalising rule "
                "pass --flat-gate"
            )
        METHODS.get(self.method).check(self.method, self)
        if self.rescale and self.budget == "adaptive":
            raise CmoeError("--rescale folds n/k for one k into the experts: not with --budget adaptive")
        if self.gating != "cmoe" and self.budget == "adaptive":
            raise CmoeError(
                "--budget adaptive measures errors with every selected expert weighted 1: only with --gating cmoe"
            )
        if self.gating != "cmoe" and not ROUTERS.get(self.router).follows_gating:
            raise CmoeError(f"--router {self.router} has its own gate: pass --gating cmoe or another router")
        if self.flat_gate and (self.gating == "cmoe" or self.router not in LINEAR_ROUTERS):
            raise CmoeError(
                "--flat-gate scales a linear router's logits under a renormalising rule: pass --gating "
                "softmax-renorm or sigmoid-renorm and --router linear-gate (or linear)"
            )
        if self.refit_down and self.budget == "adaptive":
            raise CmoeError(
                "--refit-down fits each layer for its number of active experts, which --budget adaptive only fixes "
                "after the last layer: pass --budget uniform, or --no-refit-down (and --reconstruct-steps 0 where "
                "--preset quality sets it)"
            )
        self._check_shared_width()
        if self.reconstruct_steps and self.budget == "adaptive":
            raise CmoeError(
                "--reconstruct-steps trains each layer for its number of active experts, which --budget adaptive "
                "only fixes after the last layer: pass --budget uniform or --reconstruct-steps 0"
            )

    def _check_shared_width(self) -> None:
        if self.shared_width == "uniform":
            return
        method = METHODS.get(self.method)
        if not method.shared_block:
            raise CmoeError(f"--shared-width adaptive varies the shared block: --method {self.method} builds none")
        if method.needs_gradients:
            raise CmoeError(
                f"--shared-width adaptive: --method {self.method} ranks neurons by a gradient pass made for one "
                "shape; pass --method cmoe"
            )
        if self.budget != "uniform" or self.active_per_layer:
            raise CmoeError(
                "--shared-width adaptive keeps each layer's active experts at the shape's total: only with "
                "--budget uniform and no --budget-from"
            )
        if self.rescale or self.flat_gate:
            raise CmoeError(
                "--rescale and --flat-gate scale the routed outputs by one k for every layer: not with "
                "--shared-width adaptive"
            )
        if self.refit_weighting != "uniform":
            raise CmoeError("--shared-width adaptive scores its candidates unweighted: not with --refit-weighting")

    def _check_active_per_layer(self) -> None:
        if not isinstance(self.active_per_layer, (list, tuple)):
            raise CmoeError(f"active_per_layer {self.active_per_layer!r}: expected a list of integers, one per layer")
        object.__setattr__(self, "active_per_layer", tuple(self.active_per_layer))
        if not self.active_per_layer:
            return
        routed = self.shape.routed
        for count in self.active_per_layer:
            if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= routed:
                raise CmoeError(
                    f"--budget-from: {count!r} active experts in a layer; {self.shape.name} has {routed} routed "
                    "experts (each layer takes 0 to that many)"
                )
        if self.budget != "uniform":
            raise CmoeError("--budget-from fixes every layer's active experts: not with --budget adaptive")
        if self.rescale:
            raise CmoeError("--rescale folds n/k for one k into the experts: not with --budget-from")
        if self.flat_gate:
            raise CmoeError("--flat-gate scales the routed outputs by one k for every layer: not with --budget-from")

    @classmethod
    def resolved(cls, shape: MoEShape, preset: str = "reference", **explicit) -> "CarveOptions":
        """The one place presets are merged: defaults, then the preset's values, then every option given
        explicitly (None = not given)."""
        return cls(shape=shape).with_overrides(preset=preset, **explicit)

    def with_overrides(self, preset: str | None = None, **explicit) -> "CarveOptions":
        """These options with a preset (when one is named) and then the explicit values over them. A new
        preset first returns what the old preset set at this shape to the defaults, so that none of it lingers
        (and an option the old preset did not set, given explicitly then, is kept)."""
        values = given(explicit)
        reject_unknown_keys(type(self), values, "carve options")
        if preset is not None:
            old_options = PRESETS.get(self.preset).options_for(self.shape)
            defaults = {item.name: item.default for item in fields(self) if item.name in old_options}
            chosen = PRESETS.get(preset).options_for(values.get("shape", self.shape))
            values = {**defaults, **chosen, "preset": preset, **values}
        return replace(self, **values)

    def check(self, intermediate_size: int, num_layers: int) -> None:
        """The checks that need the model's FFN width and depth."""
        self.shape.validated(intermediate_size)
        check_ka(self.ka, intermediate_size)
        if self.active_per_layer and len(self.active_per_layer) != num_layers:
            raise CmoeError(
                f"--budget-from gives {len(self.active_per_layer)} layers' active experts; the model has {num_layers} "
                "layers"
            )

    def layer_spec(self, intermediate_size: int, layer: int | None = None):
        """The MoE layer spec these options carve an FFN of `intermediate_size` neurons into (layer `layer`'s
        number of active experts under --budget-from; without a layer, the uniform one)."""
        spec = self.shape.layer_spec(intermediate_size, self.router, self.gating)
        if self.active_per_layer and layer is not None:
            return replace(spec, top_k=self.active_per_layer[layer])
        return spec

    def needed_statistics(self) -> tuple[str, ...]:
        """The optional streaming statistics (see ActivationStats) these options read."""
        wanted = METHODS.get(self.method).statistics(self) + ROUTERS.get(self.router).needs
        return tuple(dict.fromkeys(wanted))

    def to_dict(self) -> dict:
        return {
            "config": self.shape.name,
            **{item.name: getattr(self, item.name) for item in fields(self) if item.name != "shape"},
        }

    @classmethod
    def from_dict(cls, values: dict) -> "CarveOptions":
        values = dict(values)
        if "config" not in values:
            raise CmoeError("carve options: no `config` (S<shared>A<active>E<experts>)")
        shape = MoEShape.parse(str(values.pop("config")))
        reject_unknown_keys(cls, values, "carve options")
        return cls(shape=shape, **values)


def active_experts_of(carved: str | Path) -> tuple[int, ...]:
    """Each layer's number of active routed experts in an earlier carve (its recipe file or directory): the
    second pass of a two-pass budget (carve with --budget adaptive, then with the refit at its allocation)."""
    record = read_recipe(carved)
    counts = record.get("active_experts_per_layer")
    if not isinstance(counts, list) or not counts:
        raise CmoeError(f"--budget-from {carved}: not a carve's recipe (no active_experts_per_layer)")
    return tuple(counts)


def check_ka(ka: int, intermediate_size: int) -> None:
    if not 1 <= ka <= intermediate_size:
        raise CmoeError(f"--ka {ka}: must be between 1 and the FFN width ({intermediate_size})")


@dataclass(frozen=True)
class Calibration:
    """Calibration text and its windows: `nsamples` seeded random windows of `seqlen` tokens. When set (a
    replayed recipe), `sha256` is what a local text must hash to (a changed text is refused, not used) and
    `commit` the hub commit a dataset is read at (the same rows as the run that wrote the recipe)."""

    source: str
    nsamples: int = 8
    seqlen: int = 2048
    seed: int = 0
    sha256: str | None = None
    commit: str | None = None

    def __post_init__(self):
        check_integer("nsamples", self.nsamples, 1)
        check_integer("seqlen", self.seqlen, 2)
        check_integer("seed", self.seed, 0)

    def portable(self) -> "Calibration":
        """With a local file's path made absolute, so that the recipe replays from any directory."""
        return replace(self, source=portable_text_source(self.source))


@dataclass(frozen=True)
class Compute:
    """Where and how to run: device, dtype name, window batch size."""

    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 1

    def __post_init__(self):
        check_device_name(self.device)
        check_dtype_name(self.dtype)
        check_integer("batch_size", self.batch_size, 1)


@dataclass(frozen=True)
class CarveRecipe:
    """Everything a carve reads: the dense model, the options, and calibration data or a saved profile."""

    model: str
    options: CarveOptions
    calibration: Calibration | None = None
    profile: str | None = None
    compute: Compute = Compute()
    export_format: str | None = None

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model.strip():
            raise CmoeError("carve recipe: no `model` (the dense model to carve)")
        if (self.calibration is None) == (self.profile is None):
            raise CmoeError("carving needs calibration data (--data) or a profile (--profile), not both")
        if self.export_format is not None:
            check_options_exportable(self.options, self.export_format)

    def with_overrides(self, **values) -> "CarveRecipe":
        return replace(self, **given(values))

    def to_dict(self) -> dict:
        return {
            "kind": "carve",
            "model": self.model,
            "options": self.options.to_dict(),
            "calibration": asdict(self.calibration) if self.calibration else None,
            "profile": self.profile,
            "compute": asdict(self.compute),
            "export_format": self.export_format,
        }

    @classmethod
    def from_dict(cls, values: dict) -> "CarveRecipe":
        values = recipe_fields(values, "carve", cls)
        calibration = values.get("calibration")
        compute = values.get("compute") or {}
        for part, cls_ in ((calibration or {}, Calibration), (compute, Compute)):
            reject_unknown_keys(cls_, part, f"carve recipe {cls_.__name__.lower()}")
        return cls(
            model=str(values.get("model", "")),
            options=CarveOptions.from_dict(values.get("options") or {}),
            calibration=Calibration(**calibration) if calibration else None,
            profile=values.get("profile"),
            compute=Compute(**compute),
            export_format=values.get("export_format"),
        )


def build_carve_recipe(
    model: str | None = None,
    replay: str | Path | None = None,
    shape: MoEShape | None = None,
    preset: str | None = None,
    profile: str | Path | None = None,
    options: dict | None = None,
    calibration: dict | None = None,
    compute: dict | None = None,
    export_format: str | None = None,
) -> CarveRecipe:
    """The recipe of a `cmoe carve` command line: built from the defaults, or replayed from a recipe file
    (`replay`, a file or an artifact directory). Values given here (None = not given) override, in this
    order: the file or the defaults, then the preset's values, then what `export_format` needs (its linear
    gate and gating rule), then each explicit option. A fresh carve also takes the preset's calibration
    windows where `calibration` does not name them; a replay keeps the recipe's."""
    options, calibration, compute = given(options), given(calibration), given(compute)
    if export_format is not None:
        gating = options.get("gating", EXPORT_FORMATS.get(export_format).gating)
        defaults = {"router": "linear-gate", "gating": gating, "flat_gate": gating != "cmoe"}
        options = {**defaults, **options}
    profile = None if profile is None else str(profile)
    if replay is None:
        if model is None:
            raise CmoeError("give the dense MODEL to carve (or --recipe FILE to replay a carve)")
        carved = CarveOptions.resolved(shape or MoEShape.parse("S3A3E8"), preset or "reference", **options)
        windows = PRESETS.get(preset or "reference").calibration
        data = None if profile else Calibration(**{"source": "wikitext2", **windows, **calibration})
        return CarveRecipe(model, carved, data, profile, Compute(**compute), export_format)
    base = CarveRecipe.from_dict(read_recipe(replay).get("recipe"))
    carved = base.options.with_overrides(preset=preset, shape=shape, **options)
    export_format = export_format or base.export_format
    data = base.calibration
    if profile is not None:
        data = None
    elif data is not None:
        text_changed = {"sha256": None, "commit": None} if "source" in calibration else {}
        data = replace(data, **calibration, **text_changed)
    elif "source" in calibration:
        data = Calibration(**calibration)
    else:
        profile = base.profile
    return CarveRecipe(model or base.model, carved, data, profile, replace(base.compute, **compute), export_format)
