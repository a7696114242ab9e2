"""The BeV model parts: multi-camera encoder (bev.encoder) and SimpleBEV head (bev.heads.simplebev).

CPU, tiny sizes. The lifting is checked against an independent pinhole projection on feature maps
that are linear in the pixel coordinates (bilinear sampling reproduces them exactly)."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bev import geometry as G
from bev.encoder import MultiCameraEncoder, build_multicamera_encoder
from bev.geometry import BevGrid
from bev.heads import HEADS
from bev.heads.common import lift_to_voxels
from bev.heads.simplebev import SimpleBeV
from jafar import JAFAR, build_backbone, build_upsampler

# nuScenes-like camera axes in the ego frame: camera z (forward) -> ego x, camera x (right) ->
# ego -y, camera y (down) -> ego -z.
R_FRONT = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
T_FRONT = np.array([1.5, 0.23, 1.63])  # off the voxel lattice: no voxel on an image edge
SMALL_GRID = BevGrid(x_bounds=(-12.0, 12.0), y_bounds=(-12.0, 12.0), z_bounds=(-1.0, 3.0), resolution=1.0, z_bins=2)


def yaw_matrix(yaw):
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def cam2ego(yaw=0.0, t=T_FRONT):
    return torch.from_numpy(G.transform_matrix(t, yaw_matrix(yaw) @ R_FRONT)).float()


def coordinate_map(h, w, extra=()):
    """(2 + len(extra), h, w): the pixel-centre coordinates (u, v) = (j + 0.5, i + 0.5), then constants."""
    v, u = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    return torch.stack([u, v] + [torch.full((h, w), float(c)) for c in extra])


def independent_projection(K, T, points):
    """Ego points (P, 3) -> (u, v, depth) with numpy, from the 4x4 camera -> ego pose ``T``."""
    R, t = T[:3, :3].double().numpy(), T[:3, 3].double().numpy()
    cam = (points.double().numpy() - t) @ R  # R^T (p - t), row-wise
    uvw = cam @ K.double().numpy().T
    with np.errstate(divide="ignore", invalid="ignore"):
        return uvw[:, 0] / uvw[:, 2], uvw[:, 1] / uvw[:, 2], cam[:, 2]


# ------------------------------------------------------------------ geometry helpers


def test_rigid_inverse_and_grid_sample_convention():
    T = cam2ego(0.7)
    torch.testing.assert_close(G.invert_rigid_torch(T) @ T, torch.eye(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(G.invert_rigid_torch(T).double(), torch.from_numpy(G.invert_rigid(T.double().numpy())))
    # pixel centre k + 0.5 samples pixel k exactly; (0, 0) and (w, h) are the outer corners
    fmap = torch.arange(12.0).view(1, 1, 3, 4)
    uv = torch.tensor([[2.5, 1.5], [0.5, 0.5], [3.5, 2.5]])
    grid = G.pixels_to_grid_sample(uv, (3, 4)).view(1, 1, 3, 2)
    out = F.grid_sample(fmap, grid, align_corners=False).flatten()
    torch.testing.assert_close(out, torch.tensor([6.0, 0.0, 11.0]))
    torch.testing.assert_close(G.pixels_to_grid_sample(torch.tensor([[0.0, 0.0], [4.0, 3.0]]), (3, 4)),
                               torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    assert G.inside_image(torch.tensor([[0.0, 3.0], [4.0, 0.0], [4.01, 1.0], [1.0, -0.01]]), (3, 4)).tolist() == \
        [True, True, False, False]


# ------------------------------------------------------------------ lifting


def _lift_one(fmap, K, T, image_size, grid=SMALL_GRID):
    return lift_to_voxels(fmap[None, None], K[None, None], T[None, None], image_size, grid)


def test_lifting_samples_the_feature_where_the_voxel_projects():
    H, W, h, w = 64, 96, 16, 24  # features at 1/4 per axis
    K = torch.tensor([[40.0, 0, 47.7], [0, 41.0, 31.6], [0, 0, 1]])
    T = cam2ego()
    vox, views = _lift_one(coordinate_map(h, w, extra=(1.0,)), K, T, (H, W))
    assert vox.shape == (1, 3, 24, 24, 2) and views.shape == (1, 24, 24, 2)
    centers = SMALL_GRID.voxel_centers().reshape(-1, 3)
    u, v, depth = independent_projection(K, T, centers)
    u, v = u * w / W, v * h / H  # feature-map pixels
    vox, views = vox[0].reshape(3, -1).numpy(), views[0].reshape(-1).numpy()
    visible = (depth > 0) & (u >= 0) & (u <= w) & (v >= 0) & (v <= h)
    assert 20 < visible.sum() < visible.size / 2
    np.testing.assert_array_equal(views, visible.astype(views.dtype))
    # interior projections: bilinear interpolation of a linear map is exact
    interior = visible & (u >= 0.5) & (u <= w - 0.5) & (v >= 0.5) & (v <= h - 0.5)
    assert interior.sum() > 10
    np.testing.assert_allclose(vox[0, interior], u[interior], atol=1e-4)
    np.testing.assert_allclose(vox[1, interior], v[interior], atol=1e-4)
    np.testing.assert_allclose(vox[2, visible], 1.0, atol=1e-6)
    # behind the camera, or in front but outside the image: nothing
    behind = depth <= 0
    outside = (depth > 0) & ~visible
    assert behind.sum() > 0 and outside.sum() > 0
    assert np.all(vox[:, behind | outside] == 0)
    assert np.all(views.reshape(24, 24, 2)[:10] == 0)  # x < -2 m: behind the camera at x = 1.5 m


def test_voxels_seen_by_two_cameras_get_the_average():
    H, W, h, w = 32, 48, 16, 24
    K = torch.tensor([[20.0, 0, 24], [0, 20.0, 16], [0, 0, 1]])
    T1, T2 = cam2ego(0.0), cam2ego(0.6, t=(1.0, 0.8, 1.6))  # front and front-left, overlapping
    f1 = coordinate_map(h, w, extra=(1.0,))
    f2 = coordinate_map(h, w, extra=(5.0,)) * 2.0 + 3.0
    v1, n1 = _lift_one(f1, K, T1, (H, W))
    v2, n2 = _lift_one(f2, K, T2, (H, W))
    both, n = lift_to_voxels(torch.stack([f1, f2])[None], torch.stack([K, K])[None],
                             torch.stack([T1, T2])[None], (H, W), SMALL_GRID)
    torch.testing.assert_close(n, n1 + n2)
    assert (n == 2).sum() > 5 and (n == 1).sum() > 5
    expected = (v1 * n1[:, None] + v2 * n2[:, None]) / (n1 + n2).clamp_min(1)[:, None]
    torch.testing.assert_close(both, expected, atol=1e-5, rtol=1e-6)
    overlap = (n == 2)[0]
    # where both see a voxel, the constant channel is (2 * 1 + 3 ... ) : (1 + (5 * 2 + 3)) / 2 = 7
    torch.testing.assert_close(both[0, 2][overlap], torch.full((int(overlap.sum()),), 7.0))


@pytest.mark.parametrize("H, W, h, w", [(32, 48, 16, 24), (32, 48, 8, 24), (40, 64, 20, 8)])
def test_intrinsics_are_scaled_per_axis(H, W, h, w):
    """The same linear image at full and at a per-axis reduced resolution (area averaging keeps a
    linear map exact at the new pixel centres) lifts to the same values."""
    K = torch.tensor([[30.0, 0, W / 2 + 1.3], [0, 25.0, H / 2 - 2.1], [0, 0, 1]])
    T = cam2ego(0.1)
    full = coordinate_map(H, W)  # coordinates in input pixels
    small = F.avg_pool2d(full[None], kernel_size=(H // h, W // w))[0]
    a, na = _lift_one(full, K, T, (H, W))
    b, nb = _lift_one(small, K, T, (H, W))
    torch.testing.assert_close(na, nb)
    u, v, depth = independent_projection(K, T, SMALL_GRID.voxel_centers().reshape(-1, 3))
    # compare where both maps interpolate (inside the small map's outer pixel centres)
    sx, sy = W / w, H / h
    inner = torch.from_numpy((depth > 0) & (u >= sx / 2) & (u <= W - sx / 2) & (v >= sy / 2) & (v <= H - sy / 2))
    inner = inner.view(a.shape[2:])
    assert inner.sum() > 10
    torch.testing.assert_close(b[0][:, inner], a[0][:, inner], atol=1e-4, rtol=1e-5)
    # a head scaling both axes by w / W (as if H were h * W / w) misplaces v whenever the ratios differ
    if h * W != w * H:
        wrong, _ = _lift_one(small, K, T, (h * W // w, W))
        assert not torch.allclose(wrong[0][:, inner], a[0][:, inner], atol=0.5)


def test_lifting_refuses_bad_inputs():
    f = torch.zeros(1, 2, 4, 8, 8)
    K, T = torch.eye(3).expand(1, 2, 3, 3), torch.eye(4).expand(1, 2, 4, 4)
    with pytest.raises(ValueError, match="intrinsics"):
        lift_to_voxels(f, torch.eye(3).expand(1, 3, 3, 3), T, (16, 16), SMALL_GRID)
    with pytest.raises(ValueError, match="cam2ego"):
        lift_to_voxels(f, K, torch.eye(4).expand(2, 2, 4, 4), (16, 16), SMALL_GRID)
    with pytest.raises(ValueError, match="image_size"):
        lift_to_voxels(f, K, T, (16.0, 16), SMALL_GRID)
    with pytest.raises(ValueError, match="features"):
        lift_to_voxels(f[0], K, T, (16, 16), SMALL_GRID)


# ------------------------------------------------------------------ SimpleBeV head


def six_cameras(batch=1):
    """A ring of 6 nuScenes-like cameras (yaws 55, 0, -55, 110, 180, -110 deg, PointBeV's order)."""
    yaws = np.radians([55, 0, -55, 110, 180, -110])
    T = torch.stack([cam2ego(y, t=(1.0 * math.cos(y), 0.5 * math.sin(y), 1.6)) for y in yaws])
    K = torch.tensor([[60.0, 0, 48], [0, 60.0, 16], [0, 0, 1]]).expand(6, 3, 3)
    return K.expand(batch, 6, 3, 3).clone(), T.expand(batch, 6, 4, 4).clone(), (32, 96)


@pytest.mark.parametrize("size", [32, 50])
def test_head_shapes_and_gradients(size):
    torch.manual_seed(0)
    grid = BevGrid(x_bounds=(-size / 2, size / 2), y_bounds=(-size / 2, size / 2), resolution=1.0, z_bins=2)
    head = SimpleBeV(in_channels=12, grid=grid, latent_dim=16)
    K, T, image_size = six_cameras(batch=2)
    feats = torch.randn(2, 6, 12, 8, 24, requires_grad=True)
    out = head(feats, K, T, image_size)
    assert set(out) == {"seg", "centerness", "offset"}
    assert out["seg"].shape == (2, 1, size, size) and out["centerness"].shape == (2, 1, size, size)
    assert out["offset"].shape == (2, 2, size, size)
    assert out["centerness"].min() >= 0 and out["centerness"].max() <= 1
    (out["seg"].sum() + out["centerness"].sum() + out["offset"].square().sum()).backward()
    for name in ("neck.weight", "bev_compressor.0.weight", "decoder.first_conv.weight", "decoder.layer3.0.downsample.0.weight",
                 "decoder.layer3.1.bn2.weight",  # zero_init_residual: the branch convs start without grad
                 "decoder.up1_skip.conv.weight", "decoder.segmentation_head.3.weight",
                 "decoder.instance_offset_head.3.weight"):
        grad = dict(head.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert feats.grad.abs().sum() > 0


def test_geometry_changes_the_output():
    torch.manual_seed(0)
    head = SimpleBeV(in_channels=8, grid=BevGrid(x_bounds=(-16, 16), y_bounds=(-16, 16), resolution=1.0, z_bins=2),
                     latent_dim=16).eval()
    K, T, image_size = six_cameras()
    feats = torch.randn(1, 6, 8, 8, 24)
    mirror = torch.diag(torch.tensor([1.0, -1.0, 1.0, 1.0]))  # ego y -> -y
    with torch.no_grad():
        a = head(feats, K, T, image_size)["seg"]
        b = head(feats, K, mirror @ T, image_size)["seg"]
        c = head(feats, K, T.clone(), image_size)["seg"]
    torch.testing.assert_close(a, c)
    assert (a - b).abs().mean() > 1e-3 * a.abs().mean()
    # the lifted volume of the mirrored rig is the mirror image of the original (columns reversed)
    va, _ = head.lift(feats, K, T, image_size)
    vb, _ = head.lift(feats, K, mirror @ T, image_size)
    torch.testing.assert_close(vb, va.flip(3), atol=1e-4, rtol=1e-4)


def test_head_refuses_bad_inputs():
    head = SimpleBeV(in_channels=8, grid=SMALL_GRID, latent_dim=8)
    K, T, image_size = six_cameras()
    with pytest.raises(ValueError, match=r"\(B, N, 8, h, w\)"):
        head(torch.zeros(1, 6, 7, 8, 24), K, T, image_size)
    with pytest.raises(ValueError, match="image_size"):
        head(torch.zeros(1, 6, 8, 8, 24), K, T, 32)
    with pytest.raises(ValueError, match="grid"):
        SimpleBeV(8, grid=(200, 200))


# ------------------------------------------------------------------ encoder


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    return build_backbone("vit_small_patch14_reg4_dinov2.lvd142m", pretrained=False, depth=1, embed_dim=32,
                          num_heads=2)


def images(b=2, n=3, h=28, w=42, seed=0):
    return torch.rand(b, n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def reference_features(backbone, imgs):
    return backbone(backbone.normalize(imgs.flatten(0, 1))).unflatten(0, imgs.shape[:2])


def test_encoder_none_and_bilinear_match_the_backbone(tiny_vit):
    imgs = images()
    ref = reference_features(tiny_vit, imgs)  # (2, 3, 32, 2, 3)
    enc = build_multicamera_encoder(tiny_vit, "none")
    assert enc.out_channels == 32 and enc.output_size_for(28, 42) == (2, 3)
    torch.testing.assert_close(enc(imgs), ref, atol=0, rtol=0)
    enc = build_multicamera_encoder(tiny_vit, "bilinear", output_scale=2.0)
    out = enc(imgs)
    assert out.shape == (2, 3, 32, 4, 6) and enc.output_size_for(28, 42) == (4, 6)
    torch.testing.assert_close(out, F.interpolate(ref.flatten(0, 1), size=(4, 6), mode="bilinear",
                                                  align_corners=False).unflatten(0, (2, 3)))
    assert not out.requires_grad
    enc = build_multicamera_encoder(tiny_vit, "nearest", output_size=(5, 7))
    assert enc(imgs).shape == (2, 3, 32, 5, 7) and enc.output_size_for(28, 42) == (5, 7)


def test_encoder_jafar_trains_and_freezes(tiny_vit):
    torch.manual_seed(0)
    enc = build_multicamera_encoder(tiny_vit, "jafar", jafar_kwargs=dict(qk_dim=16), output_scale=3.0)
    assert isinstance(enc.upsampler, JAFAR) and enc.upsampler.v_dim == 32
    enc.train()
    assert not enc.backbone.training and enc.upsampler.training
    out = enc(images())
    assert out.shape == (2, 3, 32, 6, 9) and out.requires_grad
    out.square().mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in enc.backbone.parameters())
    trainable = [p for p in enc.upsampler.parameters() if p.requires_grad]
    assert len(trainable) > 10 and all(p.grad is not None for p in trainable)
    assert enc.upsampler.query_encoder[0].weight.grad.abs().sum() > 0

    frozen = build_multicamera_encoder(tiny_vit, "jafar", jafar_kwargs=dict(qk_dim=16), output_scale=3.0,
                                       freeze_upsampler=True)
    frozen.upsampler.load_state_dict(enc.upsampler.state_dict())
    frozen.train()
    assert not frozen.upsampler.training
    assert not any(p.requires_grad for p in frozen.upsampler.parameters())
    out_frozen = frozen(images())
    assert not out_frozen.requires_grad
    enc.eval()
    with torch.no_grad():
        torch.testing.assert_close(out_frozen, enc(images()), atol=0, rtol=0)


def test_encoder_frozen_jafar_equals_trainable_jafar_in_eval(tiny_vit):
    torch.manual_seed(0)
    a = build_multicamera_encoder(tiny_vit, "jafar", jafar_kwargs=dict(qk_dim=16))
    b = build_multicamera_encoder(tiny_vit, "jafar", jafar_kwargs=dict(qk_dim=16), freeze_upsampler=True)
    b.upsampler.load_state_dict(a.upsampler.state_dict())
    # the frozen one builds no graph, so on the CPU it runs JAFAR's tiled inference plan
    # (jafar.layers.tiled): the same arithmetic, in another order, so equal up to float rounding
    torch.testing.assert_close(a(images()).detach(), b(images()), atol=1e-5, rtol=1e-5)


def test_encoder_guidance_size(tiny_vit):
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, image, features, output_size):
            seen["image"] = image
            return F.interpolate(features, size=output_size, mode="bilinear", align_corners=False)

    imgs = images(b=1, n=2)
    enc = MultiCameraEncoder(tiny_vit, Probe(), guidance_size=(14, 21))
    enc(imgs)
    norm = tiny_vit.normalize(imgs.flatten(0, 1))
    torch.testing.assert_close(seen["image"], F.interpolate(norm, size=(14, 21), mode="bilinear",
                                                            align_corners=False, antialias=True))
    MultiCameraEncoder(tiny_vit, Probe())(imgs)
    torch.testing.assert_close(seen["image"], norm, atol=0, rtol=0)


def test_encoder_refuses_bad_inputs(tiny_vit):
    enc = build_multicamera_encoder(tiny_vit, "bilinear")
    with pytest.raises(ValueError, match=r"28x41 is not a multiple of the stride 14"):
        enc(torch.rand(1, 2, 3, 28, 41))
    with pytest.raises(ValueError, match=r"\(B, N, 3, H, W\)"):
        enc(torch.rand(2, 3, 28, 42))
    with pytest.raises(ValueError, match="cache_keys"):
        enc(images(), cache_keys=["a"])
    with pytest.raises(ValueError, match="cache_keys"):
        enc(images(), cache_keys=["a", "../b"])
    with pytest.raises(ValueError, match="output_size"):
        build_multicamera_encoder(tiny_vit, "none", output_size=(4, 4))
    with pytest.raises(ValueError, match="only apply to an upsampler built by name"):
        build_multicamera_encoder(tiny_vit, "none", jafar_kwargs=dict(qk_dim=16))
    with pytest.raises(ValueError, match="only apply to an upsampler built by name"):
        build_multicamera_encoder(tiny_vit, build_upsampler("bilinear"), checkpoint="x.pth")
    with pytest.raises(ValueError, match="a name, an nn.Module or None"):
        build_multicamera_encoder(tiny_vit, 3)
    with pytest.raises(ValueError, match="output_scale"):
        build_multicamera_encoder(tiny_vit, "bilinear", output_scale=0)
    with pytest.raises(ValueError, match="is not a registered upsampler"):
        build_multicamera_encoder(tiny_vit, "no_such_upsampler")


def test_encoder_mobilenet():
    torch.manual_seed(0)
    backbone = build_backbone("mobilenetv2_s16", pretrained=False)
    enc = build_multicamera_encoder(backbone, "jafar", jafar_kwargs=dict(qk_dim=16))
    out = enc(images(b=1, n=2, h=32, w=48))
    assert out.shape == (1, 2, 96, 4, 6) and enc.out_channels == 96
    with pytest.raises(ValueError, match="stride 16"):
        enc(images(b=1, n=2, h=40, w=48))


def test_feature_cache(tiny_vit, tmp_path):
    calls = []
    hook = tiny_vit.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        torch.manual_seed(0)
        plain = build_multicamera_encoder(tiny_vit, "jafar", jafar_kwargs=dict(qk_dim=16))
        cached = build_multicamera_encoder(tiny_vit, "jafar", jafar_kwargs=dict(qk_dim=16), cache_dir=tmp_path)
        cached.upsampler.load_state_dict(plain.upsampler.state_dict())
        imgs = images()
        expected = plain(imgs)
        calls.clear()
        first = cached(imgs, cache_keys=["tok_a", "tok_b"])
        assert calls == [6]
        files = sorted(tmp_path.glob("*/*.pt"))
        assert [f.name for f in files] == ["tok_a.pt", "tok_b.pt"]
        stats = {f: (os.stat(f).st_ino, os.stat(f).st_mtime_ns) for f in files}
        stored = torch.load(files[0], weights_only=True)["features"]
        assert stored.dtype == torch.float32 and stored.shape == (3, 32, 2, 3)
        second = cached(imgs, cache_keys=["tok_a", "tok_b"])
        assert calls == [6]  # read back, the backbone did not run
        assert {f: (os.stat(f).st_ino, os.stat(f).st_mtime_ns) for f in files} == stats  # written once
        torch.testing.assert_close(first, expected, atol=0, rtol=0)
        torch.testing.assert_close(second, expected, atol=0, rtol=0)
        second.sum().backward()  # JAFAR still trains on cached features
        assert cached.upsampler.query_encoder[0].weight.grad is not None
        # a partly cached batch computes only the missing item
        cached(images(b=2, seed=1)[[1, 0]], cache_keys=["tok_new", "tok_a"])
        assert calls == [6, 3] and len(list(tmp_path.glob("*/*.pt"))) == 3
        # the key is what is read (the caller promises un-augmented images, documented): other images
        # under the same keys get the stored backbone features
        none_cached = build_multicamera_encoder(tiny_vit, "none", cache_dir=tmp_path)
        torch.testing.assert_close(none_cached(images(seed=5), cache_keys=["tok_a", "tok_b"]),
                                   reference_features(tiny_vit, imgs), atol=0, rtol=0)
        # another image size or other weights: another folder, never stale features
        cached(images(h=42, w=42), cache_keys=["tok_a", "tok_b"])
        torch.manual_seed(1)
        other = build_backbone("vit_small_patch14_reg4_dinov2.lvd142m", pretrained=False, depth=1, embed_dim=32,
                               num_heads=2)
        enc_other = build_multicamera_encoder(other, "none", cache_dir=tmp_path)
        torch.testing.assert_close(enc_other(imgs, cache_keys=["tok_a", "tok_b"]), reference_features(other, imgs),
                                   atol=0, rtol=0)
        assert len({f.parent for f in tmp_path.glob("*/*.pt")}) == 3
        # without keys the cache is not used
        calls.clear()
        cached(imgs)
        assert calls == [6]
        # float16 cache: half the bytes, features rounded to float16
        half = build_multicamera_encoder(tiny_vit, "none", cache_dir=tmp_path / "half", cache_dtype=torch.float16)
        h1 = half(imgs, cache_keys=["tok_a", "tok_b"])
        h2 = half(imgs, cache_keys=["tok_a", "tok_b"])
        torch.testing.assert_close(h1, h2, atol=0, rtol=0)
        torch.testing.assert_close(h1, reference_features(tiny_vit, imgs).half().float(), atol=0, rtol=0)
    finally:
        hook.remove()


def test_encoder_then_head():
    torch.manual_seed(0)
    backbone = build_backbone("vit_small_patch14_reg4_dinov2.lvd142m", pretrained=False, depth=1, embed_dim=32,
                              num_heads=2)
    enc = build_multicamera_encoder(backbone, "jafar", jafar_kwargs=dict(qk_dim=16))
    head = SimpleBeV(enc.out_channels, grid=SMALL_GRID, latent_dim=8)
    K, T, _ = six_cameras()
    imgs = torch.rand(1, 6, 3, 28, 84)
    K = G.scale_intrinsics(K, 84 / 96, 28 / 32)
    out = head(enc(imgs), K, T, (28, 84))
    assert out["seg"].shape == (1, 1, 24, 24)
    out["seg"].mean().backward()
    assert enc.upsampler.key_features_encoder[0].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ BeV augmentation, every head


#: a small grid in front of the ego (20 x 20 cells of 2 m), so that the heads stay tiny
AUG_GRID = BevGrid(x_bounds=(-10.0, 30.0), y_bounds=(-20.0, 20.0), resolution=2.0, z_bins=4)


@pytest.fixture(scope="module")
def augmented_batches(tmp_path_factory):
    """The real key frame drawn with each BeV augmentation (one devkit load for both)."""
    pytest.importorskip("nuscenes")
    from torch.utils.data import default_collate

    from bev.data.from_mmdet3d import write_tables
    from bev.data.nuscenes import NuScenesBev, load_tables
    from conftest import FIXTURES

    root = tmp_path_factory.mktemp("frame")
    write_tables(FIXTURES / "nuscenes_frame" / "n015-2018-07-24-11-22-45+0800.pkl", root)
    nusc = load_tables(root, "v1.0-mini")
    batches = []
    for mode, seed in (("pointbev", 1), ("simplebev", 2)):
        ds = NuScenesBev(root, "v1.0-mini", "all", grid=AUG_GRID, image_size=(28, 56), augment=True,
                         bev_augment=mode, nusc=nusc)
        assert not np.allclose(ds.bev_motion(0, seed=seed)[0], np.eye(4))
        batches.append(default_collate([ds.get(0, seed=seed)]))
        assert batches[-1]["seg"].sum() > 0  # vehicles in the moved frame
    return batches


def _tiny_head(name, in_channels, grid):
    """Head ``name`` at its ``SMOKE_OPTIONS``, built as the BeV tool builds it; skipped where an
    optional dependency of the head is missing (PointBeV's spconv)."""
    from bev.heads import HEADS, build_head

    try:
        return build_head(name, in_channels, grid, **getattr(HEADS.get(name), "SMOKE_OPTIONS", {}))
    except ImportError as err:
        pytest.skip(str(err))


@pytest.mark.parametrize("head_name", HEADS.list())
def test_a_training_step_with_bev_augment(augmented_batches, tiny_vit, head_name):
    """The heads' contract, for every registered head (a new head is covered without editing this
    test): with data.bev_augment on (PointBeV's motion; SimpleBEV's reference camera and flips), a
    training step on the real key frame gives every output at the grid's size, a finite loss and
    gradients in the head. (PointBeV's case pays the one-time import of spconv, about 10 s on a
    loaded CPU.)"""
    from bev.losses import SimpleBevLoss
    from bev.module import BevSegmentation

    encoder = build_multicamera_encoder(tiny_vit, None)
    torch.manual_seed(0)
    head = _tiny_head(head_name, encoder.out_channels, AUG_GRID)
    module = BevSegmentation(encoder, head, SimpleBevLoss(min_visibility=1)).train()
    for batch in augmented_batches:
        module.zero_grad()
        out = module(batch)
        assert {k: tuple(out[k].shape[1:]) for k in ("seg", "centerness", "offset")} == {
            "seg": (1, *AUG_GRID.shape), "centerness": (1, *AUG_GRID.shape), "offset": (2, *AUG_GRID.shape)}
        loss = module._step_loss(batch, out)["loss"]
        loss.backward()
        assert torch.isfinite(loss)
        assert sum(p.grad.abs().sum() for p in head.parameters() if p.grad is not None) > 0
