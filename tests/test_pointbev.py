"""PointBeV head (bev/heads/pointbev.py): the sparse U-Net equals a dense network with the same
weights on a full grid, the lifting on valid pairs equals SimpleBeV's dense lifting, the coarse
and fine sampling, the sparse training output and its point_mask, dense evaluation, the FLOP
count, a training and a validation step through bev.run.run, and the import without spconv."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bev.geometry import BevGrid
from bev.heads.common import lift_to_voxels

try:
    import spconv.pytorch as spconv
except ImportError:
    spconv = None

needs_spconv = pytest.mark.skipif(spconv is None, reason="spconv is not installed")
GRID = BevGrid(x_bounds=(-13.0, 13.0), y_bounds=(-10.0, 10.0), resolution=2.0, z_bins=4)  # 13 x 10 cells


def _cameras(b=1, n=4, hw=(32, 48), focal=20.0):
    """``n`` cameras on a ring around the ego looking outwards, narrow enough that some voxels
    are seen by no camera and some by two."""
    H, W = hw
    cam2ego = torch.eye(4).repeat(b, n, 1, 1)
    base = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # camera -> ego, facing +x
    for k in range(n):
        yaw = 2 * math.pi * k / n + 0.3
        rz = torch.tensor([[math.cos(yaw), -math.sin(yaw), 0.0], [math.sin(yaw), math.cos(yaw), 0.0], [0.0, 0.0, 1.0]])
        cam2ego[:, k, :3, :3] = rz @ base
        cam2ego[:, k, :3, 3] = torch.tensor([0.5 * k, -0.3, 1.5])
    K = torch.tensor([[focal, 0.0, W / 2], [0.0, focal * 1.1, H / 2], [0.0, 0.0, 1.0]]).repeat(b, n, 1, 1)
    return K, cam2ego


def _head(**kw):
    from bev.heads.pointbev import PointBeV

    args = dict(in_channels=6, grid=GRID, latent_dim=16, unet_channels=8, N_coarse=30, N_fine=20, N_anchor=3,
                fine_patch_size=3)
    args.update(kw)
    return PointBeV(**args)


def _inputs(b=2, n=4, c=6, hw=(32, 48), feat_hw=(8, 12)):
    torch.manual_seed(0)
    K, cam2ego = _cameras(b, n, hw)
    return torch.randn(b, n, c, *feat_hw), K, cam2ego, hw


# ---------------------------------------------------------------------------------------------
# the sparse U-Net and the heads against dense convolutions
# ---------------------------------------------------------------------------------------------

def _w(conv):
    """spconv 2 weight (out, kh, kw, in) -> torch Conv2d weight (out, in, kh, kw)."""
    return conv.weight.permute(0, 3, 1, 2)


def _bn(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training, 0.0, bn.eps)


def _dense_unet(net, x):
    """The same network written with dense torch ops on a full (B, C, X, Y) grid, reading the
    sparse network's weights: submanifold conv = Conv2d with 'same' zero padding, sparse max
    pool = MaxPool2d(3, 2, 1), inverse conv = ConvTranspose2d (stride 2, padding 1) back to the
    pooled input's size."""
    def subm(conv, t):
        k = conv.weight.shape[1]
        return F.conv2d(t, _w(conv), conv.bias, padding=k // 2)

    def block(blk, t):
        out = F.relu(_bn(subm(blk.conv1, t), blk.bn1))
        out = _bn(subm(blk.conv2, out), blk.bn2)
        identity = t if blk.proj is None else _bn(F.conv2d(t, blk.proj.weight[:, :, None, None]), blk.proj_bn)
        return F.relu(out + identity)

    skips = [x]
    t = F.relu(_bn(subm(net.first_conv, x), net.first_bn))
    for level, blocks in enumerate(net.levels):
        for blk in blocks:
            t = block(blk, t)
        t = F.max_pool2d(t, 3, 2, 1)
        if level < 2:
            skips.append(t)
    for level in (2, 1, 0):
        skip = skips[level]
        w = net.ups[level].weight.permute(3, 0, 1, 2)  # (in, out, kh, kw)
        pad = (skip.shape[2] - ((t.shape[2] - 1) * 2 + 1), skip.shape[3] - ((t.shape[3] - 1) * 2 + 1))
        t = _bn(F.conv_transpose2d(t, w, stride=2, padding=1, output_padding=pad), net.up_bns[level]) + skip
    return t


def _dense_head(head, t):
    y = F.conv2d(t, _w(head.conv), padding=1)
    y = F.relu(F.layer_norm(y.permute(0, 2, 3, 1), y.shape[1:2], eps=1e-5)).permute(0, 3, 1, 2)
    return F.conv2d(y, head.out.weight[:, :, None, None], head.out.bias)


def _full(b, x, y):
    return torch.stack(torch.meshgrid(torch.arange(b), torch.arange(x), torch.arange(y), indexing="ij"), -1
                       ).reshape(-1, 3).to(torch.int32)


@needs_spconv
@pytest.mark.parametrize("train", [False, True])
def test_sparse_unet_on_a_full_grid_equals_dense_convolutions(train):
    from bev.heads.pointbev import SparseHead, SparseUNet

    torch.manual_seed(0)
    b, c, X, Y = 2, 12, 13, 10  # odd and even sizes: the pools' and inverse convs' output sizes differ
    net, head = SparseUNet(c, mid=8), SparseHead(c, 2, "subm0_k3")
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm1d):  # non-trivial statistics and affine parameters
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
        head.out.bias.normal_()
    net.train(train)
    dense_in = torch.randn(b, c, X, Y, dtype=torch.float64).float().requires_grad_()
    indices = _full(b, X, Y)
    feats = dense_in.permute(0, 2, 3, 1).reshape(-1, c)
    out_sp = net(spconv.SparseConvTensor(feats, indices, [X, Y], b))
    logits_sp = head(out_sp)
    assert torch.equal(out_sp.indices, indices)  # same sites, same order
    as_dense = out_sp.features.view(b, X, Y, c).permute(0, 3, 1, 2)

    ref = _dense_unet(net, dense_in)
    torch.testing.assert_close(as_dense, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits_sp.view(b, X, Y, 2).permute(0, 3, 1, 2), _dense_head(head, ref),
                               rtol=1e-4, atol=1e-4)
    # gradients agree too
    g_sp, = torch.autograd.grad(logits_sp.square().sum(), dense_in)
    g_ref, = torch.autograd.grad(_dense_head(head, _dense_unet(net, dense_in)).square().sum(), dense_in)
    torch.testing.assert_close(g_sp, g_ref, rtol=1e-3, atol=1e-4)
    # negative control: the transposed conv with a flipped kernel is not what spconv computes
    assert (as_dense - ref).abs().max() < 1e-3 < (ref - ref.flip(-1)).abs().max()


@needs_spconv
def test_sparse_conv_flops_match_the_flop_counter_on_the_cpu():
    """spconv's native CPU path multiplies with torch.mm per kernel tap, which FlopCounterMode
    counts: the analytic count of the pairs each spconv layer uses, plus the per-site linear
    maps, must equal it, dense or sparse."""
    from torch.utils.flop_counter import FlopCounterMode

    from bev.heads.pointbev import sparse_conv_flops

    head = _head()
    head.eval()
    X, Y = GRID.shape
    for active in (torch.ones(2, X, Y, dtype=torch.bool), torch.rand(2, X, Y) < 0.3):
        idx = active.nonzero().to(torch.int32)  # a strided view: the U-Net must cope with it
        assert not idx.is_contiguous()
        x = spconv.SparseConvTensor(torch.randn(len(idx), head.latent_dim), idx, [X, Y], 2)
        linear = []  # FLOPs of the per-site linear maps, which are no spconv layers

        def count(m, inputs, output, linear=linear):
            linear.append(2 * inputs[0].shape[0] * m.in_features * m.out_features)

        hooks = [m.register_forward_hook(count) for m in head.modules() if isinstance(m, torch.nn.Linear)]
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            y = head.unet(x)
            for h in (head.segmentation_head, head.instance_center_head, head.instance_offset_head):
                h(y)
        for h in hooks:
            h.remove()
        assert len(linear) == 2 + 3  # the projections of levels 2 and 3, the heads' outputs
        assert counter.get_total_flops() == sparse_conv_flops(head, active) + sum(linear) > sum(linear)


# ---------------------------------------------------------------------------------------------
# lifting on points
# ---------------------------------------------------------------------------------------------

def test_features_on_valid_pairs_equal_the_dense_lifting_at_the_sampled_pillars():
    from bev.heads.pointbev import gather_point_features

    features, K, cam2ego, hw = _inputs()
    voxels, views = lift_to_voxels(features, K, cam2ego, hw, GRID)  # (B, C, X, Y, Z), (B, X, Y, Z)
    X, Y = GRID.shape
    centers = GRID.voxel_centers().float().flatten(0, 1)  # (X Y, Z, 3)
    cells = torch.stack([torch.randperm(X * Y)[:40] for _ in range(2)])
    mean, seen, pairs = gather_point_features(features, K, cam2ego, hw, centers[cells].flatten(1, 2))
    ref = voxels.flatten(2, 3).permute(0, 2, 3, 1)  # (B, X Y, Z, C)
    ref = torch.stack([ref[i, cells[i]] for i in range(2)]).flatten(1, 2)
    ref_views = torch.stack([views.flatten(1, 2)[i, cells[i]] for i in range(2)]).flatten(1, 2)
    assert torch.equal(seen, ref_views)
    assert (ref_views == 0).any() and (ref_views > 1).any()  # unseen and multiply-seen points both occur
    assert pairs == int(ref_views.sum()) < 4 * ref_views.numel()  # only the valid pairs were sampled
    torch.testing.assert_close(mean, ref, rtol=1e-5, atol=1e-6)
    assert mean[ref_views == 0].abs().max() == 0


def test_bad_points_are_refused():
    from bev.heads.pointbev import gather_point_features

    features, K, cam2ego, hw = _inputs()
    with pytest.raises(ValueError, match="points must be a"):
        gather_point_features(features, K, cam2ego, hw, torch.zeros(3, 5, 3))


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------

@needs_spconv
def test_coarse_sampling_draws_distinct_cells_inside_the_grid():
    head = _head(N_coarse=37)
    cells = head.sample_coarse(3, torch.device("cpu"))
    assert cells.shape == (3, 37)
    for row in cells:
        assert len(row.unique()) == 37 and row.min() >= 0 and row.max() < head.num_cells
    assert not torch.equal(cells[0], cells[1])  # each sample its own draw
    assert _head(N_coarse=10_000).N_coarse == head.num_cells  # clamped to the grid


@needs_spconv
def test_draws_are_a_function_of_the_seed_and_the_forward_count():
    """A resumed run (same seed, the checkpointed ``draws`` counter) draws the same cells as the
    uninterrupted run."""
    torch.manual_seed(3)
    a, b = _head(), _head()
    first = a.sample_coarse(2, torch.device("cpu"), a.generator(torch.device("cpu")))
    second = a.sample_coarse(2, torch.device("cpu"), a.generator(torch.device("cpu")))
    assert int(a.draws) == 2 and not torch.equal(first, second)
    torch.randn(100)  # the global random state moves on: the draws do not depend on it
    assert torch.equal(b.sample_coarse(2, torch.device("cpu"), b.generator(torch.device("cpu"))), first)
    b.load_state_dict(a.state_dict())
    third = a.sample_coarse(2, torch.device("cpu"), a.generator(torch.device("cpu")))
    assert torch.equal(b.sample_coarse(2, torch.device("cpu"), b.generator(torch.device("cpu"))), third)


@needs_spconv
def test_counts_scale_with_the_grid_when_given_for_a_reference_grid():
    head = _head(N_coarse=2500, N_fine=2500, N_anchor=100, reference_cells=40_000)  # 130 cells
    assert (head.N_coarse, head.N_fine, head.N_anchor) == (8, 8, 1)  # round(130 * 0.0625) = 8, 100 * 130 / 4e4 -> 1
    from bev.heads.pointbev import PointBeV

    full = PointBeV(4, BevGrid(), latent_dim=8, unet_channels=4, reference_cells=40_000)
    assert (full.N_coarse, full.N_fine, full.N_anchor) == (2500, 2500, 100)  # PointBeV's own numbers


@needs_spconv
def test_fine_pass_takes_the_windows_of_the_best_anchors_first():
    X, Y = GRID.shape
    head = _head(N_anchor=2, fine_patch_size=3, N_fine=12)
    cells = torch.arange(X * Y)[None]
    logits = torch.full((1, X * Y), -5.0)
    a, b = 3 * Y + 3, 9 * Y + 7  # anchors at (3, 3), score highest, and (9, 7)
    logits[0, a], logits[0, b] = 5.0, 4.0
    logits[0, 6 * Y + 0] = 3.0  # third best: not an anchor with N_anchor = 2

    def window(cell):
        r, c = divmod(cell, Y)
        return {(r + i) * Y + (c + j) for i in (-1, 0, 1) for j in (-1, 0, 1)}

    fine = set(head.sample_fine(cells, logits)[0].tolist())
    assert len(fine) == 12 and window(a) <= fine and fine <= window(a) | window(b)  # a's window, then 3 of b's
    head = _head(N_anchor=2, fine_patch_size=3, N_fine=30)
    fine = head.sample_fine(cells, logits)[0]
    assert len(fine.unique()) == 30 and fine.max() < X * Y
    assert window(a) | window(b) <= set(fine.tolist())  # both windows, then random cells
    # anchors are only taken among the coarse pass's cells; "dyna": every cell above fine_thresh
    coarse = torch.tensor([[b, 6 * Y + 0, 0, 1]])
    fine = set(_head(N_anchor=1, fine_patch_size=3, N_fine=9).sample_fine(coarse, torch.tensor([[4.0, 3.0, -5, -5]]))[0].tolist())
    assert fine == window(b)
    dyna = _head(N_anchor="dyna", fine_thresh=0.97, fine_patch_size=3, N_fine=18)  # sigmoid 0.993, 0.982 | 0.953
    assert set(dyna.sample_fine(cells, logits)[0].tolist()) == window(a) | window(b)


# ---------------------------------------------------------------------------------------------
# the head's outputs
# ---------------------------------------------------------------------------------------------

@needs_spconv
def test_training_predicts_the_sampled_cells_and_point_mask_marks_exactly_them(monkeypatch):
    head = _head()
    head.train()
    features, K, cam2ego, hw = _inputs()
    X, Y = GRID.shape
    coarse = torch.stack([torch.randperm(X * Y)[:30] for _ in range(2)])
    fine = torch.stack([torch.cat([coarse[i, :5], torch.tensor([c for c in torch.randperm(X * Y).tolist()
                                                                 if c not in coarse[i].tolist()][:15])])
                        for i in range(2)])  # 5 cells in both passes, 15 only in the fine pass
    seen = {}

    def fake_fine(cells, logits, generator):
        seen["logits"] = logits
        return fine

    monkeypatch.setattr(head, "sample_coarse", lambda b, device, generator: coarse)
    monkeypatch.setattr(head, "sample_fine", fake_fine)
    out = head(features, K, cam2ego, hw)
    assert out["seg"].shape == (2, 1, X, Y) and out["offset"].shape == (2, 2, X, Y)
    mask = out["point_mask"]
    assert mask.dtype == torch.bool and mask.shape == (2, 1, X, Y)
    expected = torch.zeros(2, X * Y, dtype=torch.bool)
    expected.scatter_(1, coarse, True).scatter_(1, fine, True)
    assert torch.equal(mask.view(2, -1), expected) and int(mask.sum()) == 2 * 45
    for key in ("seg", "centerness", "offset"):
        assert out[key][~mask.expand_as(out[key])].abs().max() == 0  # nothing outside the predicted cells
    assert (out["centerness"][mask] > 0).all()  # a sigmoid everywhere it predicted
    # each pass's prediction lands on its cells; cells of both passes get the mean
    latent = head.neck(features.flatten(0, 1)).unflatten(0, (2, 4))
    with torch.no_grad():
        pc, _ = head.predict(latent, K, cam2ego, hw, coarse)
        pf, _ = head.predict(latent, K, cam2ego, hw, fine)
    seg = out["seg"].view(2, -1)
    torch.testing.assert_close(seen["logits"], pc["seg"][..., 0])  # the fine pass read the coarse scores
    for i in range(2):
        torch.testing.assert_close(seg[i, coarse[i, 5:]], pc["seg"][i, 5:, 0])
        torch.testing.assert_close(seg[i, fine[i, 5:]], pf["seg"][i, 5:, 0])
        torch.testing.assert_close(seg[i, coarse[i, :5]], (pc["seg"][i, :5, 0] + pf["seg"][i, :5, 0]) / 2)
    # the gradient reaches the neck through both passes
    out["seg"].sum().backward()
    assert head.neck.weight.grad.abs().sum() > 0


@needs_spconv
def test_the_real_sampling_in_training_and_dense_evaluation():
    head = _head()
    features, K, cam2ego, hw = _inputs()
    X, Y = GRID.shape
    head.train()
    out = head(features, K, cam2ego, hw)
    per_sample = out["point_mask"].view(2, -1).sum(1)
    assert ((per_sample >= 30) & (per_sample <= 50)).all()  # 30 coarse + 20 fine, possibly overlapping
    dense = _head(N_coarse=X * Y)  # a coarse pass on every cell: dense training, no fine pass
    out = dense(features, K, cam2ego, hw)
    assert out["point_mask"].all() and len(dense._last["active"]) == 1
    head.eval()
    with torch.no_grad():
        out = head(features, K, cam2ego, hw)
    assert "point_mask" not in out and out["seg"].shape == (2, 1, X, Y)
    assert (out["centerness"] > 0).all() and (out["centerness"] < 1).all()  # every cell predicted
    assert torch.isfinite(out["offset"]).all()
    # dense evaluation is the pass on all cells, row-major (rows along x, columns along y)
    latent = head.neck(features.flatten(0, 1)).unflatten(0, (2, 4))
    with torch.no_grad():
        ref, _ = head.predict(latent, K, cam2ego, hw, torch.arange(X * Y).expand(2, -1))
    torch.testing.assert_close(out["seg"][:, 0, 4, 7], ref["seg"][:, 4 * Y + 7, 0])


@needs_spconv
def test_cpu_threads_change_the_heads_thread_count_only(monkeypatch):
    """``cpu_threads=1``: forward and backward of the head run on one thread, the rest of the step
    on torch's count, restored after both; the numbers are those of the head without it."""
    features, K, cam2ego, hw = _inputs()
    features.requires_grad_()
    grads, seen = [], []
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # torch's count, whatever the machine
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    for threads in (None, 1):
        torch.manual_seed(0)
        head = _head(cpu_threads=threads)
        head.height_compressor.register_full_backward_hook(lambda *a: seen.append(list(calls)))
        head.train()
        out = head(features, K, cam2ego, hw)
        after_forward = list(calls)
        (out["seg"].square().sum() + out["offset"].sum()).backward()
        grads.append((features.grad.clone(), head.neck.weight.grad.clone()))
        features.grad = None
        if threads is None:
            assert calls == []
    assert after_forward == [1, 2]  # the forward on 1 thread, then back to 2
    assert seen[-1][-1] == 1  # inside the head's backward: 1 thread
    assert calls[-1] == 2  # after the backward: 2 again
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@needs_spconv
def test_uncounted_flops_count_the_sampled_pairs():
    head = _head()
    X, Y = GRID.shape
    upper = X * Y * GRID.z_bins * 4 * head.latent_dim * 8
    assert head.uncounted_flops(4) == upper  # before any forward: every pair of a dense pass
    features, K, cam2ego, hw = _inputs()
    head.eval()
    with torch.no_grad():
        head(features, K, cam2ego, hw)
    _, views = lift_to_voxels(features, K, cam2ego, hw, GRID)
    assert head.uncounted_flops(4) == int(views.sum()) * head.latent_dim * 8 < 2 * upper
    with pytest.raises(ValueError, match="num_cameras"):
        head.uncounted_flops(0)


@needs_spconv
def test_bad_settings_are_refused():
    for kw, match in ((dict(N_coarse=0), "N_coarse"), (dict(fine_patch_size=4), "odd"),
                      (dict(N_anchor="all"), "N_anchor"), (dict(fine_thresh=1.5), "fine_thresh"),
                      (dict(reference_cells=-1), "reference_cells"), (dict(cpu_threads=0), "cpu_threads"),
                      (dict(grid="200x200"), "BevGrid")):
        with pytest.raises(ValueError, match=match):
            _head(**kw)
    head = _head()
    features, K, cam2ego, hw = _inputs(c=5)
    with pytest.raises(ValueError, match="features must be"):
        head(features, K, cam2ego, hw)


def test_imports_without_spconv_and_says_so_when_built(monkeypatch):
    """The GPU machine has no spconv: the module must import, and building the head must fail
    with one sentence naming the package."""
    monkeypatch.setitem(sys.modules, "spconv", None)
    monkeypatch.setitem(sys.modules, "spconv.pytorch", None)
    from bev.heads import common
    from jafar.registry import Registry

    monkeypatch.setattr(common, "HEADS", Registry("BeV head"))  # the second copy registers "pointbev" there
    path = Path(__file__).resolve().parents[1] / "bev" / "heads" / "pointbev.py"
    spec = importlib.util.spec_from_file_location("bev.heads._pointbev_without_spconv", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.spconv is None
    with pytest.raises(ImportError, match=r"^PointBeV needs spconv 2.x, which is not installed: pip install spconv-cu120"):
        module.PointBeV(in_channels=4, grid=GRID)


# ---------------------------------------------------------------------------------------------
# a training and a validation step through bev.run.run
# ---------------------------------------------------------------------------------------------

@needs_spconv
def test_pointbev_trains_and_validates_through_run(synthetic_root, tmp_path):
    pytest.importorskip("nuscenes")
    from bev.run import run
    from conftest import compose_bev_demo

    cfg = compose_bev_demo(synthetic_root, "model=pointbev", "upsampler=none", "model.latent_dim=16",
                           "model.unet_channels=8", "model.reference_cells=null", "model.N_coarse=40",
                           "model.N_fine=30", "model.N_anchor=4", "model.fine_patch_size=3")
    assert cfg.model.name == "pointbev"
    results = run(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["step"] == 1 and saved["model"] == "pointbev"
    assert 0.0 <= saved["val"]["iou"] <= 1.0 and set(saved["val"]) >= {"iou_vis1", "iou_vis2"}
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert results["val"] == saved["val"]
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert any(k.startswith("head.unet.") for k in state)
