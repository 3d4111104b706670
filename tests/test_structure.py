"""The structure the features live in: registries, typed recipes and their replay, the one pipeline."""

import ast
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import cmoe
from cmoe import CarveOptions, MoEShape
from cmoe.errors import CmoeError
from cmoe.io.recipe_file import read_recipe
from cmoe.pipeline.sequential import Pipeline
from cmoe.pipeline.stages import NegativeLogLikelihood, carve_stages
from cmoe.recipes import CarveRecipe, build_carve_recipe
from cmoe.registry import Registry

from conftest import TINYSTORIES_MODEL, TINYSTORIES_TRAIN, tiny_llama, weight_bytes
from test_cli import assert_one_line_error, run

PACKAGE = Path(cmoe.__file__).parent
CALIBRATION = ["--data", str(TINYSTORIES_TRAIN), "--nsamples", "2", "--seqlen", "64", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_refuses_unknown_names_listing_the_known_ones_and_duplicates():
    colours = Registry("colour", "--colour")
    colours.register("red", "warm", 1)

    @colours.register("blue", "cold")
    def blue():
        return 2

    assert colours.names() == ("red", "blue") and colours["blue"] is blue and "red" in colours
    assert colours.help_text() == "red: warm; blue: cold"
    with pytest.raises(CmoeError, match="--colour green: expected one of red, blue"):
        colours.get("green")
    with pytest.raises(ValueError, match="already registered"):
        colours.register("red", "again", 3)


def test_cli_choices_and_help_come_from_the_registries(capsys):
    code, out, _ = run(capsys, "carve", "--help")
    assert code == 0
    text = " ".join(out.split())
    for registry in (cmoe.ROUTERS, cmoe.METHODS, cmoe.GROUPINGS, cmoe.PRESETS, cmoe.BUDGETS):
        for name in registry:
            assert name in text, name


def test_presets_merge_in_one_place_and_explicit_options_win():
    shape = MoEShape.parse("S1A1E4")
    quality = CarveOptions.resolved(shape, "quality")
    assert (quality.router, quality.refit_down, quality.preset) == ("linear", True, "quality")
    explicit = CarveOptions.resolved(shape, "quality", router="analytic", refit_down=None)
    assert (explicit.router, explicit.refit_down) == ("analytic", True)
    with pytest.raises(CmoeError, match="--router oracle: expected one of"):
        CarveOptions(shape, router="oracle")
    with pytest.raises(CmoeError, match="--refit-down"):
        CarveOptions(shape, refit_down=True, budget="adaptive")


def test_a_preset_adds_its_sparse_options_only_where_the_shape_keeps_little_active():
    sparse, half = MoEShape.parse("S1A1E8"), MoEShape.parse("S2A2E8")
    assert (sparse.active_fraction, half.active_fraction) == (0.25, 0.5)
    carved = CarveOptions.resolved(sparse, "quality")
    assert carved.reconstruct_steps == 50
    assert CarveOptions.resolved(half, "quality").reconstruct_steps == 0
    assert CarveOptions.resolved(sparse, "quality", reconstruct_steps=0).reconstruct_steps == 0
    assert CarveOptions.resolved(sparse, "quality", reconstruct_steps=7).reconstruct_steps == 7
    assert carved.with_overrides(preset="quality", shape=half).reconstruct_steps == 0
    assert carved.with_overrides(preset="reference").reconstruct_steps == 0
    assert CarveOptions.resolved(half, "quality").with_overrides(preset="quality", shape=sparse).reconstruct_steps == 50
    assert carved.with_overrides(shape=half).reconstruct_steps == 50  # a replay keeps its recipe's values
    explicit_at_half = CarveOptions.resolved(half, "quality", reconstruct_steps=50)
    assert explicit_at_half.with_overrides(preset="quality").reconstruct_steps == 50  # not the preset's to reset


def test_a_preset_names_its_calibration_windows_unless_given_and_a_replay_keeps_its_own(tmp_path):
    shape = MoEShape.parse("S2A2E8")
    data = {"source": "text.txt"}
    assert build_carve_recipe("m", shape=shape, preset="quality", calibration=data).calibration.nsamples == 32
    assert build_carve_recipe("m", shape=shape, calibration=data).calibration.nsamples == 8
    quick = build_carve_recipe("m", shape=shape, preset="quality", calibration={**data, "nsamples": 8})
    assert quick.calibration.nsamples == 8
    assert build_carve_recipe("m", shape=shape, preset="quality", profile="p.safetensors").calibration is None
    (tmp_path / "first").mkdir()
    cmoe.io.recipe_file.write_recipe(tmp_path / "first", {"recipe": quick.to_dict()})
    assert build_carve_recipe(replay=tmp_path / "first", preset="quality").calibration.nsamples == 8


def test_recipe_round_trips_and_rejects_unknown_keys():
    recipe = build_carve_recipe(
        "model-dir",
        shape=MoEShape.parse("S2A2E8"),
        preset="quality",
        options={"ka": 7},
        calibration={"source": "text.txt", "nsamples": 3},
    )
    assert CarveRecipe.from_dict(recipe.to_dict()) == recipe
    broken = recipe.to_dict()
    broken["options"]["colour"] = "red"
    with pytest.raises(CmoeError, match="unknown keys colour"):
        CarveRecipe.from_dict(broken)


def test_carve_replays_from_its_recipe_byte_identically_and_options_override(capsys, tiny_model_dir, tmp_path):
    first, again, changed = tmp_path / "first", tmp_path / "again", tmp_path / "changed"
    code, _, err = run(
        capsys,
        "carve",
        str(tiny_model_dir),
        "-o",
        str(first),
        "--config",
        "S2A2E8",
        "--router",
        "linear",
        "--refit-down",
        "--seed",
        "3",
        *CALIBRATION,
    )
    assert code == 0, err
    code, _, err = run(capsys, "carve", "--recipe", str(first / "cmoe_recipe.yaml"), "-o", str(again))
    assert code == 0, err
    assert weight_bytes(first) == weight_bytes(again)
    code, _, err = run(capsys, "carve", "--recipe", str(first), "-o", str(changed), "--config", "S1A1E4")
    assert code == 0, err
    replayed = read_recipe(changed)["recipe"]
    assert replayed["options"]["config"] == "S1A1E4" and replayed["options"]["router"] == "linear"
    assert replayed["calibration"]["seed"] == 3 and replayed["options"]["refit_down"] is True


def test_a_carve_with_a_noisy_router_does_not_depend_on_the_global_random_state(tiny_model_dir, tmp_path):
    """The noisy top-k router adds noise only in training mode: carving (which runs each new block to
    propagate its outputs) must not, or the next layer's grouping would change from run to run."""
    options = CarveOptions(MoEShape.parse("S1A2E8"), router="noisy-topk")
    calibration = cmoe.Calibration(str(TINYSTORIES_TRAIN), nsamples=2, seqlen=64)
    for index, seed in enumerate((1, 2)):
        torch.manual_seed(seed)
        cmoe.run_carve(
            str(tiny_model_dir), tmp_path / f"noisy{index}", options, calibration, compute=cmoe.Compute("cpu")
        )
    assert weight_bytes(tmp_path / "noisy0") == weight_bytes(tmp_path / "noisy1")


def test_replay_keeps_a_profile_changes_presets_whole_and_refuses_a_changed_text(tiny_model_dir, tmp_path):
    text = tmp_path / "calibration.txt"
    text.write_text(TINYSTORIES_TRAIN.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    record = cmoe.run_carve(
        str(tiny_model_dir),
        tmp_path / "first",
        CarveOptions.resolved(MoEShape.parse("S1A2E8"), "quality"),
        cmoe.Calibration(str(text), nsamples=2, seqlen=64),
        compute=cmoe.Compute("cpu"),
    )
    assert record["recipe"]["calibration"]["sha256"] == record["calibration"]["sha256"]
    reference = build_carve_recipe(replay=tmp_path / "first", preset="reference")
    assert (reference.options.router, reference.options.refit_down, reference.options.preset) == (
        "analytic",
        False,
        "reference",
    )
    text.write_text(text.read_text(encoding="utf-8") + " The end.", encoding="utf-8")
    with pytest.raises(CmoeError, match="the calibration text changed"):
        cmoe.carve(build_carve_recipe(replay=tmp_path / "first"), tmp_path / "again")
    assert build_carve_recipe(replay=tmp_path / "first", calibration={"source": str(text)}).calibration.sha256 is None

    profiled = CarveRecipe("dense", CarveOptions(MoEShape.parse("S1A2E8")), profile=str(tmp_path / "dense.profile"))
    (tmp_path / "profiled").mkdir()
    cmoe.io.recipe_file.write_recipe(tmp_path / "profiled", {"recipe": profiled.to_dict()})
    replayed = build_carve_recipe(replay=tmp_path / "profiled", options={"seed": 4}, calibration={"seed": 4})
    assert replayed.profile == profiled.profile and replayed.calibration is None and replayed.options.seed == 4


def test_an_artifact_with_the_older_json_record_still_reads(tmp_path):
    (tmp_path / "cmoe_recipe.json").write_text('{"config": "S3A3E8", "source_model": "/models/dense"}')
    assert read_recipe(tmp_path)["source_model"] == "/models/dense"


def test_bad_recipe_files_fail_in_one_line(capsys, tmp_path):
    (tmp_path / "bad.yaml").write_text("recipe: [unclosed\n")
    (tmp_path / "other.yaml").write_text("recipe: {kind: finetune}\n")
    out = str(tmp_path / "out")
    assert_one_line_error(
        capsys, ["carve", "--recipe", str(tmp_path / "bad.yaml"), "-o", out], "not a readable YAML recipe"
    )
    assert_one_line_error(capsys, ["carve", "--recipe", str(tmp_path / "other.yaml"), "-o", out], "not a carve recipe")
    assert_one_line_error(capsys, ["carve", "--recipe", str(tmp_path / "none.yaml"), "-o", out], "no such recipe file")
    assert_one_line_error(capsys, ["carve", "-o", out], "give the dense MODEL")


class MeanDirectionRouter(cmoe.Router):
    """A toy router: each expert scores a token by the cosine to its members' mean up row."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, hidden_act: str):
        super().__init__(hidden_size, num_experts, top_k, hidden_act)
        self.directions = nn.Linear(hidden_size, num_experts, bias=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.directions(nn.functional.normalize(x, dim=-1))


def mean_direction_weights(dense, partition, stats, seed):
    rows = torch.stack([dense.up_proj.weight[members].mean(0) for members in partition.experts])
    return {"directions.weight": nn.functional.normalize(rows, dim=-1)}


@pytest.fixture
def toy_router():
    cmoe.ROUTERS.register(
        "mean-direction",
        "toy: cosine to each expert's mean up row",
        cmoe.RouterKind(MeanDirectionRouter, mean_direction_weights),
    )
    yield "mean-direction"
    cmoe.ROUTERS.unregister("mean-direction")


def test_a_router_registered_from_a_test_file_carves_and_reloads(toy_router, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "toy"
    code, _, err = run(
        capsys, "carve", str(tiny_model_dir), "-o", str(out), "--config", "S1A2E8", "--router", toy_router, *CALIBRATION
    )
    assert code == 0, err
    model = cmoe.load_carved(out)
    router = model.model.layers[0].mlp.router
    assert isinstance(router, MeanDirectionRouter) and model.config.layer_specs[1].router == toy_router
    assert torch.allclose(router.directions.weight.norm(dim=-1), torch.ones(7))
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


class PostNormDecoderLayer(LlamaDecoderLayer):
    """A decoder layer that normalises its output: its MLP's share is not simply added to the residual."""

    def forward(self, hidden_states, **kwargs):
        output = super().forward(hidden_states, **kwargs)
        output = output[0] if isinstance(output, tuple) else output
        return self.post_attention_layernorm(output)


@pytest.mark.parametrize("post_norm", [False, True], ids=["additive", "post-norm"])
def test_carved_propagation_matches_a_forward_of_the_carved_model(post_norm):
    """The pipeline's propagated outputs are what the carved model computes: by swapping the MLP's share
    (pre-norm layers) or by re-running the layer with its block (others)."""
    model = tiny_llama(seed=3, layers=3)
    if post_norm:
        for layer in model.model.layers:
            layer.__class__ = PostNormDecoderLayer
    windows = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(0))
    options = CarveOptions(MoEShape.parse("S1A2E8"))
    nll = NegativeLogLikelihood()
    pipeline = Pipeline(model, carve_stages(options) + [nll], windows, batch_size=2)
    with torch.no_grad():
        pipeline.run()
        carved = model(windows).logits
    assert pipeline.additive is not post_norm
    expected = torch.nn.functional.cross_entropy(
        carved[:, :-1].reshape(-1, carved.shape[-1]), windows[:, 1:].reshape(-1)
    )
    assert nll.mean == pytest.approx(float(expected), rel=1e-5)


def test_dense_propagation_profiles_every_layer_on_the_dense_outputs():
    """With `propagate="dense"` layer 1's statistics are those of the dense model, whatever layer 0 became."""
    windows = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
    options = CarveOptions(MoEShape.parse("S1A1E8"), propagate="dense")
    dense_profile = cmoe.pipeline.stages.Statistics(options.ka, options.statistic, ())
    reference = tiny_llama(seed=4)
    seen = []

    class Keep(cmoe.pipeline.sequential.Stage):
        def layer(self, pipeline, work):
            seen.append(work.stats.counts.clone())

    with torch.no_grad():
        Pipeline(reference, [dense_profile, Keep()], windows, propagate="dense").run()
        carved = tiny_llama(seed=4)
        Pipeline(
            carved, carve_stages(options)[:1] + [Keep()] + carve_stages(options)[1:], windows, propagate="dense"
        ).run()
    assert torch.equal(seen[1], seen[3]) and torch.equal(seen[0], seen[2])
    assert all(hasattr(layer.mlp, "router") for layer in carved.model.layers)


def test_profile_refusals_come_from_the_stage_declarations(capsys, tmp_path):
    for flags, expected in (
        (["--refit-down"], "--no-refit-down"),
        (["--budget", "adaptive"], "--budget uniform"),
        (["--method", "sharing-inter"], "gradient pass"),
    ):
        assert_one_line_error(
            capsys,
            [
                "carve",
                str(TINYSTORIES_MODEL),
                "-o",
                str(tmp_path / "x"),
                "--profile",
                str(tmp_path / "missing.safetensors"),
                *flags,
            ],
            expected,
        )


def _module_name(path: Path) -> str:
    return ".".join(("cmoe", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


def _runtime_imports(tree: ast.AST) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every cmoe import, at module level or in a function, except those
    under `if TYPE_CHECKING:` (which never run)."""
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cmoe") and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.startswith("cmoe")]
        else:
            found += _runtime_imports(node)
    return found


def test_no_import_cycle_and_no_private_cross_module_import():
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for module, names in _runtime_imports(ast.parse(path.read_text())):
            assert not [item for item in names if item.startswith("_")], f"{name} imports private {names} from {module}"
            submodules = {f"{module}.{item}" for item in names} & set(modules)
            targets |= submodules or ({module} & set(modules))
        graph[name] = targets - {name}

    def visit(node, stack, done):
        if node in stack:
            raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(node) :] + [node])}")
        if node not in done:
            for target in sorted(graph[node]):
                visit(target, stack + [node], done)
            done.add(node)

    done: set = set()
    for name in sorted(graph):
        visit(name, [], done)


def test_one_layer_loop_in_the_library():
    """Only the pipeline runs decoder layers one at a time; every command goes through it."""
    sources = {path.relative_to(PACKAGE).as_posix(): path.read_text() for path in PACKAGE.rglob("*.py")}
    assert [name for name, text in sources.items() if ".run_layer(" in text] == ["pipeline/sequential.py"]
    assert [name for name, text in sources.items() if "LayerRunner(" in text] == ["pipeline/sequential.py"]


def test_the_suite_needs_nothing_beside_the_repository():
    """Every asset a test reads is under tests/fixtures (a fresh clone has no ../shared)."""
    tests = Path(__file__).resolve().parent
    for path in tests.glob("*.py"):
        if path.name == Path(__file__).name:
            continue
        text = path.read_text()
        assert '/ "shared"' not in text and "parents[2]" not in text and "../shared" not in text, path.name
    from conftest import TINYSTORIES_MODEL, TINYSTORIES_TRAIN, TINYSTORIES_VALID, WIKI_VALID

    for asset in (TINYSTORIES_MODEL, TINYSTORIES_TRAIN, TINYSTORIES_VALID, WIKI_VALID):
        assert asset.exists() and tests / "fixtures" in asset.parents, asset
    assert (tests / "fixtures" / "README.md").read_text().count("license") >= 1
