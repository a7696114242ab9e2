"""FeatUp's JBU stack and LiFT trained by the pretraining tool with their own objectives
(jafar/train/objectives.py): the losses against hand-computed cases, the jitter, the downsampler,
the presets, the refusals, exact resume, and the exported weights as the evaluation loads them."""

import math
from pathlib import Path

import pytest
import torch
from test_pretrain import _write_images

from conftest import KillAt
from jafar import build_upsampler
from jafar.runs.common import config_changes
from jafar.train.config import compose
from jafar.train.objectives import (
    AttentionDownsampler,
    LiftObjective,
    apply_jitter,
    lift_loss,
    sampled_crf_loss,
    uncertainty_mse,
)
from jafar.train.run import PRETRAINING


# ------------------------------------------------------------------------------------- losses
def test_uncertainty_weighted_mse_on_a_hand_computed_case():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.tensor([[[[0.0, 2.0], [1.0, 4.0]]]])
    scales = torch.tensor([[[[1.0, 2.0], [1.0, 0.5]]]])
    # per pixel d^2 / (2 s^2) + log s: 1/2 + 0, 0 + log 2, 4/2 + 0, 0 + log(1/2); the mean of the four
    assert uncertainty_mse(pred, target, scales).item() == pytest.approx((0.5 + math.log(2) + 2.0 - math.log(2)) / 4)
    assert uncertainty_mse(pred, target, None).item() == pytest.approx((1 + 0 + 4 + 0) / 4)
    # the scale is per pixel, shared by the channels: two identical channels give the same mean
    two = uncertainty_mse(pred.repeat(1, 2, 1, 1), target.repeat(1, 2, 1, 1), scales)
    assert two.item() == pytest.approx(0.625)


def test_lift_cosine_loss_on_a_hand_computed_case():
    pred = torch.tensor([[[[1.0, 1.0]], [[0.0, 1.0]]]])      # vectors (1, 0) and (1, 1)
    target = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])    # vectors (1, 0) and (0, 1)
    assert lift_loss(pred, target).item() == pytest.approx((0 + (1 - 1 / math.sqrt(2))) / 2)
    assert lift_loss(pred, target, "l1").item() == pytest.approx((0 + 1 + 0 + 0) / 4)
    assert lift_loss(pred, target, "l2").item() == pytest.approx(1 / 4)


def test_lift_objective_regresses_each_scale_from_the_image_subsampled_by_two():
    seen = []

    def backbone(x):  # a "patch 2" encoder: 2x2 average pooling, 3 channels
        return torch.nn.functional.avg_pool2d(x, 2)

    def upsampler(image, features, size):
        seen.append((tuple(image.shape[-2:]), tuple(features.shape[-2:]), size))
        return torch.nn.functional.interpolate(features, size=size, mode="nearest")

    x = torch.arange(64.0).reshape(1, 1, 8, 8).repeat(1, 3, 1, 1)
    (loss, logs), = LiftObjective(color_jitter=0).losses(backbone, upsampler, x, torch.Generator().manual_seed(0))
    # from the 4x4 image (x[::2, ::2]) to the 8x8 image's 4x4 features; from the 2x2 image to the 2x2 ones
    assert seen == [((4, 4), (2, 2), (4, 4)), ((2, 2), (1, 1), (2, 2))]
    # the ::2 subsampling keeps the even rows and columns: nearest upsampling of its features is the
    # full image's features only where they agree; the loss is the sum of the two scales'
    assert loss.item() == pytest.approx(logs["loss_x2"].item() + logs["loss_x4"].item())


def test_sampled_crf_loss_equals_the_pairwise_definition():
    torch.manual_seed(0)
    guidance, feats = torch.rand(2, 3, 5, 6), torch.randn(2, 4, 5, 6)
    n = 7
    got = sampled_crf_loss(guidance, feats, torch.Generator().manual_seed(3), n_samples=n)
    gen = torch.Generator().manual_seed(3)  # the same draws: rows, then columns
    rows, cols = torch.randint(0, 5, (n,), generator=gen), torch.randint(0, 6, (n,), generator=gen)
    total = 0.0
    for b in range(2):
        for i in range(n):
            for j in range(n):
                dp = (rows[i] / 5 - rows[j] / 5) ** 2 + (cols[i] / 6 - cols[j] / 6) ** 2
                dg = (guidance[b, :, rows[i], cols[i]] - guidance[b, :, rows[j], cols[j]]).square().sum()
                k = 10 * torch.exp(-dp / 0.2 - dg / 0.3) + 3 * torch.exp(-dp / 0.01)
                total += k * (feats[b, :, rows[i], cols[i]] - feats[b, :, rows[j], cols[j]]).square().sum()
    assert got.item() == pytest.approx(float(total) / (2 * n * n), rel=1e-4)


# ------------------------------------------------------------------------------------- jitter, downsampler
def test_apply_jitter_pads_by_reflection_crops_and_flips():
    t = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert torch.equal(apply_jitter(t, 1, {"x": 1, "y": 1, "zoom": 1.0, "flip": False}), t)
    assert torch.equal(apply_jitter(t, 1, {"x": 1, "y": 1, "zoom": 1.0, "flip": True}),
                       torch.tensor([[[[2.0, 1.0], [4.0, 3.0]]]]))
    # reflect padding of [[1, 2], [3, 4]] by 1: its top-left 2x2 is [[4, 3], [2, 1]]
    assert torch.equal(apply_jitter(t, 1, {"x": 0, "y": 0, "zoom": 1.0, "flip": False}),
                       torch.tensor([[[[4.0, 3.0], [2.0, 1.0]]]]))


def test_attention_downsampler_of_a_constant_map_is_that_constant():
    down = AttentionDownsampler(dim=3, kernel_size=4, final_size=3)
    feats = torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1).expand(2, 3, 12, 12).contiguous()
    out = down(feats, None, torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 3, 3)
    torch.testing.assert_close(out, feats[:, :, :3, :3])
    with pytest.raises(ValueError, match="cannot map a 7-pixel map"):
        down(torch.zeros(1, 3, 7, 7), None, torch.Generator())


# ------------------------------------------------------------------------------------- configs
def _configured(*overrides):
    cfg = compose("data.root=/x", *overrides)
    return PRETRAINING.configure(cfg, list(overrides))


def test_presets_are_the_upstream_recipes_and_demos_have_their_own_run_names():
    featup = _configured("experiment=featup_official")
    assert (featup.upsampler.name, featup.trainer.max_steps, featup.data.batch_size) == ("featup", 50000, 4)
    assert (featup.optimizer._target_, featup.optimizer.lr, featup.recipe.image_size) == ("torch.optim.NAdam", 1e-3, 224)
    assert (featup.featup.n_jitters, featup.featup.random_projection, featup.featup.crf_weight) == (5, 30, 0.001)
    assert featup.upsampler.checkpoint is None  # trained from random weights, not a release
    lift = _configured("experiment=lift_official")
    assert (lift.upsampler.name, lift.optimizer._target_, lift.data.batch_size, lift.recipe.image_size) == (
        "lift", "torch.optim.Adam", 256, 448)
    names = {_configured("experiment=demo").name, _configured("experiment=demo", "upsampler=featup").name,
             _configured("experiment=demo", "upsampler=lift").name}
    assert names == {"demo", "demo_featup", "demo_lift"}
    assert _configured("experiment=featup_demo").name == "demo_featup"
    # the command line still wins over the upsampler's own recipe
    assert _configured("upsampler=featup", "trainer.max_steps=7").trainer.max_steps == 7


def test_jafar_identity_is_unchanged_and_a_baseline_run_refuses_another_upsampler():
    jafar = PRETRAINING.identity(_configured())
    assert not {"featup", "lift", "per_upsampler"} & set(jafar)
    featup = PRETRAINING.identity(_configured("experiment=demo", "upsampler=featup"))
    lift = PRETRAINING.identity(_configured("experiment=demo", "upsampler=lift"))
    assert "featup" in featup and "lift" not in featup and "loss" not in featup
    assert any(c.startswith("upsampler.name:") for c in config_changes(featup, lift))


def test_an_untrainable_upsampler_is_refused_in_one_sentence_before_any_work(tmp_path):
    from jafar.train.run import run

    _write_images(tmp_path / "imgs", 2)
    with pytest.raises(ValueError, match=r"^pretraining trains jafar, featup, lift \(upsampler=<name>.*not 'bilinear'\.$"):
        run(compose(f"data.root={tmp_path / 'imgs'}", "upsampler=bilinear"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="LiFT's objective trains its x2 module"):
        run(compose(f"data.root={tmp_path / 'imgs'}", "upsampler=lift", "upsampler.iterative=true"), tmp_path / "run")
    with pytest.raises(ValueError, match=r"FeatUp's JBU needs a 2x2 feature grid: validation.ratios \[4\] leave"):
        ov = _overrides("featup", tmp_path / "imgs") + ["validation.ratios=[2,4]"]
        run(PRETRAINING.configure(compose(*ov), ov), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------- resume, export
def _overrides(upsampler, data):
    """The tool's command line at smoke size (a tiny random ViT)."""
    # FeatUp: a 4 x 4 grid at patch 14 (validated at x2: 2 x 2, its JBU's smallest); LiFT: 8 x 8, so
    # that its ::4 image has 2 x 2
    size = 56 if upsampler == "featup" else 112
    overrides = [f"upsampler={upsampler}", "backbone=tiny_vit", f"data.root={data}", "data.num_workers=0",
                 "data.batch_size=2", "data.val_images=1", "data.random_crop=[0.3,1.0]", f"recipe.image_size={size}",
                 "featup.n_jitters=2", "featup.crf_samples=50", "trainer.max_steps=4", "trainer.accelerator=cpu",
                 "trainer.devices=1", "trainer.precision=32-true", "trainer.val_check_interval=4",
                 "trainer.enable_progress_bar=false", "checkpoint_every=2", "validation.ratios=[2]"]
    return overrides


def _configured_tiny(upsampler, data):
    """:func:`_overrides` configured as the command line would be (the upsampler's own recipe merged
    under them; :func:`jafar.runs.run` then finds its table empty)."""
    overrides = _overrides(upsampler, data)
    return PRETRAINING.configure(compose(*overrides), overrides)


@pytest.mark.parametrize("upsampler", ["featup", "lift"])
def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, upsampler):
    """Three in-process runs of 4 steps (straight; killed at step 3; resumed from step 2), FeatUp's at
    the smallest image its x2 validation allows (56 px at patch 14), 2 jitters a step."""
    from jafar.runs.tool import run as run_tool

    data = _write_images(tmp_path / "imgs", 5)
    straight = tmp_path / "straight"
    results = run_tool(PRETRAINING, _configured_tiny(upsampler, data), straight)
    assert set(results["x2"]) == {upsampler, "bilinear", "nearest"}
    killed = tmp_path / "killed"
    with pytest.raises(RuntimeError, match="killed"):
        run_tool(PRETRAINING, _configured_tiny(upsampler, data), killed, callbacks=[KillAt(3)])
    assert not (killed / f"{upsampler}.safetensors").exists()
    run_tool(PRETRAINING, _configured_tiny(upsampler, data), killed)  # resume=auto from step 2
    weights = [build_upsampler(upsampler, feature_dim=32, checkpoint=str(d / f"{upsampler}.safetensors"))
               for d in (straight, killed)]
    a, b = (w.state_dict() for w in weights)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the exported file is the upsampler alone (no downsampler, scale net) and the evaluation names it
    assert weights[0].weights_source.endswith(f"straight/{upsampler}.safetensors")
    assert f"straight/{upsampler}.safetensors" in weights[0].describe()
    torch.manual_seed(0)
    fresh = build_upsampler(upsampler, feature_dim=32, checkpoint=None).state_dict()
    assert not all(torch.equal(a[k], fresh[k]) for k in a)  # it trained
    assert (straight / "pictures" / "pca_latest.png").is_file()


# ------------------------------------------------------------------------------------- evaluation
def test_the_eval_demo_trains_missing_featup_and_lift_checkpoints_with_their_objectives(tmp_path):
    import sys

    from jafar.eval import run as eval_run
    from jafar.eval.config import compose as compose_eval

    cmd = eval_run.pretraining_demo_command(tmp_path / "pre" / "featup.safetensors")
    assert cmd[2:4] == ["experiment=demo", "upsampler=featup"] and cmd[0] == sys.executable
    assert "upsampler=" not in " ".join(eval_run.pretraining_demo_command(tmp_path / "pre" / "jafar.safetensors"))
    with pytest.raises(ValueError, match="pretrain_if_missing writes <run dir>/<upsampler>.safetensors"):
        eval_run.pretraining_demo_command(tmp_path / "pre" / "carafe.safetensors")
    cfg = compose_eval("experiment=demo", "task=seg")
    for row in ("featup", "lift"):
        assert cfg.upsamplers[row].checkpoint == eval_run.DEMO_CHECKPOINTS[row]
        # a missing demo checkpoint is returned (to be trained); a mistyped one is refused
        assert eval_run.row_checkpoint(cfg, row) == str(Path(eval_run.DEMO_CHECKPOINTS[row]).resolve()) or \
            Path(eval_run.DEMO_CHECKPOINTS[row]).is_file()
    cfg.upsamplers.lift.checkpoint = str(tmp_path / "typo" / "lift.safetensors")
    with pytest.raises(FileNotFoundError, match="trains only the demo's own outputs/pretrain/demo_lift/lift.safetensors"):
        eval_run.row_checkpoint(cfg, "lift")
