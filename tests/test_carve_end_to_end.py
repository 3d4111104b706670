"""Carve, save, reload: the artifact reloads everywhere with identical logits, deterministically."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import cmoe
from cmoe.io.recipe_file import read_recipe
from cmoe.recipes import CarveOptions
from cmoe import Calibration, Compute, run_carve, run_perplexity, run_profile
from cmoe.shape import MoEShape
from cmoe.io.profile_format import ProfileFile

from conftest import TINYSTORIES_MODEL, TINYSTORIES_TRAIN, TINYSTORIES_VALID, save_tiny_model, weights_of

CPU = Compute(device="cpu", dtype="float32", batch_size=2)


def carve(model_dir, out, config="S1A2E8", calibration=None, **kwargs):
    calibration = calibration or Calibration(str(TINYSTORIES_TRAIN), nsamples=4, seqlen=64, seed=0)
    return run_carve(str(model_dir), out, CarveOptions(MoEShape.parse(config)), calibration, compute=CPU, **kwargs)


def test_carve_save_reload_gives_identical_logits(tiny_model_dir, tmp_path):
    out = tmp_path / "carved"
    recipe = carve(tiny_model_dir, out)
    for name in (
        "config.json",
        "model.safetensors.index.json",
        "modeling_cmoe.py",
        "configuration_cmoe.py",
        "cmoe_recipe.yaml",
        "README.md",
        "tokenizer.json",
    ):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob(".carved.partial-*"))
    saved = read_recipe(out)
    assert saved["config"] == "S1A2E8" and saved["calibration"]["nsamples"] == 4 and "group" in saved["timings_s"]
    assert saved["versions"]["torch"] and recipe["seed"] == 0

    ids = torch.randint(0, 2000, (2, 24))
    model = cmoe.load_carved(out)
    again = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model(ids).logits, again(ids).logits)
    names = set(weights_of(out))
    assert "model.layers.0.mlp.router.bias" in names and "model.layers.1.mlp.router.scale" in names
    assert "model.layers.0.mlp.experts.6.down_proj.weight" in names


def test_a_one_layer_model_carves_and_reloads(tmp_path):
    """The last layer keeps no resume state, so a one-layer carve never writes any to remove."""
    source = save_tiny_model(tmp_path / "one-layer", layers=1)
    carve(source, tmp_path / "carved")
    assert cmoe.load_carved(tmp_path / "carved").config.text_config.num_hidden_layers == 1
    assert not (tmp_path / "carved" / ".resume").exists()


def test_router_scale_and_bias_survive_save_and_load(tiny_model_dir, tmp_path):
    carve(tiny_model_dir, tmp_path / "carved")
    model = cmoe.load_carved(tmp_path / "carved")
    router = model.model.layers[1].mlp.router
    router.scale.data = torch.arange(7.0)
    router.bias.copy_(torch.linspace(-1, 1, 7))
    model.save_pretrained(tmp_path / "edited")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "edited").model.layers[1].mlp.router
    assert torch.equal(reloaded.scale, torch.arange(7.0)) and torch.equal(reloaded.bias, torch.linspace(-1, 1, 7))


def test_loads_with_trust_remote_code_without_cmoe(tiny_model_dir, tmp_path):
    out = tmp_path / "carved"
    carve(tiny_model_dir, out)
    ids = torch.randint(0, 2000, (1, 16))
    expected = cmoe.load_carved(out)(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.modules["cmoe"] = None  # prove cmoe is not needed
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        torch.save(model(torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "logits.pt")!r})
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_same_seed_same_carve_and_other_seed_differs(tiny_model_dir, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 5)):
        carve(tiny_model_dir, tmp_path / name, calibration=Calibration(str(TINYSTORIES_TRAIN), 4, 64, seed))
    weights = {}
    for name in "abc":
        weights[name] = weights_of(tmp_path / name)
    assert all(torch.equal(weights["a"][key], weights["b"][key]) for key in weights["a"])
    assert any(not torch.equal(weights["a"][key], weights["c"][key]) for key in weights["a"])


def test_output_is_atomic_and_refuses_to_overwrite(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "carved"
    import cmoe.carving

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(cmoe.carving, "save_carved", explode)
    with pytest.raises(RuntimeError):
        carve(tiny_model_dir, out)
    # Nothing under the output's name; the layers finished before the failed save are kept for --resume.
    assert not out.exists() and sorted(path.name for path in tmp_path.glob(".carved*")) == [".carved.partial"]
    monkeypatch.undo()
    carve(tiny_model_dir, out, resume=True)
    assert not list(tmp_path.glob(".carved*"))
    with pytest.raises(cmoe.CmoeError, match="already exists"):
        carve(tiny_model_dir, out)
    carve(tiny_model_dir, out, config="S2A2E4", overwrite=True)
    assert read_recipe(out)["config"] == "S2A2E4"


def test_profile_then_carve_from_profile(tiny_model_dir, tmp_path):
    profile = tmp_path / "dense.safetensors"
    calibration = Calibration(str(TINYSTORIES_TRAIN), 4, 64, 0)
    run_profile(str(tiny_model_dir), profile, calibration, ka=10, compute=CPU)
    saved = ProfileFile(profile)
    stats = saved.layer(1)
    assert saved.num_layers == 2 and stats.tokens == 4 * 64 and stats.counts.sum() == 4 * 64 * 10
    assert saved.recipe["calibration"]["seqlen"] == 64
    with safe_open(str(profile), "pt") as handle:
        assert torch.allclose(handle.get_tensor("layers.1.rates"), stats.counts.double() / stats.tokens)
    recipe = run_carve(
        str(tiny_model_dir), tmp_path / "carved", CarveOptions(MoEShape.parse("S1A2E8")), None, profile, CPU
    )
    assert recipe["mode"].startswith("from-profile")
    assert cmoe.load_carved(tmp_path / "carved").config.cmoe_layers[0]["num_experts"] == 7


def test_profile_memory_does_not_grow_with_calibration_size(tiny_model_dir):
    """The statistics are fixed-size accumulators: 1 batch or 16 batches give the same tensors' sizes."""
    from cmoe.pipeline.probe import ProbedMLP
    from transformers.activations import ACT2FN

    mlp = AutoModelForCausalLM.from_pretrained(tiny_model_dir).model.layers[0].mlp
    probe = ProbedMLP(mlp, ka=10, act=ACT2FN["silu"])
    sizes = []
    for _ in range(16):
        probe(torch.randn(2, 64, 32))
        sizes.append(sum(t.numel() for t in (probe.stats.counts, probe.stats.coactivation)))
    assert len(set(sizes)) == 1 and probe.stats.tokens == 16 * 128 and not probe.inputs


def test_real_weights_carve_perplexity_between_dense_and_ten_times_dense(tmp_path):
    calibration = Calibration(str(TINYSTORIES_TRAIN), nsamples=8, seqlen=256, seed=0)
    carve(TINYSTORIES_MODEL, tmp_path / "carved", config="S3A3E8", calibration=calibration)
    dense = run_perplexity(str(TINYSTORIES_MODEL), str(TINYSTORIES_VALID), seqlen=256, compute=CPU)
    carved = run_perplexity(str(tmp_path / "carved"), str(TINYSTORIES_VALID), seqlen=256, compute=CPU)
    assert dense.windows == carved.windows > 10
    assert 30 < dense.perplexity < 45  # the model card's 37.4 at its own windowing
    assert dense.perplexity < carved.perplexity < 10 * dense.perplexity


def test_perplexity_runner_matches_a_plain_forward_pass():
    from cmoe.calibration import evaluation_windows, load_text, tokenize_text
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(TINYSTORIES_MODEL)
    tokens = tokenize_text(
        load_text(str(TINYSTORIES_VALID), "test").text, AutoTokenizer.from_pretrained(TINYSTORIES_MODEL)
    )
    windows = evaluation_windows(tokens, 128, max_windows=6)
    with torch.no_grad():
        logits = model(windows).logits
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)
    ).exp()
    result = run_perplexity(str(TINYSTORIES_MODEL), str(TINYSTORIES_VALID), seqlen=128, max_windows=6, compute=CPU)
    assert result.windows == 6 and result.tokens == 6 * 128
    assert result.perplexity == pytest.approx(expected.item(), rel=1e-4)
