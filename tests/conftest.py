import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("JAFAR_FIXTURES", ROOT.parent / "shared" / "fixtures"))

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
        pytest.fail(f"fixture {path} is missing: the tests expect ../shared/fixtures beside the "
                    "repository (or JAFAR_FIXTURES pointing at it).")
    return torch.load(path, weights_only=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
