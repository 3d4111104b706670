"""The one layer-by-layer pipeline behind every command (profile, carve, eval perplexity, eval routing).

Capture the layer-0 inputs of every calibration batch (with all their keyword arguments), then per
decoder layer: run it once (through a probe when a stage wants statistics), let each stage do its part
(group the neurons into a block, refit it, measure it, count its routing, write its statistics), and
propagate: the next layer sees the carved outputs (`propagate="carved"`, the reference's sequential
carving) or the dense ones (`propagate="dense"`). Activations wait on the CPU between layers; only one
layer's weights are on the compute device.

With `weights` (cmoe.io.lazy) the decoder layers hold no weights until they run: each is read before
its pass and released once final (written out by a stage first, when carving).

Stages declare what they need (`CALIBRATION` data, the layer's `MLP_IO`), so a pipeline without
calibration data (carving from a saved profile) refuses the stages that cannot run, in their own words.
"""

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn
from transformers.activations import ACT2FN

from cmoe.errors import CmoeError
from cmoe.io.artifacts import StageTimer
from cmoe.io.lazy import LazyWeights
from cmoe.numerics.statistics import ActivationStats
from cmoe.pipeline.probe import ProbedMLP
from cmoe.pipeline.resume import LayerCheckpoints, Progress
from cmoe.pipeline.runner import LayerCallback, LayerRunner, decoder_of
from cmoe.registry import Registry

CALIBRATION = "calibration"
MLP_IO = "mlp_io"
PROPAGATIONS: Registry[str] = Registry("propagation", "--propagate")
PROPAGATIONS.register("carved", "the outputs of the already carved layers below (reference)", "carved")
PROPAGATIONS.register("dense", "the dense model's outputs", "dense")


@dataclass(frozen=True)
class StatisticsRequest:
    """What the layer pass records through its probe: the top-`ka` marks of `statistic` and the
    optional statistics `extras`."""

    ka: int
    statistic: str
    extras: tuple[str, ...] = ()


@dataclass
class LayerWork:
    """One layer as it goes through the stages: its dense MLP, what the layer pass recorded (statistics,
    and the MLP inputs and outputs when a stage needs them), what the block is fitted to when a stage
    moved it from those outputs (`targets`), the block a stage carved, and the block's outputs when a
    stage already computed them."""

    index: int
    layer: nn.Module
    dense: nn.Module
    stats: ActivationStats | None = None
    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    targets: list[torch.Tensor] | None = None
    block: nn.Module | None = None
    block_outputs: list[torch.Tensor] | None = None
    carved_down: list[torch.Tensor] | None = None

    @property
    def fit_targets(self) -> list[torch.Tensor]:
        return self.outputs if self.targets is None else self.targets


class Stage:
    """One step of the pipeline. `name` labels its timing; `needs` lists CALIBRATION and MLP_IO;
    `refusal` is the one line shown when the pipeline has no calibration data but the stage needs it;
    `builds_block` says that the stage sets `work.block`."""

    name = "stage"
    needs: frozenset[str] = frozenset()
    refusal = ""
    builds_block = False

    def statistics(self) -> StatisticsRequest | None:
        return None

    def begin(self, pipeline: "Pipeline") -> None:
        """Before the calibration inputs are captured."""

    def layer(self, pipeline: "Pipeline", work: LayerWork) -> None:
        """After the layer ran on every batch (when there is calibration data), before propagation."""

    def after(self, pipeline: "Pipeline", work: LayerWork) -> None:
        """When the layer is final: its block in place, the next layer's inputs propagated (e.g. to write
        it out before a lazy pipeline releases its weights)."""

    def end(self, pipeline: "Pipeline") -> None:
        """After the last layer."""

    def state(self):
        """What this stage carries from one layer to the next (saved after each layer for --resume)."""
        return None

    def restore(self, pipeline: "Pipeline", state, done: int) -> None:
        """Resume after `done` finished layers with the state `state()` returned then."""

    def close(self, pipeline: "Pipeline") -> None:
        """Always, success or failure: release hooks and the like."""

    def report(self) -> dict:
        """What the stage measured that belongs in the artifact's record (e.g. per-layer errors)."""
        return {}


def check_stages(stages: Iterable[Stage], has_calibration: bool) -> None:
    """Refuse, in the stage's own line, a stage that needs calibration data when there is none."""
    for stage in stages:
        if CALIBRATION in stage.needs and not has_calibration:
            raise CmoeError(stage.refusal or f"{stage.name} needs calibration data")


class Pipeline:
    """Runs `stages` over the decoder layers of `model`, on `windows` (N, seqlen) token ids if given."""

    def __init__(
        self,
        model: nn.Module,
        stages: list[Stage],
        windows: torch.Tensor | None = None,
        batch_size: int = 1,
        device: torch.device | str = "cpu",
        propagate: str = "carved",
        timer: StageTimer | None = None,
        on_layer: LayerCallback | None = None,
        weights: LazyWeights | None = None,
        checkpoints: LayerCheckpoints | None = None,
    ):
        PROPAGATIONS.check(propagate)
        check_stages(stages, windows is not None)
        self.model = model
        self.stages = stages
        self.windows = windows
        self.device = torch.device(device)
        self.propagate = propagate
        self.timer = timer or StageTimer()
        self.on_layer = on_layer
        self.weights = weights
        self.checkpoints = checkpoints
        self.runner = LayerRunner(model, windows, batch_size, self.device) if windows is not None else None
        self.additive = True
        requests = [request for request in (stage.statistics() for stage in stages) if request is not None]
        if len({(request.ka, request.statistic) for request in requests}) > 1:
            raise ValueError("stages ask for marks of different K_a or statistic")
        extras = tuple(dict.fromkeys(name for request in requests for name in request.extras))
        self.request = StatisticsRequest(requests[0].ka, requests[0].statistic, extras) if requests else None
        self.carving = any(stage.builds_block for stage in stages)

    @property
    def layers(self) -> nn.ModuleList:
        return decoder_of(self.model).layers

    def run(self) -> None:
        try:
            for stage in self.stages:
                stage.begin(self)
            if self.runner is not None:
                with self.timer.stage("capture"):
                    self.runner.capture()
                    if self.carving and self.propagate == "carved":
                        self._load(0)
                        self.additive = self.runner.mlp_is_additive(0)
            total = len(self.layers)
            start = self._resume()
            self._report(start, total)
            for index in range(start, total):
                layer = self.layers[index]
                self._load(index)
                work = LayerWork(index, layer, layer.mlp)
                self._process(work)
                for stage in self.stages:
                    stage.after(self, work)
                if self.weights is not None:
                    self.weights.release(self.model, index)
                self._save_progress(index + 1)
                work = None  # its dense MLP and activations go before the next layer is read
                self._report(index + 1, total)
            for stage in self.stages:
                stage.end(self)
        finally:
            for stage in self.stages:
                stage.close(self)

    def _resume(self) -> int:
        """The first layer to run: 0, or after the layers a killed run of the same carve finished."""
        progress = self.checkpoints.load() if self.checkpoints is not None else None
        if progress is None:
            return 0
        if self.runner is not None:
            for batch, hidden in zip(self.runner.batches, progress.hidden, strict=True):
                batch.hidden = hidden
        for stage, state in zip(self.stages, progress.stage_states, strict=True):
            stage.restore(self, state, progress.done)
        if self.weights is not None:
            self.weights.release(self.model, 0)  # read for the additivity check only: it is done
        return progress.done

    def _save_progress(self, done: int) -> None:
        if self.checkpoints is None or done == len(self.layers):
            return
        with self.timer.stage("resume_state"):
            hidden = [batch.hidden for batch in self.runner.batches] if self.runner is not None else []
            self.checkpoints.save(Progress(done, hidden, [stage.state() for stage in self.stages]))

    def _load(self, index: int) -> None:
        if self.weights is not None:
            with self.timer.stage("load_layer"):
                self.weights.load(self.model, index)

    def _report(self, done: int, total: int) -> None:
        if self.on_layer:
            self.on_layer(done, total)

    def _keeps_mlp_io(self) -> bool:
        carried = self.carving and self.propagate == "carved" and self.additive
        return carried or any(MLP_IO in stage.needs for stage in self.stages)

    def _process(self, work: LayerWork) -> None:
        saved_inputs = None
        if self.runner is not None:
            if self.carving and self.propagate == "carved" and not self.additive:
                saved_inputs = [batch.hidden for batch in self.runner.batches]
            self._layer_pass(work)
        for stage in self.stages:
            stage.layer(self, work)
        if work.block is None:
            return
        work.block.to("cpu")
        if self.runner is not None and self.propagate == "carved":
            with self.timer.stage("propagate"):
                self._propagate(work, saved_inputs)
        work.layer.mlp = work.block

    def _layer_pass(self, work: LayerWork) -> None:
        """Run the layer on every batch, through a probe when a stage asked for statistics."""
        if self.request is None:
            self.runner.run_layer(work.index)
            return
        act = ACT2FN[self.model.config.hidden_act]
        keep_io = self._keeps_mlp_io()
        probe = ProbedMLP(work.dense, self.request.ka, act, keep_io, self.request.statistic, self.request.extras)
        work.layer.mlp = probe
        try:
            with self.timer.stage("profile"):
                self.runner.run_layer(work.index)
        finally:
            work.layer.mlp = work.dense
        work.stats, work.inputs, work.outputs = probe.stats, probe.inputs, probe.outputs

    def _propagate(self, work: LayerWork, saved_inputs: list[torch.Tensor] | None) -> None:
        """Make the stored outputs the carved layer's: swap the MLP's share when the layer adds it to the
        residual (no second attention pass), else re-run the layer with the block."""
        if self.additive:
            if work.block_outputs is not None:
                self.runner.swap_mlp_outputs(work.outputs, work.block_outputs)
            else:
                self.runner.replace_mlp_outputs(work.block, work.inputs, work.outputs)
            return
        for batch, hidden in zip(self.runner.batches, saved_inputs):
            batch.hidden = hidden
        work.layer.mlp = work.block
        self.runner.run_layer(work.index)
