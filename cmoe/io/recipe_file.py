"""The recipe file every artifact carries (`cmoe_recipe.yaml`): what was done, with what, and how long.

Its top level is the carve's record (source model, options, calibration description, versions, timings,
per-layer results) with the replayable typed recipe under `recipe`; a fine-tuned model adds the same
under `finetune` (its replayable recipe at `finetune.recipe`).
"""

import os
from pathlib import Path

import yaml

from cmoe.errors import CmoeError

RECIPE_FILE = "cmoe_recipe.yaml"
LEGACY_RECIPE_FILE = "cmoe_recipe.json"  # what artifacts written before the YAML recipe carry


def recipe_text(record: dict) -> str:
    """The record as YAML (for files, and for the header of a profile)."""
    return yaml.safe_dump(_plain(record), sort_keys=False, allow_unicode=True, width=120)


def write_recipe(directory: Path, record: dict) -> None:
    replace_files({directory / RECIPE_FILE: recipe_text(record)})


def replace_files(texts: dict[Path, str]) -> None:
    """Write each text whole to a temporary sibling, then rename them all over their paths: a failure while
    writing (a full disk, an interrupt) leaves every file as it was, never half-written."""
    temporaries: dict[Path, Path] = {}
    try:
        for path, text in texts.items():
            temporaries[path] = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            temporaries[path].write_text(text, encoding="utf-8")
        for path, temporary in temporaries.items():
            os.replace(temporary, path)
    finally:
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)


def artifact_recipe_path(directory: Path) -> Path:
    """The record file of an artifact directory: the YAML one, or an older artifact's JSON one."""
    legacy = directory / LEGACY_RECIPE_FILE
    return legacy if legacy.is_file() and not (directory / RECIPE_FILE).is_file() else directory / RECIPE_FILE


def has_recipe(directory: str | Path) -> bool:
    """Whether an artifact directory carries a record."""
    return artifact_recipe_path(Path(directory)).is_file()


def read_recipe(path: str | Path) -> dict:
    """The record in a recipe file, or in the recipe file of an artifact directory (an older artifact's
    JSON record too: YAML reads JSON)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = artifact_recipe_path(path)
    if not path.is_file():
        raise CmoeError(f"{path}: no such recipe file")
    try:
        record = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise CmoeError(f"{path}: not a readable YAML recipe ({type(error).__name__})") from error
    if not isinstance(record, dict):
        raise CmoeError(f"{path}: not a cmoe recipe (expected a mapping at the top level)")
    return record


def _plain(value):
    """Tuples as lists, so the file holds plain YAML that any reader understands."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
