"""--shared-width adaptive: each layer's shared-expert count chosen among S-1, S, S+1 on measured error."""

import json

import pytest
import torch
from torch import nn

import cmoe
from cmoe import Calibration, Compute, run_carve
from cmoe.errors import CmoeError
from cmoe.export import check_options_exportable
from cmoe.io.model_card import build_card
from cmoe.carving import carve_model
from cmoe.io.loading import load_model, resolve_source
from cmoe.pipeline import stages
from cmoe.pipeline.stages import held_out_error, shared_candidates
from cmoe.recipes import CarveOptions
from cmoe.shape import MoEShape

from conftest import (
    TINYSTORIES_MODEL,
    TINYSTORIES_TRAIN,
    save_tiny_model,
    tinystories_calibration_windows,
    weight_bytes,
)

CPU = Compute(device="cpu", dtype="float32", batch_size=2)
CALIBRATION = Calibration(str(TINYSTORIES_TRAIN), nsamples=4, seqlen=64, seed=0)


def names(shapes: list[MoEShape]) -> list[str]:
    return [shape.name for shape in shapes]


def test_candidates_keep_the_active_experts_and_at_least_one_routed():
    assert names(shared_candidates(MoEShape.parse("S3A3E8"))) == ["S3A3E8", "S2A4E8", "S4A2E8"]
    assert names(shared_candidates(MoEShape.parse("S1A1E8"))) == ["S1A1E8", "S0A2E8"]
    assert names(shared_candidates(MoEShape.parse("S0A2E8"))) == ["S0A2E8", "S1A1E8"]
    for shape in shared_candidates(MoEShape.parse("S2A2E8")):
        assert shape.shared + shape.active == 4 and shape.experts == 8


def test_held_out_error_is_each_tokens_error_over_its_energy_by_hand():
    block = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        block.weight.fill_(2.0)
    x = torch.tensor([[1.0], [2.0]])
    target = torch.tensor([[1.0], [4.0]])  # outputs 2 and 4: squared errors 1 and 0
    assert held_out_error(block, x, target, torch.tensor([[1.0], [4.0]])) == pytest.approx(0.5)
    assert held_out_error(block, x, target, torch.tensor([[2.0], [1.0]])) == pytest.approx(0.25)


@pytest.fixture(scope="module")
def adaptive_carve(tmp_path_factory):
    options = CarveOptions.resolved(MoEShape.parse("S2A2E8"), "quality", shared_width="adaptive")
    out = tmp_path_factory.mktemp("shared") / "adaptive"
    record = run_carve(str(TINYSTORIES_MODEL), out, options, CALIBRATION, compute=CPU)
    return out, options, record


def test_each_layer_keeps_its_lowest_error_candidate_at_the_shapes_active_total(adaptive_carve):
    out, options, record = adaptive_carve
    model = cmoe.load_carved(out)
    for entry, layer, spec in zip(record["shared_width_errors"], model.model.layers, model.config.cmoe_layers):
        errors = {candidate["shared"]: candidate["error"] for candidate in entry["candidates"]}
        assert sorted(errors) == [1, 2, 3]
        assert entry["chosen"] == min(errors, key=errors.get)
        assert spec["shared_size"] == 48 * entry["chosen"] and spec["top_k"] == 4 - entry["chosen"]
        assert spec["num_experts"] == 8 - entry["chosen"]
        block = layer.mlp
        neurons = (0 if block.shared is None else block.shared.gate_proj.weight.shape[0]) + sum(
            expert.gate_proj.weight.shape[0] for expert in block.experts
        )
        assert neurons == 384  # every neuron of the dense FFN is in the block once
    assert record["shared_experts_per_layer"] == [entry["chosen"] for entry in record["shared_width_errors"]]
    assert record["mean_active_ffn_neurons"] == pytest.approx(4 * 48)
    assert cmoe.read_recipe(out)["recipe"]["options"]["shared_width"] == "adaptive"


def test_an_adaptive_carve_reloads_to_the_logits_it_had_and_repeats_to_the_same_bytes(adaptive_carve, tmp_path):
    out, options, record = adaptive_carve
    dense = load_model(resolve_source(str(TINYSTORIES_MODEL)), torch.float32)
    in_memory = carve_model(dense, tinystories_calibration_windows(CALIBRATION), options, batch_size=2)
    ids = torch.randint(0, 2000, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(cmoe.load_carved(out)(ids).logits, in_memory(ids).logits)
    again = run_carve(str(TINYSTORIES_MODEL), tmp_path / "again", options, CALIBRATION, compute=CPU)
    assert weight_bytes(tmp_path / "again") == weight_bytes(out)
    assert again["shared_width_errors"] == record["shared_width_errors"]


def prefer_fewest_shared(block, x, target, energy) -> float:
    """A score under which one shared expert fewer always wins: its block has the most routed experts."""
    return -float(block.num_experts)


def test_a_forced_choice_carves_the_bytes_of_the_uniform_carve_of_that_shape(monkeypatch, tmp_path):
    monkeypatch.setattr(stages, "held_out_error", prefer_fewest_shared)
    adaptive = CarveOptions.resolved(MoEShape.parse("S2A2E8"), "quality", shared_width="adaptive")
    record = run_carve(str(TINYSTORIES_MODEL), tmp_path / "adaptive", adaptive, CALIBRATION, compute=CPU)
    uniform = CarveOptions.resolved(MoEShape.parse("S1A3E8"), "quality")
    run_carve(str(TINYSTORIES_MODEL), tmp_path / "uniform", uniform, CALIBRATION, compute=CPU)
    assert record["shared_experts_per_layer"] == [1, 1] and record["active_experts_per_layer"] == [3, 3]
    # the kept block is the carved one, not its copy refitted on the scoring sample
    assert weight_bytes(tmp_path / "adaptive") == weight_bytes(tmp_path / "uniform")
    adaptive_layers = json.loads((tmp_path / "adaptive" / "config.json").read_text())["cmoe_layers"]
    assert adaptive_layers == json.loads((tmp_path / "uniform" / "config.json").read_text())["cmoe_layers"]


def test_leftover_neurons_stay_in_the_shared_block_of_every_candidate(tmp_path):
    options = CarveOptions(MoEShape.parse("S1A1E7"), router="linear", refit_down=True, shared_width="adaptive")
    record = run_carve(str(TINYSTORIES_MODEL), tmp_path / "leftover", options, CALIBRATION, compute=CPU)
    layers = cmoe.load_carved(tmp_path / "leftover").config.cmoe_layers
    assert record["leftover_neurons_in_shared"] == 384 % 7
    for shared, spec in zip(record["shared_experts_per_layer"], layers):
        assert spec["shared_size"] == 54 * shared + 6 and spec["num_experts"] == 7 - shared
        assert spec["top_k"] == 2 - shared


def test_a_crashed_adaptive_carve_resumes_to_the_bytes_of_an_uninterrupted_one(monkeypatch, tmp_path):
    monkeypatch.setattr(stages, "held_out_error", prefer_fewest_shared)
    model = save_tiny_model(tmp_path / "four-layers", layers=4)
    options = CarveOptions(MoEShape.parse("S2A2E8"), router="linear", refit_down=True, shared_width="adaptive")
    cpu = Compute("cpu")
    whole = run_carve(str(model), tmp_path / "whole", options, CALIBRATION, compute=cpu)

    def crash_after_two(done: int, total: int) -> None:
        if done == 2:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_carve(str(model), tmp_path / "out", options, CALIBRATION, compute=cpu, on_layer=crash_after_two)
    resumed = run_carve(str(model), tmp_path / "out", options, CALIBRATION, compute=cpu, resume=True)
    assert weight_bytes(tmp_path / "out") == weight_bytes(tmp_path / "whole")
    assert resumed["shared_experts_per_layer"] == whole["shared_experts_per_layer"] == [1, 1, 1, 1]
    assert resumed["shared_width_errors"] == whole["shared_width_errors"]


def test_the_card_lists_the_shared_experts_of_each_layer_when_they_differ(adaptive_carve):
    out, _, record = adaptive_carve
    config = json.loads((out / "config.json").read_text())
    if len(set(record["shared_experts_per_layer"])) == 1:
        assert "shared experts per layer" not in str(build_card(record, config))
    config["cmoe_layers"][0].update(shared_size=48, num_experts=7, top_k=3)
    config["cmoe_layers"][1].update(shared_size=96, num_experts=6, top_k=2)
    assert "shared experts per layer 1, 2 (--shared-width adaptive)" in str(build_card(record, config))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"budget": "adaptive"}, "--budget uniform"),
        ({"active_per_layer": (1, 1)}, "--budget uniform"),
        ({"rescale": True}, "--rescale and --flat-gate"),
        ({"router": "linear-gate", "gating": "softmax-renorm", "flat_gate": True}, "--rescale and --flat-gate"),
        ({"method": "random", "shape": MoEShape.parse("S0A1E4")}, "--method random builds none"),
        ({"method": "sharing-inter"}, "gradient pass"),
    ],
    ids=["budget-adaptive", "budget-from", "rescale", "flat-gate", "no-shared-method", "gradient-method"],
)
def test_refused_combinations(overrides, message):
    values = {"shape": MoEShape.parse("S1A1E4"), "shared_width": "adaptive", **overrides}
    with pytest.raises(CmoeError, match=message):
        CarveOptions(**values)


def test_refused_by_every_format_and_from_a_profile(tmp_path):
    options = CarveOptions(MoEShape.parse("S1A1E4"), router="linear-gate", shared_width="adaptive")
    with pytest.raises(CmoeError, match="--shared-width adaptive gives each layer its own shared block"):
        check_options_exportable(options, "qwen2-moe")
    profile = tmp_path / "profile.safetensors"
    cmoe.run_profile(str(TINYSTORIES_MODEL), profile, CALIBRATION, compute=CPU)
    with pytest.raises(CmoeError, match="--shared-width adaptive scores each layer"):
        run_carve(str(TINYSTORIES_MODEL), tmp_path / "out", options, None, profile=profile, compute=CPU)
    assert not (tmp_path / "out").exists()
