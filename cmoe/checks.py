"""Small validators shared by the typed recipes: one clear CmoeError line each, naming the option."""

import math
from dataclasses import fields
from numbers import Real
from pathlib import Path

from cmoe.calibration import NAMED_SOURCES
from cmoe.errors import CmoeError


def flag(name: str) -> str:
    """The command-line flag of a recipe field: `kmeans_iterations` -> `--kmeans-iterations`."""
    return "--" + name.replace("_", "-")


def reject_unknown_keys(cls, values: dict, where: str) -> None:
    """Refuse keys that are not fields of the dataclass `cls` (a typo in a recipe file, say)."""
    unknown = sorted(set(values) - {item.name for item in fields(cls)})
    if unknown:
        raise CmoeError(f"{where}: unknown keys {', '.join(unknown)}")


def check_integer(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise CmoeError(f"{flag(name)} {value!r}: expected an integer")
    if value < minimum:
        bound = "cannot be negative" if minimum == 0 else f"must be at least {minimum}"
        raise CmoeError(f"{flag(name)} {value}: {bound}")


def check_number(name: str, value) -> None:
    if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value):
        raise CmoeError(f"{flag(name)} {value!r}: expected a finite number")


def check_positive(name: str, value) -> None:
    check_number(name, value)
    if not value > 0:
        raise CmoeError(f"{flag(name)} {value}: must be positive")


def portable_location(location: str) -> str:
    """A path that exists here, made absolute so that a recipe replays from any directory (a local path
    wins over a hub id of the same name, as in `resolve_source`); a hub id as given."""
    path = Path(location).expanduser()
    return str(path.resolve()) if path.exists() else location


def portable_text_source(source: str) -> str:
    """A local text file made absolute; a named source as given (it wins over a file of the same name)."""
    return source if source in NAMED_SOURCES else portable_location(source)


DTYPE_NAMES = ("float32", "bfloat16", "float16")


def check_device_name(name) -> None:
    """auto, cpu, cuda or cuda:N (whether a GPU is there is checked when the device is resolved)."""
    if not isinstance(name, str) or (name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:")):
        raise CmoeError(f"--device {name}: expected auto, cpu or cuda")


def check_dtype_name(name) -> None:
    if name != "auto" and name not in DTYPE_NAMES:
        raise CmoeError(f"--dtype {name}: expected auto, {', '.join(DTYPE_NAMES)}")


def given(values: dict | None) -> dict:
    """The entries whose value is not None: the options given explicitly."""
    return {name: value for name, value in (values or {}).items() if value is not None}


def recipe_fields(values, kind: str, cls) -> dict:
    """The fields of a saved recipe of `kind` ("carve", "finetune"), refusing another kind or unknown keys."""
    if not isinstance(values, dict) or values.get("kind") != kind:
        raise CmoeError(f"not a {kind} recipe (expected `kind: {kind}`)")
    fields_only = {name: value for name, value in values.items() if name != "kind"}
    reject_unknown_keys(cls, fields_only, f"{kind} recipe")
    return fields_only
