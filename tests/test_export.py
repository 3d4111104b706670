"""Export to standard MoE architectures: exact (same log-probs in a process without cmoe), loadable with
plain transformers, refused in one line when a format cannot hold a carve."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import cmoe
from cmoe import CarveOptions, MoEShape
from cmoe.export import EXPORT_FORMATS, run_export
from cmoe.modeling.modeling_cmoe import select_experts

from conftest import TINYSTORIES_MODEL, TINYSTORIES_TRAIN, weights_of
from test_cli import assert_one_line_error, run

CALIBRATION = cmoe.Calibration(str(TINYSTORIES_TRAIN), nsamples=4, seqlen=64)
CPU = cmoe.Compute("cpu")
# One carve per format that exercises its routed experts at k > 1 (and the shared block where it has one).
SHAPES = {"qwen2-moe": "S1A2E8", "mixtral": "S0A2E8", "glm4-moe": "S2A2E8", "ernie4.5-moe": "S2A2E8"}
# Shapes whose every neuron is active with weight 1: one routed expert, always selected (GLM4-MoE's router
# ranks at least two, whose renormalised weights sum to 1, so it has no such shape).
ALL_NEURONS = {"qwen2-moe": "S3A1E4", "mixtral": "S0A1E1", "ernie4.5-moe": "S3A1E4"}
# GLM4-MoE's router computes its scores in float32 whatever the model's dtype; Ernie-4.5-MoE its router
# and its rotary embedding (so every attention score carries float32 rounding).
FLOAT64_BOUND = {"glm4-moe": 1e-4, "ernie4.5-moe": 2e-4}

WITHOUT_CMOE = """
import sys, torch
sys.modules["cmoe"] = None  # any `import cmoe` fails: the checkpoint must load on its own
from transformers import AutoModelForCausalLM
directory, ids, out = sys.argv[1:]
ids = torch.load(ids)
results = {}
with torch.no_grad():
    model = AutoModelForCausalLM.from_pretrained(directory)
    results["architecture"] = type(model).__name__
    results["fp32"] = model(ids).logits.log_softmax(-1)
    eager = AutoModelForCausalLM.from_pretrained(directory, experts_implementation="eager")
    results["fp32-eager"] = eager(ids).logits.log_softmax(-1)
    results["fp64"] = eager.double()(ids).logits.log_softmax(-1)
torch.save(results, out)
"""


def load_without_cmoe(directory: Path, ids: torch.Tensor, scratch: Path) -> dict:
    torch.save(ids, scratch / "ids.pt")
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_CMOE, str(directory), str(scratch / "ids.pt"), str(scratch / "out.pt")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(scratch / "out.pt")


def carve(out: Path, shape: str, fmt: str, **options) -> Path:
    gating = EXPORT_FORMATS.get(fmt).gating
    settings = {"router": "linear-gate", "gating": gating, **options}
    cmoe.run_carve(
        str(TINYSTORIES_MODEL), out, CarveOptions(MoEShape.parse(shape), **settings), CALIBRATION, compute=CPU
    )
    return out


def ids() -> torch.Tensor:
    return torch.randint(0, 2048, (2, 48), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fmt", EXPORT_FORMATS.names())
def test_export_is_exact_and_loads_without_cmoe(fmt, tmp_path):
    carved = carve(tmp_path / "carved", SHAPES[fmt], fmt)
    run_export(str(carved), fmt, tmp_path / "exported")
    files = {path.name for path in (tmp_path / "exported").iterdir()}
    assert "model.safetensors.index.json" in files and not {name for name in files if name.endswith(".py")}
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["model_type"] == EXPORT_FORMATS.get(fmt).model_type and "auto_map" not in config
    model = cmoe.load_carved(carved)
    with torch.no_grad():
        expected = model(ids()).logits.log_softmax(-1)
        expected64 = model.double()(ids()).logits.log_softmax(-1)
    got = load_without_cmoe(tmp_path / "exported", ids(), tmp_path)
    assert got["architecture"] == config["architectures"][0]
    assert float((got["fp64"] - expected64).abs().max()) < FLOAT64_BOUND.get(fmt, 1e-9)  # the same function
    scale = float(expected.abs().max())  # fp32 rounding grows with the log-probs (up to ~30 here)
    assert float((got["fp32-eager"] - expected).abs().max()) <= 1e-5 * scale
    assert float((got["fp32"] - expected).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize("fmt", ALL_NEURONS)
def test_every_neuron_active_exports_the_dense_model(fmt, tmp_path):
    carved = carve(tmp_path / "carved", ALL_NEURONS[fmt], fmt)
    run_export(str(carved), fmt, tmp_path / "exported")
    dense = AutoModelForCausalLM.from_pretrained(TINYSTORIES_MODEL).double()
    with torch.no_grad():
        expected = dense(ids()).logits.log_softmax(-1)
    got = load_without_cmoe(tmp_path / "exported", ids(), tmp_path)
    assert float((got["fp64"] - expected).abs().max()) < FLOAT64_BOUND.get(fmt, 1e-9)


def test_gating_rules_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    zero = torch.zeros(4)
    cmoe_rule = select_experts(logits, zero, zero, 2, "cmoe")
    assert cmoe_rule.indices.tolist() == [[0, 1]] and cmoe_rule.weights.tolist() == [[1.0, 1.0]]
    softmax = select_experts(logits, zero, zero, 2, "softmax-renorm")
    assert torch.allclose(softmax.weights, torch.tensor([[1.0, torch.e**-1]]) / (1 + torch.e**-1))
    biased = select_experts(logits, torch.tensor([0.0, 0.0, 0.0, 2.0]), zero, 2, "sigmoid-renorm")
    chosen = torch.tensor([2.0, -1.0]).sigmoid()
    assert biased.indices.tolist() == [[3, 0]] and torch.allclose(biased.weights, chosen.flip(0) / chosen.sum())


def test_carve_with_format_writes_the_standard_checkpoint_and_replays(capsys, tmp_path):
    out, again = tmp_path / "qwen", tmp_path / "again"
    args = ["--data", str(TINYSTORIES_TRAIN), "--nsamples", "2", "--seqlen", "64", "--device", "cpu"]
    code, _, err = run(
        capsys, "carve", str(TINYSTORIES_MODEL), "--config", "S2A2E8", "--format", "qwen2-moe", "-o", str(out), *args
    )
    assert code == 0, err
    recipe = cmoe.read_recipe(out)
    assert (
        recipe["recipe"]["options"]["router"] == "linear-gate"
        and recipe["recipe"]["options"]["gating"] == "softmax-renorm"
    )
    assert recipe["export"]["format"] == "qwen2-moe"
    code, _, err = run(capsys, "carve", "--recipe", str(out), "-o", str(again))
    assert code == 0, err
    shards = sorted(path.name for path in out.glob("*.safetensors"))
    assert shards == sorted(path.name for path in again.glob("*.safetensors")) and len(shards) == 3
    assert all((out / name).read_bytes() == (again / name).read_bytes() for name in shards)


@pytest.mark.parametrize(
    "options,fmt,expected",
    [
        ({"router": "analytic"}, "qwen2-moe", "--router linear-gate"),
        ({"router": "linear"}, "qwen2-moe", "--router linear-gate"),
        ({"router": "linear-gate", "gating": "cmoe"}, "qwen2-moe", "--gating softmax-renorm"),
        ({"router": "linear-gate", "gating": "softmax-renorm"}, "mixtral", "S0"),
    ],
)
def test_a_carve_a_format_cannot_hold_is_refused_with_the_fix(options, fmt, expected, tmp_path, capsys):
    cmoe.run_carve(
        str(TINYSTORIES_MODEL),
        tmp_path / "carved",
        CarveOptions(MoEShape.parse("S1A2E8"), **options),
        CALIBRATION,
        compute=CPU,
    )
    assert_one_line_error(
        capsys, ["export", str(tmp_path / "carved"), "--format", fmt, "-o", str(tmp_path / "x")], expected
    )
    assert not (tmp_path / "x").exists()


def test_format_refusals_come_before_any_carving(capsys, tmp_path):
    base = ["carve", str(TINYSTORIES_MODEL), "-o", str(tmp_path / "x"), "--data", str(tmp_path / "missing.txt")]
    assert_one_line_error(capsys, [*base, "--format", "mixtral", "--config", "S1A1E8"], "carve with S0")
    assert_one_line_error(capsys, [*base, "--format", "qwen2-moe", "--router", "analytic"], "--router linear-gate")
    assert_one_line_error(capsys, [*base, "--format", "qwen2-moe", "--budget", "adaptive"], "--budget")
    assert_one_line_error(
        capsys, [*base, "--format", "gguf"], "--format gguf: expected one of qwen2-moe, mixtral, glm4-moe"
    )


def test_finetune_under_a_renormalising_rule_trains_the_gate_and_stays_exportable(tmp_path):
    from cmoe.finetune import FinetuneOptions, run_finetune

    carved = carve(tmp_path / "carved", "S1A2E8", "qwen2-moe")
    options = FinetuneOptions(nsamples=4, seqlen=64, batch_size=2, checkpoint_every=0, lr=1e-3, bias_speed=0.0)
    run_finetune(str(carved), [str(TINYSTORIES_TRAIN)], tmp_path / "tuned", options, device="cpu")
    before, after = weights_of(carved), weights_of(tmp_path / "tuned")
    gates = [name for name in before if name.endswith("router.gate.weight")]
    assert gates and all(not torch.equal(before[name], after[name]) for name in gates)
    assert all(torch.equal(after[name], before[name]) for name in before if name.endswith("router.scale"))
    run_export(str(tmp_path / "tuned"), "qwen2-moe", tmp_path / "exported")
    model = cmoe.load_carved(tmp_path / "tuned").double()
    with torch.no_grad():
        expected = model(ids()).logits.log_softmax(-1)
    assert float((load_without_cmoe(tmp_path / "exported", ids(), tmp_path)["fp64"] - expected).abs().max()) < 1e-9


def test_glm4_moe_holds_a_balancing_bias_qwen2_moe_refuses_it(tmp_path):
    from transformers import AutoTokenizer

    from cmoe.export import export_model

    carved = cmoe.load_carved(carve(tmp_path / "carved", "S2A2E8", "glm4-moe"))
    for layer in carved.model.layers:
        layer.mlp.router.bias.copy_(torch.linspace(-0.3, 0.3, layer.mlp.num_experts))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "carved")
    export_model(carved, tokenizer, tmp_path / "glm4", "glm4-moe", {})
    with torch.no_grad():
        expected = carved(ids()).logits.log_softmax(-1)
    got = load_without_cmoe(tmp_path / "glm4", ids(), tmp_path)["fp32-eager"]  # GLM4's router runs in float32
    assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    with pytest.raises(cmoe.CmoeError, match="balancing bias"):
        export_model(carved, tokenizer, tmp_path / "qwen", "qwen2-moe", {})


def test_flat_gate_weights_every_selected_expert_about_one_and_is_the_format_default(tmp_path):
    recipe = cmoe.recipes.build_carve_recipe("model", shape=MoEShape.parse("S1A2E8"), export_format="qwen2-moe")
    assert (recipe.options.router, recipe.options.gating, recipe.options.flat_gate) == (
        "linear-gate",
        "softmax-renorm",
        True,
    )
    flat = cmoe.load_carved(carve(tmp_path / "flat", "S1A2E8", "qwen2-moe", flat_gate=True))
    plain = cmoe.load_carved(carve(tmp_path / "plain", "S1A2E8", "qwen2-moe"))
    x = 0.01 * torch.randn(64, 128, generator=torch.Generator().manual_seed(0))  # no softmax underflow ties
    flat_routing, plain_routing = flat.model.layers[0].mlp.router(x), plain.model.layers[0].mlp.router(x)  # same input
    assert torch.equal(flat_routing.indices, plain_routing.indices)
    assert torch.allclose(flat_routing.weights, torch.full_like(flat_routing.weights, 0.5), atol=5e-3)
    expert, reference = flat.model.layers[0].mlp.experts[0], plain.model.layers[0].mlp.experts[0]
    assert torch.allclose(expert.down_proj.weight, 2 * reference.down_proj.weight)
    with pytest.raises(cmoe.CmoeError, match="--flat-gate"):
        CarveOptions(MoEShape.parse("S1A2E8"), flat_gate=True)


def test_ernie_refuses_a_dense_layer_between_carved_ones_and_maps_the_run():
    from transformers.models.llama.modeling_llama import LlamaMLP

    from cmoe.export import CarvedView, check_exportable
    from cmoe.export.ernie4_5_moe import ernie4_5_moe_config, interleaved_rope_rows

    from conftest import tiny_llama

    dense = tiny_llama(layers=4)
    mlp = LlamaMLP(dense.config)
    windows = torch.randint(0, 97, (4, 16))
    options = CarveOptions(MoEShape.parse("S2A2E8"), router="linear-gate", gating="softmax-renorm")
    carved = cmoe.carve_model(dense, windows, options)
    layers = list(carved.config.cmoe_layers)
    carved.config.cmoe_layers = [None, *layers[1:]]
    carved.model.layers[0].mlp = mlp
    view = CarvedView.of(carved, "ernie4.5-moe")
    check_exportable(view, EXPORT_FORMATS.get("ernie4.5-moe"))
    assert ernie4_5_moe_config(view)["moe_layer_start_index"] == 1
    carved.config.cmoe_layers = [layers[0], None, *layers[2:]]
    carved.model.layers[1].mlp = mlp
    with pytest.raises(cmoe.CmoeError, match="dense layer 1 sits between carved layers"):
        check_exportable(CarvedView.of(carved, "ernie4.5-moe"), EXPORT_FORMATS.get("ernie4.5-moe"))
    assert interleaved_rope_rows(8, 4).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
