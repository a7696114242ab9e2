"""Bad inputs to the BeV tool (``tools/train_bev.py``: :func:`bev.run.run`, :mod:`bev.data`) and
the shared resume (:func:`jafar.runs.resolve_resume`) get one sentence before any work:
a table of cases, each a row of (case id, a callable taking the fixture context, exception type,
fragment of the sentence), run in-process on the tiny synthetic nuScenes of ``conftest``. Then the
correct behaviours: final weights saved at a step that is not a multiple of ``checkpoint_every``,
and a stop at the first non-finite training loss."""

import json
import shutil

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_bev_demo
from tests.errors_doc import record

pytest.importorskip("nuscenes")

from bev.data.nuscenes import NuScenesBev  # noqa: E402
from bev.run import BEV_TRAINING, prepare_data, run  # noqa: E402
from jafar import runs  # noqa: E402
from jafar.train.run import PRETRAINING  # noqa: E402


def _demo(ctx, *overrides):
    return compose_bev_demo(ctx["root"], "model.latent_dim=16", *overrides)


def _run(*overrides):
    return lambda ctx: run(_demo(ctx, *overrides), ctx["tmp"] / "run")


def _copy(ctx):
    """A private copy of the tiny synthetic set (the one of conftest is shared by the tests)."""
    dst = ctx["tmp"] / "copy"
    if not dst.exists():
        shutil.copytree(ctx["root"], dst)
    return dst


def _first_image(root):
    return sorted((root / "samples" / "CAM_FRONT").iterdir())[0]


def _dataset(root):
    return NuScenesBev(root, "v1.0-mini", "train", scenes=str(root / "splits.json"))


def _missing_image(ctx):
    root = _copy(ctx)
    _first_image(root).unlink()
    return _dataset(root)


def _corrupt_image(ctx):
    root = _copy(ctx)
    ds = _dataset(root)
    for rel in ds._paths[0]:
        (root / rel).write_bytes(b"not a jpeg")
    return ds.get(0)


def _truncated_table(ctx):
    root = _copy(ctx)
    table = root / "v1.0-mini" / "sample.json"
    table.write_text(table.read_text()[:100])
    return _dataset(root)


def _garbage_resume(ctx):
    path = ctx["tmp"] / "garbage.ckpt"
    path.write_bytes(b"\x00garbage" * 100)
    return run(_demo(ctx, f"resume={path}"), ctx["tmp"] / "run")


def _garbage_resume_pretraining(ctx):
    path = ctx["tmp"] / "garbage.ckpt"
    path.write_text("hello")
    return runs.resolve_resume(str(path), ctx["tmp"] / "checkpoints", PRETRAINING.checkpoint_keys)


def _other_tool_resume(ctx):
    """A checkpoint shaped like pretraining's: weights of a JAFAR upsampler, no BeV head, and the
    record of the tool that wrote it."""
    path = ctx["tmp"] / "pretrain_last.ckpt"
    torch.save({"state_dict": {"upsampler.query_encoder.0.weight": torch.zeros(2)}, "global_step": 3,
                "run_config": {"model": {}}, "tool": "tools/pretrain_jafar.py"}, path)
    return run(_demo(ctx, f"resume={path}"), ctx["tmp"] / "run")


def _other_synthetic_settings(ctx):
    root = ctx["tmp"] / "synthetic"
    prep = {"kind": "synthetic", "scenes": 1, "samples_per_scene": 1, "image_size": [64, 36], "seed": 0,
            "workers": 1}
    prepare_data(OmegaConf.create({"dataroot": str(root), "version": "v1.0-mini", "prepare": prep}))
    stamp = (root / "synthetic.json").stat().st_mtime_ns
    try:
        prepare_data(OmegaConf.create({"dataroot": str(root), "version": "v1.0-trainval", "prepare": prep}))
    finally:
        assert (root / "synthetic.json").stat().st_mtime_ns == stamp  # not regenerated
        assert (root / "v1.0-mini").is_dir()


def _bev_resume_to_pretraining(ctx):
    """A BeV checkpoint given to pretraining's resolve."""
    path = ctx["tmp"] / "bev_last.ckpt"
    torch.save({"state_dict": {"encoder.backbone.w": torch.zeros(1), "head.w": torch.zeros(2)},
                "tool": "tools/train_bev.py"}, path)
    return runs.resolve_resume(str(path), ctx["tmp"] / "checkpoints", PRETRAINING.checkpoint_keys)


def _garbage_own_last(ctx):
    """resume=auto in a run directory whose own last.ckpt is truncated (no run_config.json beside it)."""
    last = ctx["tmp"] / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"PK\x03\x04truncated")
    return run(_demo(ctx), ctx["tmp"] / "run")


def _garbage_own_last_resolve(ctx):
    """resume=auto's own last.ckpt is type-checked like a given file."""
    last = ctx["tmp"] / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"\x00garbage" * 100)
    return runs.resolve_resume("auto", last.parent)


def _other_tool_own_last(ctx):
    last = ctx["tmp"] / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save({"state_dict": {"upsampler.query_encoder.0.weight": torch.zeros(2)}}, last)  # no record of its tool
    return runs.resolve_resume("auto", last.parent, expected_keys=BEV_TRAINING.checkpoint_keys)


def _extend_finished_run(ctx):
    """A finished run continued with a larger trainer.max_steps: its OneCycle schedule was laid
    out for the old length (Lightning stopped with 'Tried to step 7 times'), so it is refused."""
    run(_demo(ctx, "trainer.max_steps=1"), ctx["tmp"] / "done")
    return run(_demo(ctx, "trainer.max_steps=2"), ctx["tmp"] / "done")


#: (case id, a callable of the fixture context, exception type, fragment of the sentence)
CASES = [
    ("max_steps=0", _run("trainer.max_steps=0"), ValueError, "trainer.max_steps must be a positive number"),
    ("max_steps=-3", _run("trainer.max_steps=-3"), ValueError, "got -3"),
    ("checkpoint_every=-1", _run("checkpoint_every=-1"), ValueError, "checkpoint_every must be a positive"),
    ("checkpoint_every=0", _run("checkpoint_every=0"), ValueError, "checkpoint_every must be a positive"),
    ("lr=-1", _run("optimizer.lr=-1"), ValueError, "optimizer.lr must be a positive learning rate, got -1"),
    ("image_augment=flip", _run("data.image_augment=flip"), ValueError,
     "data.image_augment must be one of ['pointbev', 'bottom_crop', 'simplebev'], got 'flip'"),
    ("scale_range reversed", _run("data.scale_range=[0.3,0.2]"), ValueError,
     "data.scale_range must be a range [low, high] with 0 < low <= high, got [0.3, 0.2]"),
    ("crop_up_pct=1.5", _run("data.crop_up_pct=1.5"), ValueError, "data.crop_up_pct must be the kept fraction"),
    ("raster=corners", _run("data.raster=corners"), ValueError,
     "data.raster must be one of ['pointbev', 'polygon', 'center'], got 'corners'"),
    ("loss.name=focal", _run("loss.name=focal"), ValueError, "loss.name must be one of ['pointbev', 'simplebev'], got 'focal'"),
    ("garbage resume", _garbage_resume, ValueError, "is not a readable Lightning checkpoint"),
    ("garbage resume (pretraining's resolve)", _garbage_resume_pretraining, ValueError,
     "is not a readable Lightning checkpoint"),
    ("resume from the other tool", _other_tool_resume, ValueError,
     "is a checkpoint of tools/pretrain_jafar.py (its weights have no 'encoder.' keys)"),
    ("BeV resume given to pretraining", _bev_resume_to_pretraining, ValueError,
     "is a checkpoint of tools/train_bev.py (its weights have no 'upsampler.' keys)"),
    ("resume=auto, truncated own last.ckpt", _garbage_own_last, ValueError,
     "last.ckpt is not a readable Lightning checkpoint (RuntimeError), so"),
    ("resume=auto, garbage own last.ckpt (resolve)", _garbage_own_last_resolve, ValueError,
     "resume=auto found '"),
    ("resume=auto, own last.ckpt of the other tool", _other_tool_own_last, ValueError,
     "is a checkpoint of another tool (its weights have no 'encoder.' keys)"),
    ("extend a finished run's max_steps", _extend_finished_run, ValueError,
     "holds a run of another configuration (trainer.max_steps: 1 -> 2)"),
    ("synthetic set made with other settings", _other_synthetic_settings, ValueError,
     "made with other settings (version='v1.0-mini' (asked 'v1.0-trainval'))"),
    ("missing camera image", _missing_image, FileNotFoundError, "1 of the 12 camera files"),
    ("corrupt camera image", _corrupt_image, ValueError, "cannot be decoded"),
    ("truncated sample.json", _truncated_table, ValueError, "sample.json is not valid JSON"),
]


@pytest.mark.parametrize("case, call, kind, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_sentence(synthetic_root, tmp_path, case, call, kind, fragment):
    with pytest.raises(kind) as info:
        call({"root": synthetic_root, "tmp": tmp_path})
    message = str(info.value)
    if isinstance(info.value, KeyError):
        message = info.value.args[0]
    assert fragment in message, message
    assert "\n" not in message and message.endswith("."), message
    if callable(call) and getattr(call, "__name__", "") == "<lambda>":  # run() cases: refused before any work
        assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    record("bev", case, info.value)


def test_missing_image_names_file_and_token(synthetic_root, tmp_path):
    root = _copy({"root": synthetic_root, "tmp": tmp_path})
    gone = _first_image(root)
    gone.unlink()
    with pytest.raises(FileNotFoundError) as info:
        _dataset(root)
    assert str(gone) in str(info.value) and "of sample " in str(info.value)


def test_final_weights_saved_at_a_non_multiple_step(synthetic_root, tmp_path):
    ctx = {"root": synthetic_root, "tmp": tmp_path}
    results = run(_demo(ctx, "trainer.max_steps=3", "checkpoint_every=2", "trainer.val_check_interval=3"),
                  tmp_path / "run")
    assert results["step"] == 3
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3
    assert (tmp_path / "run" / "checkpoints" / "step0000003.ckpt").is_file()


class _NanImages(L.Callback):
    def __init__(self, at):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            batch["images"][0, 0, 0, 0, 0] = float("nan")


class _NanBackbone(L.Callback):
    def on_train_start(self, trainer, pl_module):
        pl_module.encoder.backbone.register_forward_hook(lambda m, args, out: out * float("nan"))


class _NanUpsampler(L.Callback):
    def on_train_start(self, trainer, pl_module):
        pl_module.encoder.upsampler.register_forward_hook(lambda m, args, out: out * float("nan"))


class _NanLogits(L.Callback):
    @staticmethod
    def _nan_seg(module, args, out):
        out = dict(out)
        out["seg"] = out["seg"] * float("nan")
        return out

    def on_train_start(self, trainer, pl_module):
        pl_module.head.register_forward_hook(self._nan_seg)


@pytest.mark.parametrize("callback, where", [(_NanImages(1), "the images"), (_NanBackbone(), "the backbone features"),
                                             (_NanUpsampler(), "the upsampled features"), (_NanLogits(), "the logits")],
                         ids=["images", "backbone", "upsampler", "logits"])
def test_non_finite_loss_stops_with_one_sentence(synthetic_root, tmp_path, callback, where):
    ctx = {"root": synthetic_root, "tmp": tmp_path}
    cfg = _demo(ctx, "trainer.max_steps=2", "trainer.val_check_interval=2", "upsampler=bilinear")
    with pytest.raises(FloatingPointError) as info:
        run(cfg, tmp_path / "run", callbacks=[callback])
    message = str(info.value)
    step = 1 if isinstance(callback, _NanImages) else 0
    assert f"at step {step}" in message and f"first non-finite input: {where}." in message, message
    token = json.loads((synthetic_root / "splits.json").read_text())  # noqa: F841 - the set has tokens
    assert "batch of samples ['" in message and "\n" not in message and message.endswith(".")
    record("bev_nonfinite", f"NaN in {where}", info.value)
