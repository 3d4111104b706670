"""The profile file: per-layer activation statistics as safetensors, its recipe (YAML) in the header.

Layers are streamed to disk as they are profiled (a data file grows, the header is written last),
so writing a profile of a deep model never holds more than one layer's statistics in memory.
"""

import json
import shutil
import struct
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from cmoe.errors import CmoeError
from cmoe.numerics.statistics import OPTIONAL_STATISTICS, PROFILE_STATISTICS, ActivationStats

FORMAT = "cmoe-profile/2"
_DTYPE_NAMES = {torch.int64: "I64", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64"}


class StreamingSafetensorsWriter:
    """Appends tensors to a scratch file, then writes a valid .safetensors file in one pass."""

    def __init__(self, scratch: Path):
        self._data = open(scratch, "wb")
        self._entries: dict[str, dict] = {}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        payload = tensor.detach().to("cpu").contiguous().numpy().tobytes()
        self._entries[name] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._offset, self._offset + len(payload)],
        }
        self._data.write(payload)
        self._offset += len(payload)

    def finish(self, path: Path, metadata: dict[str, str]) -> None:
        self._data.close()
        header = json.dumps({"__metadata__": metadata, **self._entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        with open(path, "wb") as out, open(self._data.name, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, length=16 << 20)
        Path(self._data.name).unlink()


def profile_bytes_per_layer(num_neurons: int, hidden_size: int, extras: tuple[str, ...] = PROFILE_STATISTICS) -> int:
    """Bytes one layer's statistics take in a profile (what write_layer writes): counts and rates, int32
    co-activation, and the float64 `extras`; for the free-space check and for planning."""
    n, h = num_neurons, hidden_size + 1
    sizes = {"contribution_sum": n, "contribution_gram": n * n, "input_gram": h * h, "input_target": h * n}
    return 8 * (2 * n + 1) + 4 * n * n + 8 * sum(sizes[name] for name in extras)


def write_layer(writer: StreamingSafetensorsWriter, index: int, stats: ActivationStats) -> None:
    writer.add(f"layers.{index}.counts", stats.counts.to(torch.int64))
    writer.add(f"layers.{index}.rates", stats.rates.to(torch.float64))
    writer.add(f"layers.{index}.coactivation", stats.coactivation.to(torch.int32))
    writer.add(f"layers.{index}.tokens", torch.tensor([stats.tokens], dtype=torch.int64))
    for name in stats.extras:
        writer.add(f"layers.{index}.{name}", getattr(stats, name).to(torch.float64))


class ProfileFile:
    """Lazy reader of a profile file: one layer's statistics at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CmoeError(f"--profile {path}: no such file")
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                self._names = set(handle.keys())
        except Exception as error:  # safetensors raises several unrelated types for a bad file
            raise CmoeError(f"--profile {path}: not a readable safetensors file ({error})") from error
        if metadata.get("format") != FORMAT:
            raise CmoeError(f"--profile {path}: not a cmoe profile (format {metadata.get('format')!r})")
        self.recipe = yaml.safe_load(metadata["recipe"])

    @property
    def num_layers(self) -> int:
        return self.recipe["num_layers"]

    @property
    def intermediate_size(self) -> int:
        return self.recipe["intermediate_size"]

    def check_matches(self, num_layers: int, intermediate_size: int) -> None:
        if (self.num_layers, self.intermediate_size) != (num_layers, intermediate_size):
            raise CmoeError(
                f"--profile {self.path}: made for {self.num_layers} layers of FFN width {self.intermediate_size}, "
                f"but the model has {num_layers} layers of width {intermediate_size}"
            )

    def check_serves(self, statistic: str, ka: int, needed: tuple[str, ...]) -> None:
        """Refuse carving options that this profile's statistics cannot serve."""
        made_with = (self.recipe.get("statistic", "normalized"), self.recipe["ka"])
        if made_with != (statistic, ka):
            raise CmoeError(
                f"--statistic {statistic} --ka {ka}: the profile was made with --statistic {made_with[0]} --ka "
                f"{made_with[1]}"
            )
        missing = [name for name in needed if f"layers.0.{name}" not in self._names]
        if missing:
            raise CmoeError(
                f"--profile {self.path}: lacks the statistics {', '.join(missing)}; profile again with this cmoe"
                + (" and --gram" if "contribution_gram" in missing else "")
            )

    def layer(self, index: int) -> ActivationStats:
        with safe_open(str(self.path), framework="pt") as handle:
            extras = tuple(name for name in OPTIONAL_STATISTICS if f"layers.{index}.{name}" in self._names)
            return ActivationStats(
                tokens=int(handle.get_tensor(f"layers.{index}.tokens")[0]),
                counts=handle.get_tensor(f"layers.{index}.counts"),
                coactivation=handle.get_tensor(f"layers.{index}.coactivation"),
                extras=extras,
                **{name: handle.get_tensor(f"layers.{index}.{name}") for name in extras},
            )
