"""The layer runner under the pipeline (cmoe.pipeline.sequential): moves tensors, runs one layer.

The layer-0 inputs of every window batch are captured once (with all the keyword arguments the
model passes its decoder layers: position embeddings, masks, ...). Then decoder layers run one at a
time: the layer is moved to the compute device, every batch goes through it, and its outputs go
back to the CPU where they wait for the next layer. Only one layer's weights are on the device.
"""

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from cmoe.errors import CmoeError
from cmoe.numerics.nll import summed_next_token_nll
from cmoe.pipeline.probe import ShiftedMLP

LayerCallback = Callable[[int, int], None]


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (`model.model` for LLaMA-style causal LMs) with `layers`, `embed_tokens`, `norm`."""
    decoder = getattr(model, "model", None)
    if decoder is None or not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        raise CmoeError(f"{type(model).__name__} has no `model.layers` decoder stack: expected a LLaMA-style causal LM")
    return decoder


class _Recorder(nn.Module):
    """Stands in for a decoder layer during capture: keeps its inputs, passes hidden states through."""

    def __init__(self, index: int, sink: dict):
        super().__init__()
        self.index = index
        self.sink = sink

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise CmoeError("decoder layers receive positional arguments besides hidden states: unsupported model")
        self.sink.setdefault("hidden", hidden_states)
        self.sink.setdefault("kwargs", {})[self.index] = kwargs
        return hidden_states


@dataclass
class _Batch:
    hidden: torch.Tensor
    layer_kwargs: dict[int, dict] = field(repr=False)


def _to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(item, device) for item in value)
    if isinstance(value, list):
        return [_to_device(item, device) for item in value]
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    return value


class LayerRunner:
    """Runs `windows` (N, seqlen) token ids through a causal LM one decoder layer at a time."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device):
        self.model = model
        self.decoder = decoder_of(model)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.windows = windows
        self.batches: list[_Batch] = []

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    def _non_layer_modules(self) -> list[nn.Module]:
        return [module for name, module in self.decoder.named_children() if name != "layers"]

    @torch.no_grad()
    def capture(self) -> None:
        """Embed every batch and record each layer's keyword arguments (once per batch shape)."""
        original = list(self.layers)
        for module in self._non_layer_modules():
            module.to(self.device)
        kwargs_by_size: dict[int, dict[int, dict]] = {}
        try:
            for index in range(len(original)):
                self.layers[index] = _Recorder(index, {})
            for batch in self.windows.split(self.batch_size):
                sink: dict = {}
                for recorder in self.layers:
                    recorder.sink = sink
                self.decoder(input_ids=batch.to(self.device), use_cache=False)
                layer_kwargs = kwargs_by_size.setdefault(batch.shape[0], sink["kwargs"])
                self.batches.append(_Batch(sink["hidden"].to("cpu"), layer_kwargs))
        finally:
            for index, layer in enumerate(original):
                self.layers[index] = layer
            self._offload(*self._non_layer_modules())

    def _offload(self, *modules: nn.Module) -> None:
        if self.device.type != "cpu":
            for module in modules:
                module.to("cpu")

    @torch.no_grad()
    def run_layer(self, index: int) -> None:
        """Replace every batch's hidden states by the output of decoder layer `index`."""
        for output, batch in zip(self.layer_outputs(index, (batch.hidden for batch in self.batches)), self.batches):
            batch.hidden = output

    @torch.no_grad()
    def layer_outputs(self, index: int, hiddens: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Decoder layer `index`'s output (on the CPU) for each batch's hidden states in `hiddens` (the
        stored ones, or another stream of the same windows), one batch at a time."""
        layer = self.layers[index].to(self.device)
        try:
            for batch, hidden in zip(self.batches, hiddens):
                output = layer(hidden.to(self.device), **batch.layer_kwargs[index])
                if isinstance(output, tuple):
                    output = output[0]
                yield output.to("cpu")
        finally:
            self._offload(layer)

    @torch.no_grad()
    def replace_mlp_outputs(self, mlp: nn.Module, inputs: list, old_outputs: list) -> None:
        """Swap a layer's MLP in the stored outputs: hidden += mlp(x) - old, computed in fp32.

        Valid only for layers that add their MLP output to the residual (see `mlp_is_additive`);
        it saves re-running attention.
        """
        mlp.to(self.device)
        try:
            self.swap_mlp_outputs(old_outputs, (mlp(x.to(self.device)).float().to("cpu") for x in inputs))
        finally:
            self._offload(mlp)

    def swap_mlp_outputs(self, old_outputs: list, new_outputs) -> None:
        """hidden += new - old per batch, in fp32 (additive layers only, see `replace_mlp_outputs`);
        `new_outputs` may be a generator, so only one batch's new outputs exist at a time."""
        for batch, old, new in zip(self.batches, old_outputs, new_outputs):
            batch.hidden = (batch.hidden.float() - old.float() + new.float()).to(batch.hidden.dtype)

    @torch.no_grad()
    def mlp_is_additive(self, index: int) -> bool:
        """Whether layer `index` adds its MLP output unchanged to the residual (pre-norm LLaMA-style):
        shifting the MLP output by a constant must shift the layer output by the same constant."""
        layer = self.layers[index].to(self.device)
        batch = self.batches[0]
        hidden = batch.hidden.to(self.device)
        dense = layer.mlp
        try:
            base = layer(hidden, **batch.layer_kwargs[index])
            base = base[0] if isinstance(base, tuple) else base
            shift = torch.randn(base.shape[-1], generator=torch.Generator().manual_seed(0)).to(self.device)
            shift = shift * base.float().std()
            layer.mlp = ShiftedMLP(dense, shift)
            moved = layer(hidden, **batch.layer_kwargs[index])
            moved = moved[0] if isinstance(moved, tuple) else moved
        finally:
            layer.mlp = dense
            self._offload(layer)
        error = (moved.float() - base.float() - shift).abs().max()
        tolerance = 16 * torch.finfo(base.dtype).eps * (base.float().abs().max() + shift.abs().max())
        return bool(error <= tolerance)

    @torch.no_grad()
    def negative_log_likelihood(self) -> tuple[float, int]:
        """Summed next-token NLL (fp32) over all windows after the last layer, and the tokens predicted."""
        norm = self.decoder.norm.to(self.device)
        head = self.model.get_output_embeddings().to(self.device)
        softcap = getattr(getattr(self.model.config, "text_config", self.model.config), "final_logit_softcapping", None)
        total, predicted = 0.0, 0
        try:
            for batch, ids in zip(self.batches, self.windows.split(self.batch_size)):
                summed, count = summed_next_token_nll(head(norm(batch.hidden.to(self.device))), ids, softcap)
                total += summed
                predicted += count
        finally:
            self._offload(norm, head)
        return total, predicted
