"""Typed, validated, replayable fine-tuning recipes: everything that decides a `cmoe finetune` run.

`FinetuneOptions` holds the training choices (validated when built), `DataSpec` one `--data` entry and
`FinetuneRecipe` all of them with the carved model, evaluation text, reference model, device and dtype.
A recipe is saved in every fine-tuned artifact (`cmoe_recipe.yaml`, key `finetune.recipe`) and
`cmoe finetune --recipe FILE` replays it (`build_finetune_recipe`: explicit values win).
"""

import math
from dataclasses import dataclass, fields, replace
from numbers import Real
from pathlib import Path

from cmoe.calibration.sources import HUB_PREFIX

from cmoe.checks import (
    check_device_name,
    check_dtype_name,
    check_integer,
    check_number,
    check_positive,
    flag,
    given,
    portable_location,
    portable_text_source,
    recipe_fields,
    reject_unknown_keys,
)
from cmoe.errors import CmoeError
from cmoe.io.recipe_file import RECIPE_FILE, read_recipe
from cmoe.numerics.mixture import normalized_weights
from cmoe.registry import Registry


@dataclass(frozen=True)
class MixtureKind:
    """How the domain weights of a data mixture evolve during training."""

    reweights: bool


MIXTURES: Registry[MixtureKind] = Registry("mixture", "--mixture")
MIXTURES.register("static", "fixed --data weights (LLaMA-MoE's static mixtures)", MixtureKind(reweights=False))
MIXTURES.register(
    "dynamic",
    "re-weight the domains every --mixture-every steps by their loss gap to the dense model (Sheared-LLaMA)",
    MixtureKind(reweights=True),
)

# Options a resumed run may change: they decide when to stop, evaluate and checkpoint, not what is trained.
FREE_ON_RESUME = ("max_steps", "eval_every", "eval_windows", "checkpoint_every")


@dataclass(frozen=True)
class DataSpec:
    """One `--data` entry: a text source and its (unnormalised) sampling weight."""

    source: str
    weight: float = 1.0

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source:
            raise CmoeError(f"--data {self.source!r}: expected a text source")
        if not isinstance(self.weight, Real) or isinstance(self.weight, bool) or not math.isfinite(self.weight):
            raise CmoeError(f"--data {self.source}:{self.weight}: the weight must be a finite number")
        object.__setattr__(self, "weight", float(self.weight))

    def portable(self) -> "DataSpec":
        return replace(self, source=portable_text_source(self.source))


def parse_data_spec(spec: str) -> DataSpec:
    """`SOURCE` or `SOURCE:WEIGHT`. A SOURCE that exists as a file is taken whole, and so is one whose
    last ':' is followed by a path (`dir:x/b.txt`) or that names a dataset's config (`hf:OWNER/NAME:CONFIG`);
    otherwise what follows the last ':' is the weight, and a word that is not a number (`FILE:abc`) is
    refused rather than read as part of the path."""
    source, separator, tail = spec.rpartition(":")
    if not separator or not source or Path(spec).expanduser().exists():
        return DataSpec(spec)
    try:
        return DataSpec(source, float(tail))
    except ValueError:
        if any(mark in tail for mark in "/\\.") or not tail or spec.startswith(HUB_PREFIX):
            return DataSpec(spec)
        raise CmoeError(
            f"--data {spec}: the mixture weight {tail!r} is not a number (SOURCE:WEIGHT, e.g. {source}:0.5)"
        ) from None


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
    distill: float = 0.0
    distill_temperature: float = 1.0
    grad_checkpointing: bool = False
    mixture: str = "static"
    mixture_every: int = 50
    heldout_windows: int = 4
    eval_every: int = 0
    eval_windows: int = 8
    checkpoint_every: int = 100

    def __post_init__(self):
        at_least_one = (
            "nsamples",
            "epochs",
            "batch_size",
            "grad_accum",
            "lora_r",
            "lora_alpha",
            "mixture_every",
            "heldout_windows",
            "eval_windows",
        )
        for name in at_least_one:
            check_integer(name, getattr(self, name), 1)
        check_integer("seqlen", self.seqlen, 2)
        for name in ("seed", "eval_every", "checkpoint_every"):
            check_integer(name, getattr(self, name), 0)
        if self.max_steps is not None:
            check_integer("max_steps", self.max_steps, 1)
        for name in ("lr", "router_lr", "lora_dropout", "bias_speed", "balance_coef", "distill", "distill_temperature"):
            check_number(name, getattr(self, name))
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("lr", "router_lr", "distill_temperature"):
            check_positive(name, getattr(self, name))
        for name in ("bias_speed", "balance_coef"):
            if getattr(self, name) < 0:
                raise CmoeError(f"{flag(name)} {getattr(self, name)}: must not be negative")
        if not 0 <= self.lora_dropout < 1:
            raise CmoeError(f"--lora-dropout {self.lora_dropout}: must be in [0, 1)")
        if not 0 <= self.distill <= 1:
            raise CmoeError(f"--distill {self.distill}: must be in [0, 1] (the KL term's share of the loss)")
        betas = self.betas
        if (
            not isinstance(betas, (tuple, list))
            or len(betas) != 2
            or not all(isinstance(beta, Real) and not isinstance(beta, bool) and 0 <= beta < 1 for beta in betas)
        ):
            raise CmoeError(f"betas {betas!r}: expected two numbers in [0, 1)")
        object.__setattr__(self, "betas", tuple(float(beta) for beta in betas))
        for name in ("full", "train_router", "grad_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise CmoeError(f"{flag(name)} {getattr(self, name)!r}: expected true or false")
        MIXTURES.check(self.mixture)

    @property
    def reweights_mixture(self) -> bool:
        """Whether the mixture re-weights its domains (and so needs held-out windows and the dense model)."""
        return MIXTURES.get(self.mixture).reweights

    def samples_per_step(self, processes: int) -> int:
        return self.batch_size * self.grad_accum * processes

    def to_dict(self) -> dict:
        return {item.name: _plain(getattr(self, item.name)) for item in fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> "FinetuneOptions":
        reject_unknown_keys(cls, values, "finetune options")
        return cls(**values)

    def resume_key(self) -> dict:
        """The options a resumed run must share with the run it continues (stopping and evaluation may differ)."""
        return {name: value for name, value in self.to_dict().items() if name not in FREE_ON_RESUME}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class FinetuneRecipe:
    """Everything a fine-tuning run reads: the carved model, the training data, the options, and where it runs."""

    model: str
    data: tuple[DataSpec, ...]
    options: FinetuneOptions = FinetuneOptions()
    eval_data: str | None = None
    reference: str | None = None
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise CmoeError("give the carved MODEL to fine-tune")
        object.__setattr__(self, "data", tuple(self.data))
        if not all(isinstance(spec, DataSpec) for spec in self.data):
            raise CmoeError("finetune recipe: `data` must hold DataSpec entries")
        self.mixture_weights()
        if not isinstance(self.options, FinetuneOptions):
            raise CmoeError("finetune recipe: `options` must be FinetuneOptions")
        check_device_name(self.device)
        check_dtype_name(self.dtype)

    def mixture_weights(self) -> list[float]:
        """The --data weights normalised to sum to 1 (refuses no data, negative weights, a zero sum)."""
        return normalized_weights([spec.weight for spec in self.data])

    def portable(self) -> "FinetuneRecipe":
        """With every local path (model, data, eval data, reference) absolute, so that it replays from anywhere."""
        return replace(
            self,
            model=portable_location(self.model),
            data=tuple(spec.portable() for spec in self.data),
            eval_data=None if self.eval_data is None else portable_text_source(self.eval_data),
            reference=None if self.reference is None else portable_location(self.reference),
        )

    def to_dict(self) -> dict:
        return {
            "kind": "finetune",
            "model": self.model,
            "data": [{"source": spec.source, "weight": spec.weight} for spec in self.data],
            "eval_data": self.eval_data,
            "reference": self.reference,
            "device": self.device,
            "dtype": self.dtype,
            "options": self.options.to_dict(),
        }

    @classmethod
    def from_dict(cls, values: dict) -> "FinetuneRecipe":
        values = recipe_fields(values, "finetune", cls)
        data = values.get("data") or []
        for entry in data:
            if not isinstance(entry, dict):
                raise CmoeError(f"finetune recipe data: expected `source` and `weight`, got {entry!r}")
            reject_unknown_keys(DataSpec, entry, "finetune recipe data")
        return cls(
            model=str(values.get("model") or ""),
            data=tuple(DataSpec(**entry) for entry in data),
            options=FinetuneOptions.from_dict(values.get("options") or {}),
            eval_data=values.get("eval_data"),
            reference=values.get("reference"),
            device=values.get("device") or "auto",
            dtype=values.get("dtype") or "auto",
        )


def replayed_recipe(path: str | Path) -> FinetuneRecipe:
    """The fine-tuning recipe saved in a fine-tuned model's recipe file (or its directory)."""
    saved = read_recipe(path).get("finetune")
    if not isinstance(saved, dict) or "recipe" not in saved:
        raise CmoeError(f"{path}: no fine-tuning recipe (`finetune.recipe`); pass a fine-tuned model's {RECIPE_FILE}")
    return FinetuneRecipe.from_dict(saved["recipe"])


def build_finetune_recipe(
    model: str | None = None,
    replay: str | Path | None = None,
    options: dict | None = None,
    data: list[str] | None = None,
    eval_data: str | None = None,
    reference: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> FinetuneRecipe:
    """The recipe of a `cmoe finetune` command line: built from the defaults, or replayed from a recipe file
    (`replay`, a file or a fine-tuned model's directory). Values given here (None = not given) override
    the file's or the defaults; `--data` entries replace the file's list as a whole."""
    explicit = given(options)
    reject_unknown_keys(FinetuneOptions, explicit, "finetune options")
    specs = tuple(parse_data_spec(spec) for spec in data) if data else None
    if replay is None:
        if model is None:
            raise CmoeError("give the carved MODEL to fine-tune (or --recipe FILE to replay a fine-tuning)")
        return FinetuneRecipe(
            model, specs or (), FinetuneOptions(**explicit), eval_data, reference, device or "auto", dtype or "auto"
        )
    base = replayed_recipe(replay)
    overrides = given(
        {
            "model": model,
            "data": specs,
            "eval_data": eval_data,
            "reference": reference,
            "device": device,
            "dtype": dtype,
        }
    )
    return replace(base, options=replace(base.options, **explicit), **overrides)
