"""Checkpoints of a fine-tuning run: where they live, saving one safely, and checking one before resuming.

Accelerate saves and restores the weights, optimizer, RNG states and `TrainingState` through its public
`save_state` / `load_state`; next to its files every checkpoint holds our own `cmoe_progress.json` (the
options that must match and the step), which is all the resume check reads.
"""

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cmoe.errors import CmoeError
from cmoe.finetune.recipe import FinetuneOptions
from cmoe.io.artifacts import write_json

CHECKPOINT_PREFIX = "step-"
PROGRESS_FILE = "cmoe_progress.json"


@dataclass
class TrainingState:
    """Everything besides weights, optimizer and RNG that a resumed run needs (checkpointed by accelerate)."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    mixture_weights: list = field(default_factory=list)
    mixture_history: list = field(default_factory=list)
    reference_losses: list | None = None
    loss_curve: list = field(default_factory=list)
    eval_curve: list = field(default_factory=list)
    load_before: list = field(default_factory=list)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory and the step it was saved after."""

    path: Path
    step: int


def checkpoint_root(output: Path) -> Path:
    """Checkpoints live next to the output (`OUT.checkpoints/`), never inside the atomically written output."""
    return output.with_name(f"{output.name}.checkpoints")


def latest_checkpoint(root: Path) -> Path | None:
    found = sorted(path for path in root.glob(f"{CHECKPOINT_PREFIX}*") if path.is_dir()) if root.is_dir() else []
    return found[-1] if found else None


def checkpoint_to_resume(output: Path, options: FinetuneOptions, overwrite: bool, resume: bool) -> Checkpoint | None:
    """The checkpoint --resume continues from, refused when it was made with different options; without
    --resume, None, and leftover checkpoints are refused unless --overwrite starts over."""
    root = checkpoint_root(output)
    latest = latest_checkpoint(root)
    if not resume:
        if latest is not None and not overwrite:
            raise CmoeError(
                f"{root} holds checkpoints of an earlier run: pass --resume to continue it or --overwrite to start over"
            )
        return None
    if latest is None:
        raise CmoeError(f"--resume: no checkpoint in {root}")
    progress_file = latest / PROGRESS_FILE
    if not progress_file.is_file():
        raise CmoeError(f"--resume: {latest} has no {PROGRESS_FILE} (an older cmoe's?); start over with --overwrite")
    progress = json.loads(progress_file.read_text())
    saved = progress["resume_key"]
    differing = sorted(name for name, value in options.resume_key().items() if saved.get(name) != value)
    if differing:
        raise CmoeError(
            f"--resume: {latest} was made with different options ({', '.join(differing)}); use the same options"
        )
    return Checkpoint(latest, progress["step"])


def save_checkpoint(accelerator, root: Path, step: int, resume_key: dict) -> None:
    """Write `root/step-NNNNNN` through a temporary name, then drop older checkpoints: a crash while
    saving leaves the previous checkpoint intact."""
    final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
    staging = root / f".{final.name}.partial"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(staging / PROGRESS_FILE, {"resume_key": resume_key, "step": step})
        os.replace(staging, final)
        for older in root.glob(f"{CHECKPOINT_PREFIX}*"):
            if older != final:
                shutil.rmtree(older)
    accelerator.wait_for_everyone()
