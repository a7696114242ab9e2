import os
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``tests.errors_doc`` and the other test helpers by their full names
    sys.path.insert(0, str(ROOT))

from jafar.kernels.checks import interpreter  # noqa: E402
from tests import errors_doc  # noqa: E402

# Under TRITON_INTERPRET=1 make the interpreter's bfloat16 dot and cast behave as the GPU's; the
# package itself never patches Triton.
interpreter.apply()
#: the reference data of the tests (tests/fixtures/README.md); JAFAR_FIXTURES points elsewhere
FIXTURES = Path(os.environ.get("JAFAR_FIXTURES", ROOT / "tests" / "fixtures"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _exact_float32():
    """Exactness tests compare float32 results: no TF32 (PyTorch enables it for cuDNN)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="session")
def official_reference():
    path = FIXTURES / "jafar_official_reference.pt"
    if not path.is_file():
        pytest.fail(f"fixture {path} is missing: tests/fixtures/README.md says how it is made (or set "
                    "JAFAR_FIXTURES to a folder that holds it).")
    return torch.load(path, weights_only=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A tiny synthetic nuScenes (2 scenes x 2 samples, 160x90 images; 1 validation scene)."""
    pytest.importorskip("nuscenes")
    from bev.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic") / "nuscenes"
    generate(root, scenes=2, samples_per_scene=2, image_size=(160, 90), val_scenes=1, workers=1)
    return root


def refuse_network(monkeypatch, tmp_path, hf_offline: bool) -> list:
    """Every socket connection / DNS lookup raises (and is recorded in the returned list), empty
    Hugging Face and torch.hub caches under ``tmp_path``, HF_HUB_OFFLINE as given."""
    import socket

    import huggingface_hub.constants as hf_constants

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", hf_offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    return calls


class CountSteps(L.Callback):
    """A Lightning callback that counts the training steps it sees (``steps``)."""

    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, trainer, *args):
        self.steps += 1


class KillAt(L.Callback):
    """A Lightning callback that dies at the start of step ``at`` (after that step's checkpoint),
    like a killed job."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.at:
            raise RuntimeError("killed")


def compose_bev_demo(root, *overrides):
    """``configs/train_bev.yaml`` with ``experiment=demo`` shrunk to test size, on ``root``."""
    from bev.config import compose

    return compose(
        "experiment=demo", f"data.dataroot={root}", "data.prepare=null", "data.image_size=[32,64]",
        "data.batch_size=1", "data.num_workers=0", "grid.x_bounds=[-16,16]", "grid.y_bounds=[-16,16]",
        "grid.resolution=2.0", "encoder.guidance_size=[16,32]", "pictures=1",
        "trainer.max_steps=1", "trainer.val_check_interval=1", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1", *overrides)


def pytest_addoption(parser):
    parser.addoption("--write-errors-doc", action="store_true",
                     help="write the messages the bad-input tables got to docs/errors.md (tests/errors_doc.py)")


def pytest_sessionfinish(session, exitstatus):
    if session.config.getoption("--write-errors-doc") and errors_doc.RECORDED:
        written = errors_doc.write(errors_doc.RECORDED)
        print(f"\n{errors_doc.DOC}: sections {', '.join(written)} written")
