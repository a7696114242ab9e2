"""``tools/bev_cost.py``'s FLOP counter: PyTorch's fused CPU attention, which torch's
``FlopCounterMode`` counts as 0, is counted as the unfused path's two matrix products. CPU, tiny
models, seconds."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import jafar
from bev.heads import bevformer
from tools import bev_cost


def _count(fn, counter):
    with torch.no_grad(), counter as c:
        fn()
    return c.get_total_flops()


@pytest.fixture(scope="module")
def vit():
    """A two-block DINOv2-architecture timm ViT (the cost table's backbone, shrunk), random weights."""
    torch.manual_seed(0)
    return jafar.build_backbone("vit_small_patch14_dinov2.lvd142m", pretrained=False, depth=2, embed_dim=16,
                                num_heads=2).eval()


def test_the_fused_attention_counts_as_the_unfused_path(vit):
    x = torch.rand(2, 3, 28, 42)
    blocks = [m for m in vit.modules() if hasattr(m, "fused_attn")]
    assert len(blocks) == 2 and all(m.fused_attn for m in blocks)  # timm's Attention, F.scaled_dot_product_attention
    plain = _count(lambda: vit(x), FlopCounterMode(display=False))
    fused = _count(lambda: vit(x), bev_cost.flop_counter())
    try:
        for m in blocks:
            m.fused_attn = False  # q @ k^T, softmax, @ v: two matrix products the counter sees
        unfused = _count(lambda: vit(x), FlopCounterMode(display=False))
    finally:
        for m in blocks:
            m.fused_attn = True
    assert fused == unfused
    tokens = 2 * 3 + 1  # 2 x 3 patches of 14 pixels and the class token
    attention = 2 * 4 * 2 * 2 * tokens * tokens * 8  # blocks x 4 x B x heads x L x L x head dim
    assert plain == unfused - attention  # what torch's counter alone misses


def test_sdpa_flops_with_other_lengths_and_value_width():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 5, 4, generator=g), torch.randn(3, 2, 7, 4, generator=g), torch.randn(3, 2, 7, 6, generator=g)
    fused = _count(lambda: F.scaled_dot_product_attention(q, k, v), bev_cost.flop_counter())
    unfused = _count(lambda: torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v, FlopCounterMode(display=False))
    assert fused == unfused == 2 * 3 * 2 * 5 * 7 * (4 + 6)


def test_the_tool_offers_every_layer_query_mode_of_the_head():
    assert bev_cost.LAYER_QUERIES == bevformer.LAYER_QUERIES


def test_the_table_has_a_loftup_row_built_and_counted_as_the_tool_does(vit):
    """LoftUp (the paper's Table 14 column) is one of the tool's upsamplers and guided rows; built by the
    tool's encoder path (random weights), its cost adds to the bilinear row's in the tool's counter."""
    from bev.encoder import build_multicamera_encoder

    assert "loftup" in bev_cost.UPSAMPLERS and "loftup" in bev_cost.GUIDED
    images = torch.rand(1, 2, 3, 28, 42)
    flops = {}
    for name in ("bilinear", "loftup"):
        torch.manual_seed(0)
        encoder = build_multicamera_encoder(vit, name)
        flops[name] = _count(lambda: encoder(images), bev_cost.flop_counter())
    assert flops["loftup"] > flops["bilinear"]
