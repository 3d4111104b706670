"""Resumable carves: after each finished layer, what the next layer needs (the propagated activations
and the stages' own state) is saved in the carve's staging directory, beside the shards already written.
A carve that dies at layer 61 of 80 continues there with `--resume` and ends with the same bytes.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cmoe.errors import CmoeError

STATE_FILE = "state.pt"
DONE_FILE = "done.json"


@dataclass
class Progress:
    """A carve's state after `done` layers: every batch's hidden states and each stage's state."""

    done: int
    hidden: list[torch.Tensor]
    stage_states: list


class LayerCheckpoints:
    """The per-layer state of one carve, in `directory`, tagged with the carve's `fingerprint` (its
    resolved recipe) so that a resume with other options or data is refused."""

    def __init__(self, directory: Path, fingerprint: dict):
        self.directory = directory
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))

    def save(self, progress: Progress) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        scratch = self.directory / f"{STATE_FILE}.writing"
        payload = {"fingerprint": self.fingerprint, "done": progress.done, "hidden": progress.hidden}
        payload["stage_states"] = progress.stage_states
        torch.save(payload, scratch)
        os.replace(scratch, self.directory / STATE_FILE)
        done = self.directory / f"{DONE_FILE}.writing"
        done.write_text(json.dumps({"done": progress.done}) + "\n")
        os.replace(done, self.directory / DONE_FILE)

    def load(self) -> Progress | None:
        path = self.directory / STATE_FILE
        if not path.is_file():
            return None
        payload = torch.load(path, weights_only=True)
        if payload["fingerprint"] != self.fingerprint:
            differing = sorted(
                key
                for key in set(payload["fingerprint"]) | set(self.fingerprint)
                if payload["fingerprint"].get(key) != self.fingerprint.get(key)
            )
            raise CmoeError(
                f"--resume: the partial carve was made with another recipe ({', '.join(differing)} differ); "
                "rerun without --resume to start over"
            )
        return Progress(payload["done"], payload["hidden"], payload["stage_states"])

    def done(self) -> int:
        """Layers finished so far (0 when nothing was saved), read without loading the activations."""
        try:
            return json.loads((self.directory / DONE_FILE).read_text())["done"]
        except (OSError, ValueError, KeyError):
            return 0
