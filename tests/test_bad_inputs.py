"""Bad inputs get one sentence before any work (issue #17): a table of cases, each a row of
(what is called, the exception type, a fragment of the sentence). The API cases run in-process."""

from pathlib import Path

import numpy as np
import pytest
import torch

import jafar
from jafar import JAFAR, build_upsampler

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
    ("unknown upsampler", lambda: build_upsampler("anyup"), ValueError, "unknown upsampler 'anyup'"),
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
    # issue #17: train_bev.py experiment=demo trainer.max_steps=20 crashed inside OneCycleLR (0.05 x 20 =
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
