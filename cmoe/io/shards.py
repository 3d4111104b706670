"""Sharded safetensors: written one shard at a time (a decoder layer as soon as it is final, so no
whole state dict is ever gathered), read one tensor at a time (so a model's weights can be loaded one
layer at a time). One writer serves carved models and every export format."""

import json
from pathlib import Path
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cmoe.errors import CmoeError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def shard_name(number: int, total: int) -> str:
    return f"model-{number:05d}-of-{total:05d}.safetensors"


class ShardWriter:
    """Shards numbered 1..total in `directory`, each written whole by one `write`; `finish` writes the
    index that maps every tensor to its shard (a reload needs nothing else)."""

    def __init__(self, directory: Path, total: int, dtype: torch.dtype | None = None):
        self.directory = directory
        self.total = total
        self.dtype = dtype
        self.weight_map: dict[str, str] = {}
        self.size = 0

    def write(self, number: int, tensors: dict[str, torch.Tensor]) -> None:
        name = shard_name(number, self.total)
        plain = {key: plain_tensor(tensor, self.dtype) for key, tensor in tensors.items()}
        save_file(plain, str(self.directory / name), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(plain, name))
        self.size += sum(tensor.numel() * tensor.element_size() for tensor in plain.values())

    def adopt(self, number: int) -> None:
        """Count a shard written by an earlier run of the same carve (a resumed carve keeps its shards)."""
        path = self.directory / shard_name(number, self.total)
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                self.weight_map[key] = path.name
                piece = handle.get_slice(key)
                self.size += _element_count(piece.get_shape()) * _DTYPE_BYTES[piece.get_dtype()]

    def finish(self) -> None:
        index = {"metadata": {"total_size": self.size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def plain_tensor(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A detached, contiguous CPU copy (shared storage, e.g. tied weights, must not reach safetensors)."""
    tensor = tensor.detach().to("cpu")
    return (tensor.to(dtype) if dtype is not None else tensor).contiguous().clone()


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _element_count(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def checkpoint_files(directory: Path) -> dict[str, Path]:
    """Every tensor name of a safetensors checkpoint (one file, or sharded with an index) and its file."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as error:
            raise CmoeError(f"{index}: not a valid safetensors index ({error})") from None
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / SINGLE_FILE
    if not single.is_file():
        raise CmoeError(f"{directory}: no {SINGLE_FILE} and no {INDEX_FILE} (not a safetensors checkpoint)")
    with _opened(single) as handle:
        return dict.fromkeys(handle.keys(), single)


class _opened:
    """safe_open with the damaged file named in one line."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        if not self.path.is_file():
            raise CmoeError(f"{self.path}: missing (the checkpoint is incomplete)")
        try:
            self.handle = safe_open(str(self.path), framework="pt")
            return self.handle.__enter__()
        except Exception as error:  # safetensors raises its own error types for every kind of damage
            raise CmoeError(f"{self.path}: not a readable safetensors file ({str(error).splitlines()[0]})") from None

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)


def tensor_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the headers, reading no weights."""
    shapes = {}
    files = checkpoint_files(directory)
    for path in sorted(set(files.values())):
        with _opened(path) as handle:
            shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
    return shapes


def read_tensors(directory: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The named tensors (all when None), each read from its file alone."""
    files = checkpoint_files(directory)
    wanted = sorted(files) if names is None else names
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(files[name], []).append(name)
    tensors = {}
    for path, keys in by_file.items():
        with _opened(path) as handle:
            for key in keys:
                tensors[key] = handle.get_tensor(key)
    return tensors
