"""The static BEVFormer head (bev.heads.bevformer): deformable attention against a naive per-point
loop, the pillars' projection against SimpleBeV's lifting, the rebatching, shapes, gradients,
the mmcv switch, and a training + validation step through bev.run.run. CPU, tiny sizes."""

import json
import math
import sys
import types

import numpy as np
import pytest
import torch

from bev import geometry as G
from bev.geometry import BevGrid
from bev.heads import bevformer as BF
from bev.heads.bevformer import (
    BEVFormer,
    BevSelfAttention,
    DeformableAttention,
    Rebatch,
    ms_deform_attn_pytorch,
    project_pillars,
    reference_heights,
)
from bev.heads.common import lift_to_voxels

R_FRONT = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # camera axes -> ego (x fwd, y left, z up)
GRID = BevGrid(x_bounds=(-12.0, 12.0), y_bounds=(-8.0, 8.0), z_bounds=(-1.0, 3.0), resolution=2.0, z_bins=2)


def rig(n=6, image_size=(48, 96), batch=1):
    """``n`` cameras around the ego looking outwards, slightly pitched, off the voxel lattice."""
    H, W = image_size
    poses = []
    for k in range(n):
        yaw = 2 * math.pi * k / n + 0.1
        c, s = math.cos(yaw), math.sin(yaw)
        Rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
        pitch = np.array([[1, 0, 0], [0, math.cos(0.05), -math.sin(0.05)], [0, math.sin(0.05), math.cos(0.05)]])
        poses.append(G.transform_matrix(np.array([1.1, 0.23, 1.6]) + 0.3 * np.array([c, s, 0]), Rz @ R_FRONT @ pitch))
    T = torch.from_numpy(np.stack(poses)).float()
    K = torch.tensor([[0.8 * W, 0, W / 2 + 0.3], [0, 0.8 * W, H / 2 - 0.2], [0, 0, 1]]).repeat(n, 1, 1)
    return K[None].repeat(batch, 1, 1, 1), T[None].repeat(batch, 1, 1, 1)


# ------------------------------------------------------------------ the sampling core


def naive_deform_attn(value, shapes, loc, weights):
    """Per-point loop: bilinear interpolation at pixel (x * w - 0.5, y * h - 0.5), each of the 4
    taps zero outside the map, weighted by the attention weight."""
    b, _, m, d = value.shape
    _, q, _, _, p, _ = loc.shape
    out = torch.zeros(b, q, m, d, dtype=value.dtype)
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    for bi in range(b):
        for qi in range(q):
            for mi in range(m):
                for li, (h, w) in enumerate(shapes):
                    vmap = value[bi, starts[li]:starts[li + 1], mi].view(h, w, d)
                    for pi in range(p):
                        x = loc[bi, qi, mi, li, pi, 0].item() * w - 0.5
                        y = loc[bi, qi, mi, li, pi, 1].item() * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        acc = torch.zeros(d, dtype=value.dtype)
                        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                if 0 <= yy < h and 0 <= xx < w:
                                    acc += wy * wx * vmap[yy, xx]
                        out[bi, qi, mi] += weights[bi, qi, mi, li, pi] * acc
    return out.reshape(b, q, m * d)


def test_deform_attn_matches_a_naive_loop_inside_outside_and_at_pixel_centres():
    torch.manual_seed(0)
    shapes = [(3, 4), (2, 5)]
    b, q, m, d, p = 2, 6, 2, 3, 4
    value = torch.randn(b, sum(h * w for h, w in shapes), m, d, dtype=torch.float64)
    loc = torch.rand(b, q, m, len(shapes), p, 2, dtype=torch.float64) * 1.6 - 0.3  # some outside [0, 1]
    loc[0, 0, 0, 0, 0] = torch.tensor([-0.6, 0.5])   # entirely left of the map: zero
    loc[0, 0, 0, 0, 1] = torch.tensor([0.5, 1.4])    # entirely below: zero
    loc[0, 0, 0, 0, 2] = torch.tensor([2.5 / 4, 1.5 / 3])  # the centre of pixel (row 1, col 2) of level 0
    loc[0, 0, 0, 1, 3] = torch.tensor([-0.05, 0.3])  # a tenth of a pixel beyond the left edge: one column of taps
    logits = torch.randn(b, q, m, len(shapes) * p, dtype=torch.float64)
    weights = logits.softmax(-1).view(b, q, m, len(shapes), p)
    out = ms_deform_attn_pytorch(value, shapes, loc, weights)
    assert out.shape == (b, q, m * d)
    torch.testing.assert_close(out, naive_deform_attn(value, shapes, loc, weights), rtol=1e-12, atol=1e-12)

    # one point per level; all the weight on level 0 at a pixel centre: that pixel's value exactly
    at = torch.zeros(1, 1, m, 2, 1, 2, dtype=torch.float64)
    at[..., 0, 0, :] = torch.tensor([2.5 / 4, 1.5 / 3], dtype=torch.float64)
    at[..., 1, 0, :] = torch.tensor([2.5 / 5, 0.5 / 2], dtype=torch.float64)  # level 1, pixel (0, 2)
    w0 = torch.zeros(1, 1, m, 2, 1, dtype=torch.float64)
    w0[..., 0, 0] = 1.0
    got = ms_deform_attn_pytorch(value[:1], shapes, at, w0).view(m, d)
    torch.testing.assert_close(got, value[0, 1 * 4 + 2], rtol=0, atol=0)
    got = ms_deform_attn_pytorch(value[:1], shapes, at, w0.flip(3)).view(m, d)
    torch.testing.assert_close(got, value[0, 12 + 2], rtol=0, atol=0)
    # all of it outside the map: zero
    far = torch.tensor([[-0.6, 0.5], [0.5, 1.6]], dtype=torch.float64)[None, None, None, :, None, :].expand(1, 1, m, 2, 1, 2)
    assert torch.count_nonzero(ms_deform_attn_pytorch(value[:1], shapes, far, torch.full_like(w0, 0.5))) == 0


def test_attention_weights_softmax_over_levels_and_points_and_points_split_among_heights():
    torch.manual_seed(1)
    attn = DeformableAttention(8, num_heads=2, num_levels=2, num_points=6, num_anchors=3).double()
    torch.nn.init.normal_(attn.attention_weights.weight)
    query = torch.randn(1, 5, 8, dtype=torch.float64)
    offsets, weights = attn.offsets_and_weights(query)
    assert offsets.shape == (1, 5, 2, 2, 6, 2) and weights.shape == (1, 5, 2, 2, 6)
    torch.testing.assert_close(weights.sum((-1, -2)), torch.ones(1, 5, 2, dtype=torch.float64))
    assert not torch.allclose(weights.sum(-1), torch.full_like(weights.sum(-1), 0.5))  # not per level
    # zero offsets: point p sits on reference point p % 3; a 1-pixel offset moves by 1/w of its level
    ref = torch.rand(1, 5, 3, 2, dtype=torch.float64)
    shapes = [(4, 10), (2, 5)]
    off = torch.zeros(1, 5, 2, 2, 6, 2, dtype=torch.float64)
    loc = attn.locations(ref, off, shapes)
    for p in range(6):
        torch.testing.assert_close(loc[:, :, :, :, p], ref[:, :, None, None, p % 3].expand(1, 5, 2, 2, 2))
    off[..., 0] = 1.0
    shift = attn.locations(ref, off, shapes) - loc
    torch.testing.assert_close(shift[..., 0, :, 0], torch.full((1, 5, 2, 6), 0.1, dtype=torch.float64))
    torch.testing.assert_close(shift[..., 1, :, 0], torch.full((1, 5, 2, 6), 0.2, dtype=torch.float64))
    assert attn.locations(ref.float(), off.bfloat16(), shapes).dtype == torch.float32  # never half-precision pixels
    # Deformable DETR's initialisation: uniform weights, point p of head m at (p + 1) px along its direction
    fresh = DeformableAttention(8, num_heads=4, num_levels=1, num_points=2)
    bias = fresh.sampling_offsets.bias.view(4, 1, 2, 2)
    torch.testing.assert_close(bias[:, 0, 1], 2 * bias[:, 0, 0])
    torch.testing.assert_close(bias[:, 0, 0], torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]),
                               atol=1e-6, rtol=0)


def test_self_attention_reference_is_the_own_cell_on_a_non_square_map():
    """Zero offsets, identity projections: each query samples exactly its own cell (pixel
    centre), so the output is the residual plus itself. A transposed reference would mix cells."""
    torch.manual_seed(2)
    rows, cols, c = 3, 5, 4
    sa = BevSelfAttention(c, num_heads=2, num_points=3, dropout=0.0, impl="pytorch").double()
    with torch.no_grad():
        sa.attn.sampling_offsets.weight.zero_()
        sa.attn.sampling_offsets.bias.zero_()
        for lin in (sa.attn.value_proj, sa.output_proj):
            lin.weight.copy_(torch.eye(c))
            lin.bias.zero_()
    head = BEVFormer(4, BevGrid(x_bounds=(0, 3), y_bounds=(0, 5), resolution=1.0, z_bins=1), latent_dim=4,
                     num_heads=2, cross_points=1)
    _, ref_2d = head.geometry(torch.device("cpu"))
    query = torch.randn(2, rows * cols, c, dtype=torch.float64)
    out = sa(query, torch.randn_like(query), ref_2d.double(), (rows, cols))
    torch.testing.assert_close(out, 2 * query, atol=1e-5, rtol=0)  # float32 reference points


# ------------------------------------------------------------------ geometry


def test_pillar_visibility_equals_simplebev_lifting_per_camera():
    K, T = rig(batch=2)
    T[1] = T[1].roll(1, 0)  # a different rig for the second sample
    H, W, h, w = 48, 96, 12, 24
    head = BEVFormer(3, GRID, latent_dim=8, num_heads=2, cross_points=2)
    loc, seen = project_pillars(head.pillar_points(), K, T, (H, W), (h, w))
    nx, ny = GRID.shape
    assert loc.shape == (2, 6, nx * ny, GRID.z_bins, 2) and seen.shape == (2, 6, nx * ny, GRID.z_bins)
    feats = torch.ones(2, 1, 1, h, w)
    for n in range(6):
        _, views = lift_to_voxels(feats, K[:, n:n + 1], T[:, n:n + 1], (H, W), GRID)
        assert torch.equal(seen[:, n], views.view(2, nx * ny, GRID.z_bins).bool()), n
    valid = seen.any(-1)
    assert 0 < valid.float().mean() < 1 and (valid.sum(1) >= 2).any()  # partial views, some overlaps
    # seen points land inside [0, 1]^2; the same transform as an independent projection
    assert ((loc[seen] >= 0) & (loc[seen] <= 1)).all()
    pts = head.pillar_points().reshape(-1, 3).double()
    Tn, Kn = T[0, 2].double(), K[0, 2].double() * torch.tensor([[w / W], [h / H], [1.0]], dtype=torch.float64)
    cam = (pts - Tn[:3, 3]) @ Tn[:3, :3]
    uvw = cam @ Kn.T
    front = cam[:, 2] > 0.1
    expect = torch.stack([uvw[:, 0] / uvw[:, 2] / w, uvw[:, 1] / uvw[:, 2] / h], -1)[front].clamp(-0.5, 1.5)
    torch.testing.assert_close(loc[0, 2].reshape(-1, 2)[front].double(), expect, atol=1e-4, rtol=0)
    assert (loc[0, 2].reshape(-1, 2)[cam[:, 2] < 0] == BF.BEHIND_CAMERA).all()


def test_reference_heights_grid_bins_or_bevformer_anchors():
    torch.testing.assert_close(reference_heights(BevGrid()), BevGrid().z_centers())
    assert reference_heights(BevGrid())[0].item() == pytest.approx(-3.375)
    # BEVFormer: 4 anchors over pc_range z [-5, 3]
    bevformer = reference_heights(BevGrid(z_bounds=(-5.0, 3.0)), 4)
    torch.testing.assert_close(bevformer, torch.tensor([-4.5, -13 / 6, 1 / 6, 2.5], dtype=torch.float64))


def test_rebatch_gathers_each_cameras_queries_and_averages_back():
    valid = torch.tensor([[[1, 0, 1, 0], [0, 0, 1, 1]], [[0, 0, 0, 0], [1, 1, 1, 0]]], dtype=torch.bool)  # (B, N, Q)
    rb = Rebatch(valid)
    assert rb.max_len == 3
    assert rb.index.tolist()[0][:2] == [0, 2] and rb.index.tolist()[3] == [0, 1, 2]
    assert rb.keep.sum(1).tolist() == [2, 2, 0, 3]
    x = torch.arange(2 * 4, dtype=torch.float64).view(2, 4, 1) + 1
    g = rb.gather(x)  # (B*N, Lmax, 1)
    assert g[1, :2, 0].tolist() == [3.0, 4.0] and g[3, :, 0].tolist() == [5.0, 6.0, 7.0]
    torch.testing.assert_close(rb.scatter_sum(g) / valid.sum(1).clamp_min(1)[..., None],
                               x * valid.any(1)[..., None])  # the mean of identical copies; zero where unseen
    torch.testing.assert_close(rb.scatter_sum(torch.ones_like(g)), valid.sum(1)[..., None].double())


# ------------------------------------------------------------------ the head


def _inputs(batch=2, channels=6, hw=(12, 24), image_size=(48, 96)):
    K, T = rig(batch=batch, image_size=image_size)
    return torch.randn(batch, 6, channels, *hw), K, T, image_size


@pytest.mark.parametrize("decoder", ["conv", "simplebev"])
def test_head_shapes_with_coarse_queries_levels_and_anchor_heights(decoder):
    torch.manual_seed(3)
    head = BEVFormer(6, GRID, latent_dim=16, num_layers=2, num_heads=2, self_points=2, cross_points=4,
                     num_heights=2, num_levels=2, ffn_dim=8, query_downsample=2, decoder=decoder)
    assert head.query_shape == (6, 4) and head.heights.tolist() == [-0.5, 2.5]
    f, K, T, size = _inputs()
    out = head(f, K, T, size)
    nx, ny = GRID.shape
    assert out["seg"].shape == (2, 1, nx, ny) and out["offset"].shape == (2, 2, nx, ny)
    assert ((out["centerness"] >= 0) & (out["centerness"] <= 1)).all()
    assert "point_mask" not in out and all(torch.isfinite(v).all() for v in out.values())
    assert 0 < head.last_cross_pairs <= 2 * 6 * 24


def test_gradients_reach_queries_offsets_weights_and_head():
    """The positional embedding enters only the offsets and attention weights (BEVFormer), whose
    weight matrices start at zero: it gets gradients once they have moved (after a step), as here."""
    torch.manual_seed(4)
    head = BEVFormer(6, GRID, latent_dim=16, num_layers=2, num_heads=2, self_points=2, cross_points=2, ffn_dim=8,
                     layer_query="chained")
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith(("sampling_offsets.weight", "attention_weights.weight")):
                p.normal_(0, 0.01)
    f, K, T, size = _inputs()
    f.requires_grad_(True)
    out = head(f, K, T, size)
    (out["seg"].square().mean() + out["centerness"].mean() + out["offset"].abs().mean()).backward()
    layer = head.layers[0]
    for name, p in [("bev_queries", head.bev_queries), ("row_embed", head.row_embed), ("col_embed", head.col_embed),
                    ("self offsets", layer.self_attn.attn.sampling_offsets.weight),
                    ("self weights", layer.self_attn.attn.attention_weights.weight),
                    ("cross offsets", layer.cross_attn.attn.sampling_offsets.weight),
                    ("cross weights", layer.cross_attn.attn.attention_weights.weight),
                    ("cross values", layer.cross_attn.attn.value_proj.weight), ("neck", head.neck.weight),
                    ("seg head", head.segmentation_head[0].weight), ("offset head", head.instance_offset_head[-1].weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert f.grad.abs().sum() > 0


def test_no_camera_sees_the_grid():
    """Cameras looking up: no valid pair, the cross-attention is skipped, outputs stay finite."""
    head = BEVFormer(6, GRID, latent_dim=16, num_layers=1, num_heads=2, cross_points=2, ffn_dim=8).eval()
    f, K, _, size = _inputs(batch=1)
    up = torch.from_numpy(G.transform_matrix((0, 0, 1.6), np.array([[1.0, 0, 0], [0, -1.0, 0], [0, 0, -1.0]]))).float()
    out = head(f, K, up.expand(1, 6, 4, 4).clone(), size)
    assert head.last_cross_pairs == 0 and torch.isfinite(out["seg"]).all()


def test_uncounted_flops_counts_the_sampling_taps():
    head = BEVFormer(6, GRID, latent_dim=16, num_layers=3, num_heads=2, self_points=4, cross_points=2, ffn_dim=8,
                     layer_query="chained")
    q = 12 * 8
    per_tap = 4 * 2 * 16  # 4 taps x 2 FLOPs x (heads x head dim)
    assert head.uncounted_flops(6) == 3 * (q * 4 * per_tap + q * 6 * 2 * per_tap)  # before any forward: every camera
    f, K, T, size = _inputs(batch=1)
    with torch.no_grad():
        head(f, K, T, size)
    assert head.last_cross_pairs < q * 6
    assert head.uncounted_flops(6) == 3 * (q * 4 * per_tap + head.last_cross_pairs * 2 * per_tap)
    # layer_query="pointbev": one layer runs
    single = BEVFormer(6, GRID, latent_dim=16, num_layers=3, num_heads=2, self_points=4, cross_points=2, ffn_dim=8)
    assert single.uncounted_flops(6) == q * 4 * per_tap + q * 6 * 2 * per_tap


def test_layer_query_pointbev_is_the_last_layer_on_the_initial_query():
    """layer_query="pointbev" against a transcription of PointBeV's loop (pointbev/models/
    view_transform/attention.py, DefAttnVT.forward: ``for i in range(n_layers): queries =
    layer_i(query, query_pos)``, every layer on the initial ``query``; pointbev/models/
    bevformer.py: ``query_pos`` is the same query parameter; pointbev/models/layers/
    attention.py, SADefnAttn: the values are ``query + query_pos``), run with the layers of a
    chained head; and "chained" against the plain sequence."""
    torch.manual_seed(5)
    kw = dict(latent_dim=16, num_layers=3, num_heads=2, self_points=2, cross_points=2, ffn_dim=8)
    chained = BEVFormer(6, GRID, layer_query="chained", **kw).eval()
    with torch.no_grad():
        for name, p in chained.named_parameters():
            if name.endswith(("sampling_offsets.weight", "attention_weights.weight")):
                p.normal_(0, 0.05)  # away from the zero init, so that the positional embedding matters
    f, K, T, size = _inputs(batch=1)
    with torch.no_grad():
        query, _, context = chained.layer_inputs(f, K, T, size)
        q0 = chained.bev_queries[None]
        for layer in chained.layers:  # PointBeV's loop
            queries = layer(query, q0, *context, value_with_pos=True)
        expected = chained.dense(queries)
        pointbev = BEVFormer(6, GRID, layer_query="pointbev", **kw).eval()
        assert len(pointbev.layers) == 1 and not hasattr(pointbev, "row_embed")
        own = {k: v for k, v in chained.state_dict().items() if not k.startswith(("layers.", "row_embed", "col_embed"))}
        own.update({f"layers.0.{k}": v for k, v in chained.layers[-1].state_dict().items()})
        pointbev.load_state_dict(own)
        got = pointbev(f, K, T, size)
        for key in ("seg", "centerness", "offset"):
            torch.testing.assert_close(got[key], expected[key])
        # the earlier layers do not reach PointBeV's output; they do reach the chained head's
        assert not torch.allclose(chained(f, K, T, size)["seg"], got["seg"])
        # values without the positional embedding (BEVFormer) would give another output
        other = chained.dense(chained.layers[-1](query, q0, *context, value_with_pos=False))
        assert not torch.allclose(other["seg"], got["seg"])


def test_layer_query_pointbev_all_layers_runs_every_layer_and_keeps_pointbev_output():
    """layer_query="pointbev_all_layers" builds and runs PointBeV's num_layers layers, each on the
    initial query (pointbev/models/view_transform/attention.py, DefAttnVT.forward), and keeps the
    last one's output: "pointbev"'s output given the same weights for that layer, at num_layers
    times the layers' cost; the discarded layers get no gradient (as in PointBeV)."""
    torch.manual_seed(6)
    kw = dict(latent_dim=16, num_layers=3, num_heads=2, self_points=2, cross_points=2, ffn_dim=8)
    every = BEVFormer(6, GRID, layer_query="pointbev_all_layers", **kw).eval()
    assert len(every.layers) == 3 and not hasattr(every, "row_embed")
    with torch.no_grad():
        for name, p in every.named_parameters():
            if name.endswith(("sampling_offsets.weight", "attention_weights.weight")):
                p.normal_(0, 0.05)
    single = BEVFormer(6, GRID, layer_query="pointbev", **kw).eval()
    own = {k: v for k, v in every.state_dict().items() if not k.startswith("layers.")}
    own.update({f"layers.0.{k}": v for k, v in every.layers[-1].state_dict().items()})
    single.load_state_dict(own)
    calls = []
    for i, layer in enumerate(every.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.append(i))
    f, K, T, size = _inputs(batch=1)
    with torch.no_grad():
        got, expected = every(f, K, T, size), single(f, K, T, size)
    assert calls == [0, 1, 2]
    for key in ("seg", "centerness", "offset"):
        torch.testing.assert_close(got[key], expected[key])
    assert every.uncounted_flops(6) == 3 * single.uncounted_flops(6)
    every.train()
    out = every(f, K, T, size)
    (out["seg"].square().mean() + out["offset"].abs().mean()).backward()
    assert all(p.grad is None for layer in every.layers[:-1] for p in layer.parameters())
    assert every.layers[-1].ffn[0].weight.grad.abs().sum() > 0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="query_downsample"):
        BEVFormer(6, GRID, query_downsample=3)
    with pytest.raises(ValueError, match="cross_points"):
        BEVFormer(6, GRID, cross_points=3)  # 2 heights
    with pytest.raises(ValueError, match="decoder"):
        BEVFormer(6, GRID, cross_points=2, decoder="unet")
    with pytest.raises(ValueError, match="deform_attn_impl"):
        BEVFormer(6, GRID, cross_points=2, deform_attn_impl="cuda")
    with pytest.raises(ValueError, match="latent_dim"):
        BEVFormer(6, GRID, cross_points=2, latent_dim=18, num_heads=4)
    with pytest.raises(ValueError, match="layer_query must be one of"):
        BEVFormer(6, GRID, cross_points=2, layer_query="last")
    head = BEVFormer(6, GRID, latent_dim=8, num_heads=2, cross_points=2, num_layers=1)
    f, K, T, size = _inputs(channels=5)
    with pytest.raises(ValueError, match="features"):
        head(f, K, T, size)


# ------------------------------------------------------------------ the mmcv switch


def test_mmcv_missing_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mmcv", None)  # import mmcv -> ImportError, installed or not
    monkeypatch.delitem(sys.modules, "mmcv.ops", raising=False)
    monkeypatch.delitem(sys.modules, "mmcv.ops.multi_scale_deform_attn", raising=False)
    with pytest.raises(ImportError, match="deform_attn_impl='mmcv' needs mmcv built with its ops"):
        BEVFormer(6, GRID, cross_points=2, deform_attn_impl="mmcv")


def test_mmcv_kernel_gets_mmcvs_arguments(monkeypatch):
    """A stand-in with mmcv's signature ``apply(value (B, S, M, D), spatial_shapes (L, 2) long,
    level_start_index (L,) long, sampling_locations, attention_weights, im2col_step)``: the head
    calls it on a kernel device and gives the PyTorch path's result."""
    calls = []

    class FakeFunction:
        @staticmethod
        def apply(value, shapes, start, loc, weights, step):
            calls.append((value.shape, shapes.tolist(), start.tolist(), step))
            assert shapes.dtype == torch.long and value.shape[0] % step == 0
            return ms_deform_attn_pytorch(value, shapes, loc, weights)

    ops = types.ModuleType("mmcv.ops.multi_scale_deform_attn")
    ops.MultiScaleDeformableAttnFunction = FakeFunction
    monkeypatch.setitem(sys.modules, "mmcv", types.ModuleType("mmcv"))
    monkeypatch.setitem(sys.modules, "mmcv.ops", types.ModuleType("mmcv.ops"))
    monkeypatch.setitem(sys.modules, "mmcv.ops.multi_scale_deform_attn", ops)
    torch.manual_seed(5)
    kw = dict(latent_dim=16, num_layers=1, num_heads=2, self_points=2, cross_points=2, num_levels=2, ffn_dim=8)
    ref = BEVFormer(6, GRID, **kw).eval()
    mm = BEVFormer(6, GRID, deform_attn_impl="mmcv", **kw).eval()
    mm.load_state_dict(ref.state_dict())
    f, K, T, size = _inputs()
    expected = ref(f, K, T, size)["seg"]
    torch.testing.assert_close(mm(f, K, T, size)["seg"], expected)
    assert not calls  # CPU tensors: the PyTorch path, as mmcv's own module does
    monkeypatch.setattr(BF, "_kernel_device", lambda t: True)
    torch.testing.assert_close(mm(f, K, T, size)["seg"], expected)
    assert len(calls) == 2  # self- and cross-attention of the one layer
    assert calls[1][1] == [[12, 24], [6, 12]] and calls[1][2] == [0, 288]


# ------------------------------------------------------------------ training through bev.run


def test_bevformer_trains_and_validates_through_run(synthetic_root, tmp_path):
    pytest.importorskip("nuscenes")
    from bev.run import run
    from conftest import compose_bev_demo

    cfg = compose_bev_demo(synthetic_root, "model=bevformer", "model.latent_dim=16", "model.num_layers=2",
                           "model.num_heads=2", "model.ffn_dim=16", "model.self_points=2", "model.cross_points=8",
                           "model.layer_query=chained", "data.bev_augment=pointbev")
    # the demo turns BeV augmentation off; this run trains through PointBeV's moved frame
    assert cfg.model.name == "bevformer" and cfg.data.bev_augment == "pointbev"
    results = run(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["model"] == "bevformer" and saved["step"] == 1
    assert 0.0 <= saved["val"]["iou"] <= 1.0 and set(saved["val"]) >= {"iou_vis1", "iou_vis2"}
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert "head.bev_queries" in state and "head.layers.1.cross_attn.attn.sampling_offsets.weight" in state
    assert results["val"] == saved["val"]
