"""The MoE forward pass: exact with every expert on, equal to a naive per-token reference otherwise."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaMLP

from cmoe.pipeline.blocks import build_block
from cmoe.shape import MoEShape
from cmoe.methods.cmoe import cmoe_partition
from cmoe.numerics.statistics import ActivationStats

from conftest import tiny_llama


def dense_mlp_and_stats(d_h: int = 48, seed: int = 0):
    torch.manual_seed(seed)
    mlp = tiny_llama(seed=seed, intermediate_size=d_h).model.layers[0].mlp
    stats = ActivationStats.empty(d_h)
    stats.update(torch.stack([torch.randperm(d_h)[:5] for _ in range(100)]))
    return mlp, stats


def carve_block(mlp: LlamaMLP, stats: ActivationStats, shape: MoEShape):
    partition = cmoe_partition(stats, shape.experts, shape.shared)
    return build_block(mlp, partition, shape.layer_spec(mlp.gate_proj.weight.shape[0], "analytic"), "silu", stats)


@pytest.mark.parametrize("config,d_h", [("S2A6E8", 48), ("S0A4E4", 48), ("S1A4E5", 50)])
def test_all_routed_experts_selected_equals_dense(config, d_h):
    mlp, stats = dense_mlp_and_stats(d_h)
    block = carve_block(mlp, stats, MoEShape.parse(config))
    x = torch.randn(3, 11, 32)
    assert torch.allclose(block(x), mlp(x), atol=1e-5, rtol=0)


def naive_moe(block, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the obviously right (slow) MoE forward."""
    flat = x.reshape(-1, x.shape[-1])
    routing = block.router(flat)
    rows = []
    for t in range(flat.shape[0]):
        y = block.shared(flat[t : t + 1]) if block.shared is not None else torch.zeros(1, flat.shape[1])
        for e, w in zip(routing.indices[t].tolist(), routing.weights[t].tolist()):
            y = y + w * block.experts[e](flat[t : t + 1])
        rows.append(y)
    return torch.cat(rows).view_as(x)


@pytest.mark.parametrize("config", ["S1A1E8", "S3A3E8", "S0A2E6"])
def test_grouped_dispatch_matches_per_token_reference(config):
    mlp, stats = dense_mlp_and_stats()
    block = carve_block(mlp, stats, MoEShape.parse(config))
    torch.nn.init.normal_(block.router.scale, std=3.0)  # non-trivial gate values
    x = torch.randn(2, 9, 32)
    assert torch.allclose(block(x), naive_moe(block, x), atol=1e-5)


def test_training_free_gates_are_one_and_block_is_differentiable():
    mlp, stats = dense_mlp_and_stats()
    block = carve_block(mlp, stats, MoEShape.parse("S1A2E8"))
    routing = block.router(torch.randn(5, 32))
    assert torch.equal(routing.weights, torch.ones(5, 2))
    block(torch.randn(4, 32)).sum().backward()
    assert block.router.scale.grad is not None and block.shared.up_proj.weight.grad is not None
    assert any(expert.up_proj.weight.grad is not None for expert in block.experts)


def test_fewer_active_experts_change_the_output():
    mlp, stats = dense_mlp_and_stats()
    block = carve_block(mlp, stats, MoEShape.parse("S1A1E8"))
    x = torch.randn(4, 32)
    assert not torch.allclose(block(x), mlp(x), atol=1e-4)


def test_carved_forward_and_generate_raise_no_deprecation_warning(carved_dir):
    """The modeling file copied into every carved directory must use the current transformers API only
    (a deprecated argument would break carved models already written when transformers drops it)."""
    import warnings

    import cmoe

    model = cmoe.load_carved(carved_dir)
    ids = torch.randint(0, 100, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        cached = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        model(ids, use_cache=True)
    uncached = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, use_cache=False
    )
    assert torch.equal(cached, uncached)
