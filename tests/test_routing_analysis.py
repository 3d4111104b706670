"""`cmoe eval routing`: balance figures and distances by hand, counts that add up, PNGs and JSON on disk."""

import json
import math

import matplotlib.image
import pytest
import torch

from cmoe import Calibration, Compute, run_carve
from cmoe.shape import MoEShape
from cmoe.recipes import CarveOptions
from cmoe.eval.routing import parse_sources, run_routing_eval
from cmoe.numerics.routing_stats import balance_figures, distance_matrix, routing_distributions
from test_cli import assert_one_line_error, run

from conftest import TINYSTORIES_MODEL, TINYSTORIES_TRAIN, TINYSTORIES_VALID, WIKI_VALID


def test_balance_figures_by_hand():
    assert balance_figures(torch.tensor([5, 5, 5, 5])) == {"cv": 0.0, "max_over_mean": 1.0, "normalized_entropy": 1.0}
    skewed = balance_figures(torch.tensor([6, 2, 0, 0]))
    # mean 2, population std sqrt((16 + 0 + 4 + 4) / 4) = sqrt(6); shares 3/4, 1/4
    assert skewed["cv"] == pytest.approx(math.sqrt(6) / 2)
    assert skewed["max_over_mean"] == pytest.approx(3.0)
    assert skewed["normalized_entropy"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4))
    assert balance_figures(torch.zeros(4, dtype=torch.long)) is None


def test_distances_between_normalised_routing_distributions_by_hand():
    distributions = routing_distributions(torch.tensor([[2, 2, 0], [0, 4, 0], [1, 1, 0]]))
    distances = distance_matrix(distributions)
    assert distances[0, 1].item() == pytest.approx(math.sqrt(0.5))
    assert distances[0, 2].item() == pytest.approx(0.0)
    assert torch.equal(distances, distances.T) and torch.all(distances.diagonal() == 0)


def test_source_specs_are_checked():
    assert parse_sources(["wiki=a.txt", "stories=b=c.txt"]) == {"wiki": "a.txt", "stories": "b=c.txt"}
    for bad in (["a.txt"], ["=a.txt"], ["x/y=a.txt"], ["w=a", "w=b"], []):
        with pytest.raises(Exception, match="--data|at least one"):
            parse_sources(bad)


@pytest.fixture(scope="module")
def carved(tmp_path_factory):
    out = tmp_path_factory.mktemp("routing") / "S1A2E8"
    options = CarveOptions(MoEShape.parse("S1A2E8"))
    run_carve(
        str(TINYSTORIES_MODEL),
        out,
        options,
        Calibration(str(TINYSTORIES_TRAIN), nsamples=2, seqlen=64),
        compute=Compute("cpu", "float32", 2),
    )
    return out


@pytest.fixture(scope="module")
def analysis(carved, tmp_path_factory):
    out = tmp_path_factory.mktemp("routing") / "analysis"
    data = [f"stories={TINYSTORIES_VALID}", f"wiki={WIKI_VALID}"]
    report = run_routing_eval(
        str(carved), data, out, seqlen=64, max_windows=3, device="cpu", dtype="float32", batch_size=2
    )
    return out, report


def test_counts_sum_to_tokens_times_k_in_every_layer(analysis):
    out, report = analysis
    saved = json.loads((out / "routing.json").read_text())
    assert saved["layers"] == [0, 1] and saved["top_k"] == [2, 2]
    for name, source in saved["sources"].items():
        tokens = saved["data"][name]["tokens"]
        assert tokens == 3 * 64
        assert [sum(row) for row in source["counts"]] == [tokens * 2, tokens * 2]
        assert all(len(row) == 7 for row in source["counts"])
        assert all(
            0 <= figures["normalized_entropy"] <= 1 and figures["max_over_mean"] >= 1 for figures in source["balance"]
        )
    distances = torch.tensor(saved["distances"])
    assert saved["distance_layer"] == 1 and distances.shape == (2, 2) and distances[0, 1] > 0


def test_every_figure_is_a_real_image(analysis):
    out, _ = analysis
    names = sorted(path.name for path in out.iterdir())
    assert names == ["distances_layer1.png", "load_layer1.png", "load_stories.png", "load_wiki.png", "routing.json"]
    for name in names[:-1]:
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] >= 300 and image.shape[1] >= 500 and image.std() > 0.05


def test_cli_writes_the_analysis_and_checks_its_inputs(carved, tmp_path, capsys):
    out = tmp_path / "cli"
    code, _, err = run(
        capsys,
        "eval",
        "routing",
        str(carved),
        "--data",
        f"stories={TINYSTORIES_VALID}",
        "-o",
        str(out),
        "--seqlen",
        "32",
        "--max-windows",
        "1",
        "--layer",
        "0",
        "--device",
        "cpu",
    )
    assert code == 0, err
    assert json.loads((out / "routing.json").read_text())["distance_layer"] == 0
    assert (out / "distances_layer0.png").exists()
    base = ["eval", "routing", str(carved), "-o", str(tmp_path / "bad"), "--device", "cpu"]
    assert_one_line_error(capsys, [*base, "--data", "stories"], "--data stories: expected NAME=SOURCE")
    assert_one_line_error(
        capsys,
        [*base, "--data", f"s={TINYSTORIES_VALID}", "--seqlen", "32", "--layer", "5"],
        "--layer 5: expected a carved layer (0..1)",
    )
    assert_one_line_error(
        capsys,
        ["eval", "routing", str(TINYSTORIES_MODEL), "-o", str(tmp_path / "bad"), "--data", f"s={TINYSTORIES_VALID}"],
        "not a carved model",
    )
    assert_one_line_error(
        capsys, [*base, "--data", f"s={TINYSTORIES_VALID}", "--seqlen", "100000"], "above the model's maximum of 512"
    )
    assert_one_line_error(
        capsys, [*base, "-o", str(out), "--data", f"s={TINYSTORIES_VALID}", "--seqlen", "32"], str(out)
    )
    assert not (tmp_path / "bad").exists()


def test_the_per_layer_heatmap_compares_sources_as_fractions(carved, tmp_path, monkeypatch):
    """Sources of different lengths: each row of the per-layer load figure is that source's distribution."""
    from cmoe.eval import routing

    drawn = {}
    monkeypatch.setattr(routing, "plot_heatmap", lambda path, matrix, *args: drawn.setdefault(path.name, matrix))
    short = tmp_path / "short.txt"
    short.write_text(TINYSTORIES_VALID.read_text(encoding="utf-8")[:2000], encoding="utf-8")
    data = [f"short={short}", f"long={TINYSTORIES_VALID}"]
    report = run_routing_eval(str(carved), data, tmp_path / "a", seqlen=64, max_windows=40, device="cpu")
    assert report["data"]["short"]["tokens"] < report["data"]["long"]["tokens"]
    rows = drawn[f"load_layer{report['distance_layer']}.png"]
    assert torch.allclose(rows.sum(dim=1), torch.ones(2))
