"""Atomic outputs and the recipe every artifact carries."""

import fcntl
import json
import logging
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
    "pot",
    "numpy",
    "tokenizers",
    "gguf",
    "peft",
    "accelerate",
    "datasets",
    "lm_eval",
)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


log = logging.getLogger("cmoe")
# Inside a carve's staging: the per-layer state that makes it resumable (cmoe.pipeline.resume).
RESUME_DIR = ".resume"
# Outputs this process abandoned (an error or an interrupt), each with what was kept (e.g. a checkpoint).
ABANDONED: list[tuple[Path, str | None]] = []


def check_output_path(path: Path, overwrite: bool, needed_bytes: int | None = None) -> None:
    """Fail early, before any heavy work: the output exists and may not be replaced, its directory cannot
    be created (missing parents are made, as `mkdir -p`) or written, or the disk has less free space than
    the output is estimated to need."""
    if path.exists() and not overwrite:
        raise CmoeError(f"{path} already exists (pass --overwrite to replace it)")
    if not path.parent.is_dir():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CmoeError(f"{path.parent}: cannot create the output's directory ({error.strerror})") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise CmoeError(f"{path.parent}: the output's directory is not writable")
    if needed_bytes is not None:
        free = shutil.disk_usage(path.parent).free
        if free < needed_bytes:
            raise CmoeError(
                f"{path.parent}: {_gib(free)} free, the output needs about {_gib(needed_bytes)} (free space or "
                "choose another -o)"
            )


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


class OutputSlot:
    """The one writer of an output, claimed before any heavy work: a lock file (held with `flock`, so
    the kernel frees it when its process dies, and holding the writer's PID for messages), a staging
    path and a scratch path with stable names, and `staged()`, which renames the finished staging onto
    the output in one step.

    A second writer of the same output refuses at once while the first lives. What a dead writer left
    (kill -9, power loss) is removed by the next writer, which says so; a partial carve that can be
    resumed is kept for `--resume` and removed only with `--overwrite`.
    """

    def __init__(self, path: Path, overwrite: bool, needed_bytes: int | None = None, resume: bool = False):
        self.path = path
        self.overwrite = overwrite
        self.resume = resume
        self.keep_staging = resume  # a failed resume must not lose the layers it was asked to continue
        self.staging = path.with_name(f".{path.name}.partial")
        self.scratch = path.with_name(f".{path.name}.scratch")
        self.lock = path.with_name(f".{path.name}.lock")
        self.kept: str | None = None  # what a failed command keeps besides the staging (e.g. a checkpoint)
        self._staging_note = f"the partial output is kept in {self.staging} (continue with --resume)"
        self.created = [parent for parent in reversed(path.parents) if not parent.exists()]
        self._descriptor: int | None = None
        try:
            check_output_path(path, overwrite, None if resume else needed_bytes)
            self._claim()
        except BaseException:
            self._unlock()
            for directory in reversed(self.created):
                _remove_if_empty(directory)
            raise

    def _claim(self) -> None:
        while True:
            try:
                descriptor = os.open(self.lock, os.O_CREAT | os.O_RDWR, 0o644)
            except OSError as error:
                raise CmoeError(f"{self.path.parent}: cannot write the output here ({error.strerror})") from error
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                owner = _lock_owner(self.lock)
                raise CmoeError(
                    f"{self.path} is being written by pid {owner} (wait for it or choose another -o)"
                ) from None
            if _same_file(descriptor, self.lock):
                break
            os.close(descriptor)  # the holder released (unlinked) it while we waited: take the new one
        previous = os.read(descriptor, 64).decode(errors="replace").split()
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        self._descriptor = descriptor
        dead = f" (pid {previous[0]} is gone)" if previous else ""
        if self.resume:
            if not self.staging.is_dir():
                raise CmoeError(f"--resume: no partial output of {self.path} to continue")
            return
        if (self.staging / RESUME_DIR).is_dir() and not self.overwrite:
            raise CmoeError(
                f"{self.path}: a partial carve is kept in {self.staging}{dead}: pass --resume to continue it or "
                "--overwrite to start over"
            )
        if self.staging.exists() or self.scratch.exists():
            self._clear()
            log.warning(f"removed a stale partial output of {self.path}{dead}")

    def require_space(self, needed_bytes: int) -> None:
        """The free-space check, once the output's size can be estimated (from the model's config); what
        a resumed staging already holds counts as written."""
        check_output_path(self.path, True, max(0, needed_bytes - _size(self.staging)))

    def _clear(self) -> None:
        _remove(self.staging)
        _remove(self.scratch)

    @contextmanager
    def staged(self) -> Iterator[Path]:
        """Yield the staging path (kept as it is when resuming); on success it replaces the output in one
        rename."""
        if not self.resume:
            self._clear()
        _remove(self.scratch)
        yield self.staging
        if self.path.exists():
            if not self.overwrite:
                raise CmoeError(f"{self.path} appeared while it was being written (pass --overwrite to replace it)")
            retired = self.path.with_name(f".{self.path.name}.old")
            _remove(retired)
            os.replace(self.path, retired)
            os.replace(self.staging, self.path)
            _remove(retired)
        else:
            os.replace(self.staging, self.path)

    def keep_for_resume(self, note: str) -> None:
        """On failure, keep the staging (a resumable carve's finished layers) and say so."""
        self.keep_staging = True
        self._staging_note = f"{note} in {self.staging} (continue with --resume)"

    def release(self, failed: bool) -> None:
        kept_staging = failed and self.keep_staging and self.staging.exists()
        if kept_staging:
            _remove(self.scratch)
        else:
            self._clear()
        self._unlock()
        if failed:
            notes = [note for note in (self._staging_note if kept_staging else None, self.kept) if note]
            ABANDONED.append((self.path, "; ".join(notes) or None))
            if not self.staging.exists():
                for directory in reversed(self.created):
                    _remove_if_empty(directory)

    def _unlock(self) -> None:
        """Unlink the lock before closing it: a waiter that then gets the old file sees it is no longer
        the lock (`_same_file`) and takes the new one."""
        if self._descriptor is None:
            return
        _remove(self.lock)
        os.close(self._descriptor)
        self._descriptor = None


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        return os.fstat(descriptor).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _size(path: Path) -> int:
    if not path.exists():
        return 0
    return (
        sum(item.stat().st_size for item in path.rglob("*") if item.is_file()) if path.is_dir() else path.stat().st_size
    )


@contextmanager
def claimed_output(
    path: Path, overwrite: bool, needed_bytes: int | None = None, resume: bool = False
) -> Iterator[OutputSlot]:
    """Claim `path` for this process for the whole command; scratch and lock are removed at the end
    whatever happens, and the staging too unless a resumable carve keeps it (a failure never leaves a
    half-written result under the output's name). `resume` continues the staging an earlier run left."""
    slot = OutputSlot(path, overwrite, needed_bytes, resume)
    try:
        yield slot
    except BaseException:
        slot.release(failed=True)
        raise
    slot.release(failed=False)


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass


def _lock_owner(lock: Path) -> int | None:
    try:
        return int(lock.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


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
