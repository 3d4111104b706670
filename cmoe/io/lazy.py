"""Models loaded one decoder layer at a time: a 70B model never sits whole in host memory.

The skeleton is built with its parameters on the meta device; the embeddings, final norm and LM head
are read at once; each decoder layer's tensors are read from the checkpoint's safetensors (one file or
sharded, a local directory or a hub snapshot) when the pipeline runs that layer, and released after it.
The values are those `from_pretrained(dtype=...)` gives (each tensor cast alone), so a lazy run and a
run on the whole model compute the same bits. A GGUF file is read the same way: each tensor dequantised
alone through the `gguf` reader (memory-mapped), with transformers' own name map and tensor fix-ups.
"""

from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedConfig

from cmoe.errors import CmoeError
from cmoe.io.shards import checkpoint_files, read_tensors

LAYER_PREFIX = "model.layers."
EMBEDDINGS, HEAD = "model.embed_tokens.weight", "lm_head.weight"


class LazyWeights:
    """Where a model's tensors are, and which decoder layers currently hold theirs."""

    def __init__(self, directory: Path, dtype: torch.dtype):
        self.directory = directory
        self.dtype = dtype
        self.files = checkpoint_files(directory)
        self.loaded: set[int] = set()

    def skeleton(self, config: PreTrainedConfig) -> nn.Module | None:
        """The model with every weight outside the decoder layers loaded, the layers on the meta device;
        None when the checkpoint's layer tensors are not the model's own (e.g. per-expert tensors that
        `from_pretrained` converts to fused ones): such a model is read whole."""
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        self._index(model)
        if not self._layers_match(model):
            return None
        outside = [name for name in self.files if not name.startswith(LAYER_PREFIX)]
        tensors = self._read(outside)
        if getattr(model.config, "tie_word_embeddings", False):
            # A tied checkpoint may hold either name (transformers saves whichever it keeps).
            shared = tensors.pop(EMBEDDINGS, None)
            shared = tensors.pop(HEAD, shared) if shared is None else shared
            tensors.pop(HEAD, None)
            if shared is not None:
                tensors[EMBEDDINGS] = shared
        model.load_state_dict(tensors, strict=False, assign=True)
        if getattr(model.config, "tie_word_embeddings", False):
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
        missing = [name for name, tensor in model.named_parameters() if tensor.is_meta and _outside(name)]
        if missing:
            raise CmoeError(f"{self.directory}: the checkpoint has no {missing[0]}")
        if (self.directory / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(self.directory)
        return model.eval()

    def _index(self, model: nn.Module) -> None:
        """Learn the checkpoint's tensor names in the model's terms (safetensors names already are)."""

    def _layers_match(self, model: nn.Module) -> bool:
        """Every decoder layer's tensor names in the checkpoint are exactly the model's (names only)."""
        for index, layer in enumerate(model.model.layers):
            prefix = f"{LAYER_PREFIX}{index}."
            stored = {name[len(prefix) :] for name in self.files if name.startswith(prefix)}
            if stored != set(layer.state_dict()):
                return False
        return True

    def load(self, model: nn.Module, index: int) -> None:
        """Read decoder layer `index`'s tensors into it (no-op when it holds them)."""
        if index in self.loaded:
            return
        prefix = f"{LAYER_PREFIX}{index}."
        self._assign(model.model.layers[index], prefix, [name for name in self.files if name.startswith(prefix)])
        self.loaded.add(index)

    def release(self, model: nn.Module, index: int) -> None:
        """Drop decoder layer `index`'s tensors (the module stays, on the meta device)."""
        model.model.layers[index].to("meta")
        self.loaded.discard(index)

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {name: self._cast(tensor) for name, tensor in read_tensors(self.directory, names).items()}

    def _assign(self, module: nn.Module, prefix: str, names: list[str]) -> None:
        state = {name[len(prefix) :]: tensor for name, tensor in self._read(names).items()}
        expected = set(module.state_dict())
        if set(state) != expected:
            differing = sorted(set(state) ^ expected)
            raise CmoeError(f"{self.directory}: {prefix}{differing[0]} does not match the model's config")
        module.load_state_dict(state, assign=True)

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor


class GgufWeights(LazyWeights):
    """A GGUF file's tensors, one at a time: dequantised, renamed and fixed up (e.g. LLaMA's q/k rows
    un-permuted) as transformers' GGUF loader does, then cast like every other tensor."""

    def __init__(self, path: Path, dtype: torch.dtype):
        from gguf import GGUFReader

        self.directory, self.dtype, self.loaded = path, dtype, set()
        self.reader = GGUFReader(path)
        self.architecture = str(bytes(self.reader.fields["general.architecture"].parts[-1]), "utf-8")
        self.tensors = {tensor.name: tensor for tensor in self.reader.tensors}
        self.files: dict[str, str] = {}

    def _index(self, model: nn.Module) -> None:
        """The GGUF names of the model's tensors, and the fix-ups of the file's architecture (configured
        from the model's config: the same values transformers parses from the file's metadata)."""
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

        self.processor = TENSOR_PROCESSORS.get(self.architecture, TensorProcessor)(config=model.config.to_dict())
        names = get_gguf_hf_weights_map(model, self.processor)
        self.files = {names[name]: name for name in self.tensors if name in names}

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        import numpy as np
        from gguf import dequantize

        tensors = {}
        for name in names:
            tensor = self.tensors[self.files[name]]
            fixed = self.processor.process(
                weights=dequantize(tensor.data, tensor.tensor_type),
                name=tensor.name,
                tensor_key_mapping={},
                parsed_parameters={},
            )
            tensors[name] = self._cast(torch.from_numpy(np.copy(fixed.weights)))
        return tensors


def _outside(name: str) -> bool:
    return not name.startswith(LAYER_PREFIX)


def lazy_weights(location: str, gguf_file: str | None, dtype: torch.dtype) -> LazyWeights | None:
    """Lazy weights for a local safetensors directory (or a hub snapshot's) or a local GGUF file, None where
    the model must be read whole (a checkpoint without safetensors)."""
    directory = Path(location)
    if gguf_file:
        return GgufWeights(directory / gguf_file, dtype) if (directory / gguf_file).is_file() else None
    if not directory.is_dir():
        from huggingface_hub import snapshot_download

        directory = Path(snapshot_download(location, allow_patterns=["*.safetensors", "*.json"]))
    if not any(directory.glob("*.safetensors")):
        return None
    return LazyWeights(directory, dtype)
