"""Bad inputs get one sentence before any work: a table of cases, each a row of
(what is called, the exception type, a fragment of the sentence). The API cases run in-process."""

from pathlib import Path

import numpy as np
import pytest
import torch

import jafar
from jafar import JAFAR, build_upsampler
from tests.errors_doc import record

ROOT = Path(__file__).resolve().parents[1]


def _model(**kw):
    return JAFAR(v_dim=8, qk_dim=16, **kw)


def _call(image=None, features=None, size=(8, 8), **kw):
    m = _model(**kw)
    image = torch.rand(1, 3, 16, 16) if image is None else image
    features = torch.rand(1, 8, 2, 2) if features is None else features
    return lambda: m(image, features, size)


def _nan(shape):
    x = torch.rand(shape)
    x.view(-1)[0] = float("nan")
    return x


#: (case id, a zero-argument callable, exception type, fragment of the sentence)
API_CASES = [
    ("uint8 image", _call(image=torch.zeros(1, 3, 16, 16, dtype=torch.uint8)), ValueError,
     "image must be a floating-point tensor"),
    ("int64 features", _call(features=torch.zeros(1, 8, 2, 2, dtype=torch.int64)), ValueError,
     "features must be a floating-point tensor"),
    ("bool image", _call(image=torch.zeros(1, 3, 16, 16, dtype=torch.bool)), ValueError,
     "image must be a floating-point tensor"),
    ("float64 inputs, float32 model", _call(image=torch.rand(1, 3, 16, 16, dtype=torch.float64)), ValueError,
     "image is torch.float64 but JAFAR's parameters are torch.float32"),
    ("batch of 0", _call(image=torch.rand(0, 3, 16, 16), features=torch.rand(0, 8, 2, 2)), ValueError,
     "hold no sample (batch size 0)"),
    ("0x0 features", _call(features=torch.rand(1, 8, 0, 0)), ValueError, "must have a non-empty grid"),
    ("num_heads=0", lambda: JAFAR(v_dim=8, qk_dim=16, num_heads=0), ValueError, "num_heads must be a positive int"),
    ("v_dim=0", lambda: JAFAR(v_dim=0), ValueError, "v_dim must be a positive int, got 0"),
    ("v_dim=-5", lambda: JAFAR(v_dim=-5), ValueError, "v_dim must be a positive int, got -5"),
    ("memory_budget_mb=0", lambda: JAFAR(v_dim=8, qk_dim=16, memory_budget_mb=0), ValueError,
     "memory_budget_mb must be a positive number"),
    ("memory_budget_mb=-1", lambda: JAFAR(v_dim=8, qk_dim=16, memory_budget_mb=-1), ValueError,
     "memory_budget_mb must be a positive number"),
    ("output size beyond memory", _call(size=(2_000_000, 2_000_000)), MemoryError, "more than the"),
    ("output_size not a pair", _call(size=5), ValueError, "output_size must be a pair of positive ints"),
    ("output_size of floats", _call(size=(8.0, 8.0)), ValueError, "(float, float)"),
    ("NaN features with check_finite", _call(features=_nan((1, 8, 2, 2)), check_finite=True), ValueError,
     "features holds 1 NaN or infinite values"),
    ("garbage .safetensors", lambda: jafar.load_checkpoint(_garbage("bad.safetensors")), ValueError,
     "bad.safetensors' is not a readable safetensors file"),
    ("garbage .pth", lambda: jafar.load_checkpoint(_garbage("bad.pth")), ValueError, "bad.pth' is not a PyTorch checkpoint"),
    ("unknown upsampler", lambda: build_upsampler("no_such_upsampler"), ValueError,
     "upsampler='no_such_upsampler' is not a registered upsampler"),
]


def _garbage(name: str) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / name
    path.write_bytes(b"\x00garbage" * 8)
    return path


@pytest.mark.parametrize("case, call, exc, fragment", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_refuses_in_one_sentence(case, call, exc, fragment):
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    assert fragment in msg, msg
    assert "\n" not in msg and msg.endswith("."), msg  # one sentence
    record("api", case, info.value)


def test_numpy_integers_are_a_valid_output_size():
    m = _model().eval()
    with torch.no_grad():
        out = m(torch.rand(1, 3, 16, 16), torch.rand(1, 8, 2, 2), (np.int64(6), np.int32(10)))
    assert out.shape == (1, 8, 6, 10)


def test_float64_runs_when_the_model_is_float64():
    m = _model().double().eval()
    with torch.no_grad():
        out = m(torch.rand(1, 3, 16, 16, dtype=torch.float64), torch.rand(1, 8, 2, 2, dtype=torch.float64), (8, 8))
    assert out.dtype == torch.float64


def test_check_finite_is_off_by_default_and_switched_by_the_environment(monkeypatch):
    feats = _nan((1, 8, 2, 2))
    with torch.no_grad():
        out = _model()(torch.rand(1, 3, 16, 16), feats, (8, 8))  # no reduction on the hot path
    assert torch.isnan(out).any()
    monkeypatch.setenv("JAFAR_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match="NaN or infinite"):
        _model()(torch.rand(1, 3, 16, 16), feats, (8, 8))


def test_own_pretraining_checkpoint_loads_as_upsampler_weights(tmp_path):
    # a Lightning checkpoint of jafar.train (state_dict under "upsampler.") is taken for its upsampler
    src = _model()
    state = {f"upsampler.{k}": v for k, v in src.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 0, "global_step": 3}, tmp_path / "last.ckpt")
    loaded = jafar.load_checkpoint(tmp_path / "last.ckpt", feature_dim=8)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)


def test_one_cycle_runs_at_every_step_count():
    # train_bev.py experiment=demo trainer.max_steps=20 once crashed inside OneCycleLR (0.05 x 20 =
    # a warm-up ending at step 0); the schedule now runs at any step count and keeps PyTorch's otherwise
    from bev.module import one_cycle_pct_start

    def run(total, pct):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=total, pct_start=pct, div_factor=3,
                                                    final_div_factor=20, anneal_strategy="linear", cycle_momentum=False)
        for _ in range(total - 1):
            opt.step()
            sched.step()

    with pytest.raises(ZeroDivisionError):
        run(20, 0.05)  # PyTorch's own schedule
    for pct in (0.05, 0.1, 0.5, 1.0):
        for total in range(2, 64):
            run(total, one_cycle_pct_start(pct, total))
    assert one_cycle_pct_start(0.05, 300) == 0.05 and one_cycle_pct_start(0.05, 21) == 0.05  # untouched
    assert one_cycle_pct_start(0.05, 20) == 0.1  # the warm-up ends at step 1 instead of 0


# ------------------------------------------------------------------------------------- tools (in-process)
def _images(folder: Path, n: int = 3, readable: bool = True) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        if readable:
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        else:
            (folder / f"img{i}.jpg").write_bytes(b"not a jpeg at all")
    return folder


def _pretrain_cfg(data: Path, *overrides):
    from jafar.train.config import compose

    return compose("backbone=tiny_vit", f"data.root={data}", "data.num_workers=0", "data.batch_size=2",
                   "data.val_images=1", "recipe.image_size=28", "upsampler.qk_dim=16", "trainer.max_steps=2",
                   "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true",
                   "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "checkpoint_every=1",
                   "validation.ratios=[2]", *overrides)


def _pretrain(tmp: Path, *overrides, readable: bool = True):
    from jafar.train.run import run

    return lambda: run(_pretrain_cfg(_images(tmp / "imgs", readable=readable), *overrides), tmp / "run")


def _eval_typo(tmp: Path):
    from jafar.eval.config import compose
    from jafar.eval.run import run

    cfg = compose("task=seg", "experiment=demo", "backbone=tiny_vit", f"dataset.demo_seg.root={tmp / 'data'}",
                  "compare=[bilinear,jafar]", f"upsamplers.jafar.checkpoint={tmp / 'typo' / 'jafar.safetensors'}",
                  "trainer.enable_progress_bar=false")
    return lambda: run(cfg, tmp / "run")


#: (case id, a callable of a fresh folder giving a zero-argument callable, exception type, fragment);
#: each refused before any work: no run directory, no data prepared
CLI_CASES = [
    ("pretrain: every image unreadable", lambda t: _pretrain(t, readable=False), ValueError,
     "no readable image under"),
    ("pretrain: checkpoint_every=-1", lambda t: _pretrain(t, "checkpoint_every=-1"), ValueError,
     "checkpoint_every must be a positive number of steps, got -1"),
    ("pretrain: checkpoint_every=0", lambda t: _pretrain(t, "checkpoint_every=0"), ValueError,
     "checkpoint_every must be a positive number of steps, got 0"),
    ("pretrain: trainer.accumulate_grad_batches=2", lambda t: _pretrain(t, "+trainer.accumulate_grad_batches=2"),
     ValueError, "trainer.accumulate_grad_batches=2 is not supported: tools/pretrain_jafar.py counts one batch as one "
     "step"),
    ("pretrain: optimizer.lr=-1", lambda t: _pretrain(t, "optimizer.lr=-1"), ValueError,
     "optimizer.lr must be a positive learning rate, got -1"),
    ("pretrain: optimizer.lr=0", lambda t: _pretrain(t, "optimizer.lr=0"), ValueError,
     "optimizer.lr must be a positive learning rate, got 0"),
    ("eval_2d demo: mistyped JAFAR checkpoint", _eval_typo, FileNotFoundError,
     "does not exist (pretrain_if_missing=demo trains only the demo's own"),
]


@pytest.mark.parametrize("case, make, exc, fragment", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_tools_refuse_in_one_sentence_before_work(tmp_path, case, make, exc, fragment):
    call = make(tmp_path)
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    assert fragment in msg, msg
    assert "\n" not in msg and msg.endswith("."), msg
    assert not (tmp_path / "run").exists() and not (tmp_path / "typo").exists() and not (tmp_path / "data").exists()
    record("tools", case, info.value)


def _nan_step(module, pixels):
    module.log_dict = module.log = lambda *a, **k: None
    return lambda: module.training_step({"image": pixels, "skipped": [], "paths": ["a.png", "b.png"]}, 0)


def _tiny_pretraining():
    from jafar import build_backbone
    from jafar.train.module import JafarPretraining

    backbone = build_backbone("vit_small_patch14_reg4_dinov2.lvd142m", pretrained=False, depth=1, embed_dim=32,
                              num_heads=2)
    return JafarPretraining(backbone, JAFAR(v_dim=32, qk_dim=16))


def _nan_weights():
    module = _tiny_pretraining()
    with torch.no_grad():
        next(module.upsampler.parameters()).fill_(float("nan"))
    return module


@pytest.mark.parametrize("make, pixels, fragment", [
    (_tiny_pretraining, lambda: _nan((2, 3, 28, 28)), "the images held NaN"),
    (_nan_weights, lambda: torch.rand(2, 3, 28, 28), "JAFAR's output held NaN"),
])
def test_pretraining_stops_at_the_first_non_finite_loss(make, pixels, fragment):
    with pytest.raises(FloatingPointError) as info:
        _nan_step(make(), pixels())()
    msg = str(info.value)
    assert "non-finite loss at step 0" in msg and fragment in msg and "a.png, b.png" in msg, msg
    assert "\n" not in msg and msg.endswith("."), msg
    record("pretrain_nonfinite", "NaN in the images" if "images" in fragment else "NaN upsampler weights", info.value)


def test_a_run_that_trains_no_step_fails_and_writes_nothing(tmp_path, monkeypatch):
    import jafar.train.run as train_run

    monkeypatch.setattr(train_run, "check_readable", lambda *a, **k: None)  # past the up-front probe
    with pytest.raises(RuntimeError, match="no training step ran"):
        _pretrain(tmp_path, readable=False)()
    assert not (tmp_path / "run" / "jafar.safetensors").exists() and not (tmp_path / "run" / "results.json").exists()


def test_atomic_path_gives_the_umask_mode(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from jafar.utils import atomic_path\n"
            "with atomic_path(sys.argv[1]) as p: p.write_text('x')")
    subprocess.run(f"umask 022 && {sys.executable} -c \"{code}\" {tmp_path / 'f.json'}", shell=True, check=True,
                   cwd=ROOT)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644


def test_resumed_pretraining_keeps_csv_rows_and_the_last_ckpt_loads_as_weights(tmp_path, monkeypatch):
    import csv
    import os

    from jafar.train.module import JafarPretraining

    step = JafarPretraining.training_step

    def interrupted(self, batch, batch_idx):
        if self.global_step == 2:
            raise KeyboardInterrupt("killed at step 2")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(JafarPretraining, "training_step", interrupted)
    with pytest.raises(BaseException):
        _pretrain(tmp_path, "trainer.max_steps=4")()
    monkeypatch.setattr(JafarPretraining, "training_step", step)
    _pretrain(tmp_path, "trainer.max_steps=4")()  # resume=auto
    run = tmp_path / "run"
    with open(run / "csv" / "metrics.csv", newline="") as f:
        steps = sorted({int(float(r["step"])) for r in csv.DictReader(f) if r.get("train/loss")})
    assert steps == [0, 1, 2, 3], steps
    umask = os.umask(0)
    os.umask(umask)
    for name in ("results.json", "jafar.safetensors"):
        assert (run / name).stat().st_mode & 0o777 == 0o666 & ~umask
    # the project's own Lightning checkpoint is accepted as upsampler weights
    ref = jafar.load_checkpoint(run / "jafar.safetensors").state_dict()
    got = jafar.load_checkpoint(run / "checkpoints" / "last.ckpt", feature_dim=32, qk_dim=16).state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


# ---------------------------------------------------------------------------------------------
# the tool scripts: a refused input is its sentence alone and status 2; an error keeps its traceback
# ---------------------------------------------------------------------------------------------


def test_a_tool_prints_a_refused_input_alone_and_exits_with_status_2(tmp_path):
    """``tools/pretrain_jafar.py`` on a folder of images none of which decodes: the one sentence on
    stderr, no traceback above it (Hydra prints one for an exception), status 2, nothing written.
    A subprocess: about 10 s, the imports of torch, Lightning and Hydra."""
    import subprocess
    import sys

    folder = _images(tmp_path / "imgs", readable=False)
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "pretrain_jafar.py"), "experiment=demo",
                           f"data.root={folder}", "data.prepare=null", "data.val_images=1", f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "Error executing job" not in done.stderr, done.stderr
    assert done.stderr.strip().startswith("tools/pretrain_jafar.py: no readable image under"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (run_dir / "run_config.json").exists() and not (run_dir / "checkpoints").exists()


def test_an_unexpected_error_keeps_its_traceback_and_status_1(tmp_path):
    """An error that is not a refused input (here a RuntimeError raised while training) is not
    turned into a sentence: Python's traceback and a failing status, as any bug."""
    import subprocess
    import sys
    import textwrap

    folder = _images(tmp_path / "imgs")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        sys.argv = ["pretrain_jafar.py", "experiment=demo", "data.root={folder}", "data.prepare=null", "data.val_images=1",
                    "hydra.run.dir={tmp_path / 'run'}"]
        from jafar.runs import main
        from jafar.train.run import Pretraining

        class Broken(Pretraining):
            def execute(self, job):
                raise RuntimeError("a bug in the training loop")

        main(Broken())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "RuntimeError: a bug in the training loop" in done.stderr and "Traceback" in done.stderr, done.stderr
