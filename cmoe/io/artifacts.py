"""Atomic outputs and the recipe every artifact carries."""

import json
import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator

from cmoe.errors import CmoeError

_PACKAGES = (
    "cmoe",
    "torch",
    "transformers",
    "safetensors",
    "scipy",
    "numpy",
    "tokenizers",
    "gguf",
    "peft",
    "accelerate",
)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def check_output_path(path: Path, overwrite: bool) -> None:
    """Fail early, before any heavy work, if the output exists and may not be replaced."""
    if path.exists() and not overwrite:
        raise CmoeError(f"{path} already exists (pass --overwrite to replace it)")
    if not path.parent.exists():
        raise CmoeError(f"{path.parent}: the output's parent directory does not exist")


@contextmanager
def atomic_output(path: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces `path` in one rename, on failure it is removed.

    A crash therefore never leaves a half-written result under the final name.
    """
    check_output_path(path, overwrite)
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
    _remove(staging)
    try:
        yield staging
    except BaseException:
        _remove(staging)
        raise
    if path.exists():
        retired = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, retired)
        os.replace(staging, path)
        _remove(retired)
    else:
        os.replace(staging, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


class StageTimer:
    """Wall-clock seconds per named stage, summed when a stage repeats (e.g. once per layer)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def rounded(self) -> dict[str, float]:
        return {name: round(value, 3) for name, value in self.seconds.items()}
