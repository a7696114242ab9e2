"""setup.cfg against the code: every third-party import of jafar/, bev/, tools/ and hubconf.py
is declared (in install_requires or an extra), `import jafar` needs the core only, and JAFAR and
bilinear upsample in an interpreter where every extra is missing."""

import ast
import configparser
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]

#: import name -> distribution name, where they differ (beyond case and '_' / '-')
DISTRIBUTION = {
    "PIL": "pillow", "cv2": "opencv-python-headless", "yaml": "pyyaml", "sklearn": "scikit-learn",
    "skimage": "scikit-image", "nuscenes": "nuscenes-devkit", "open_clip": "open-clip-torch",
    "spconv": "spconv-cu120", "hydra": "hydra-core", "google": "protobuf",
}
#: imported but declared nowhere, on purpose; each import of these must be guarded (inside a
#: ``try`` whose handler catches ImportError)
UNDECLARED = {"triton": "ships with torch's Linux CUDA wheels; without it the kernels are unavailable"}


def _dist(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_lines() -> Tuple[List[str], Dict[str, List[str]]]:
    """``(core, {extra: requirements})`` from setup.cfg, as written (comments dropped)."""
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(ROOT / "setup.cfg")

    def lines(text: str) -> List[str]:
        return [ln.split("#")[0].strip() for ln in text.splitlines() if ln.split("#")[0].strip()]

    return lines(cfg["options"]["install_requires"]), {k: lines(v) for k, v in cfg["options.extras_require"].items()}


def _requirements() -> Tuple[Set[str], Dict[str, Set[str]]]:
    """``(core, {extra: distributions})`` from setup.cfg."""
    core, extras = _requirement_lines()

    def names(lines: List[str]) -> Set[str]:
        return {_dist(re.match(r"[A-Za-z0-9._-]+", ln).group(0)) for ln in lines}

    return names(core), {k: names(v) for k, v in extras.items()}


#: the Triton kernels' verification code (needs Triton by design; imported by no library module)
TRITON_CHECKS = ROOT / "jafar" / "kernels" / "checks"


def _first_party() -> Set[str]:
    names = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    names |= {p.stem for p in ROOT.glob("*.py")} | {p.stem for p in (ROOT / "tools").glob("*.py")}
    return names | {"tests", "conftest"}


def _sources() -> List[Path]:
    """Every Python file of the packages jafar and bev, of tools/, and hubconf.py (found by walking
    the folders, so files that move keep being checked)."""
    files = [p for folder in ("jafar", "bev", "tools") for p in sorted((ROOT / folder).rglob("*.py"))]
    return files + [ROOT / "hubconf.py"]


def _guarded(node: ast.AST, parents: Dict[ast.AST, ast.AST], name: str) -> bool:
    """Whether the import ``node`` of ``name`` is guarded: in the body of a ``try`` that catches
    ImportError (or broader), or under an ``if`` that tests ``name`` (``if triton is not None:``)."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.Try) and child in parent.body:
            for handler in parent.handlers:
                caught = handler.type
                names = [] if caught is None else [
                    getattr(e, "id", getattr(e, "attr", "")) for e in
                    (caught.elts if isinstance(caught, ast.Tuple) else [caught])]
                if caught is None or {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"} & set(names):
                    return True
        if isinstance(parent, ast.If) and child in parent.body and any(
                isinstance(n, ast.Name) and n.id == name for n in ast.walk(parent.test)):
            return True
        child, parent = parent, parents.get(parent)
    return False


def _imports(path: Path) -> Iterator[Tuple[str, int, bool, bool]]:
    """``(top-level module, line, at import time, guarded)`` of each absolute import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def at_import_time(node: ast.AST) -> bool:
        parent = parents.get(node)
        while parent is not None:
            if isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                return False
            parent = parents.get(parent)
        return True

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        for module in modules:
            top = module.split(".")[0]
            yield top, node.lineno, at_import_time(node), _guarded(node, parents, top)


def _third_party(path: Path) -> Iterator[Tuple[str, int, bool, bool]]:
    skip = set(sys.stdlib_module_names) | _first_party() | {"__future__"}
    for name, line, import_time, guarded in _imports(path):
        if name not in skip:
            yield name, line, import_time, guarded


def test_every_import_is_declared_in_setup_cfg():
    core, extras = _requirements()
    declared = core.union(*extras.values())
    undeclared, unguarded = [], []
    for path in _sources():
        for name, line, _, guarded in _third_party(path):
            where = f"{path.relative_to(ROOT)}:{line} imports {name}"
            if name in UNDECLARED:
                # jafar/kernels/checks/ verifies the Triton kernels: it runs only where Triton is
                # installed, and nothing imports it but the tests and the measurement scripts
                if not guarded and TRITON_CHECKS not in path.parents:
                    unguarded.append(where)
            elif _dist(DISTRIBUTION.get(name, name)) not in declared:
                undeclared.append(f"{where} ({_dist(DISTRIBUTION.get(name, name))} is in no list of setup.cfg)")
    assert not undeclared, "\n".join(undeclared)
    assert not unguarded, "imports of packages setup.cfg leaves out on purpose must be guarded:\n" + "\n".join(
        unguarded)
    assert not declared & set(UNDECLARED), "setup.cfg lists a package the code treats as optional"


def test_the_core_and_the_extras_are_the_documented_sets():
    core, extras = _requirements()
    assert core == {"torch", "torchvision", "timm", "safetensors", "huggingface-hub"}
    assert {"hydra-core", "omegaconf", "lightning", "tensorboard", "torchmetrics", "tqdm"} <= extras["train"]
    assert extras["train"] | {"open-clip-torch"} <= extras["eval"]
    assert extras["train"] | {"nuscenes-devkit", "spconv-cu120", "opencv-python-headless"} <= extras["bev"]
    # the devkit's numpy < 2 pin stays inside the bev extra
    core_lines, extra_lines = _requirement_lines()
    pinned = [k for k, lines in [("core", core_lines), *extra_lines.items()]
              if any(re.fullmatch(r"numpy\s*<\s*2(\.0)*\s*(;.*)?", ln) for ln in lines)]
    assert pinned == ["bev"], pinned
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    installed = set(re.search(r'pip install --quiet -e "\.\[([a-z_,-]+)\]"', setup).group(1).split(","))
    assert {"dev", "demo", "train", "bev", "eval"} <= installed <= set(extras)


def _core_modules() -> List[str]:
    """The jafar modules that `import jafar` loads."""
    code = "import json, sys, jafar; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'jafar')))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _module_file(module: str) -> Path:
    base = ROOT.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def test_import_jafar_uses_the_core_only():
    core, _ = _requirements()
    modules = _core_modules()
    assert "jafar" in modules and len(modules) > 1
    outside = []
    for module in modules:
        for name, line, import_time, guarded in _third_party(_module_file(module)):
            if name in UNDECLARED and guarded:
                continue
            if _dist(DISTRIBUTION.get(name, name)) not in core:
                when = "at import time" if import_time else "in a function"
                outside.append(f"{module} (line {line}) imports {name} {when}, which the core does not install")
    assert not outside, "\n".join(outside)


#: run in a fresh interpreter in which every package of the extras is missing
CORE_ONLY = r"""
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))

class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (not in the core install)", name=name)
        return None

sys.meta_path.insert(0, Missing())
import warnings
warnings.filterwarnings("ignore", message=".*NumPy.*")
import torch
import jafar

torch.manual_seed(0)
image, features = torch.rand(2, 3, 32, 32), torch.randn(2, 8, 4, 4)
jafar_up = jafar.build_upsampler("jafar", feature_dim=8, qk_dim=16)
with torch.no_grad():
    out = jafar_up(image, features, (16, 16))
assert out.shape == (2, 8, 16, 16) and torch.isfinite(out).all(), out.shape
bilinear = jafar.build_upsampler("bilinear")(image, features, (16, 16))
assert torch.equal(bilinear, torch.nn.functional.interpolate(features, size=(16, 16), mode="bilinear"))
loaded = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
assert not loaded, loaded
print("core only: ok")
"""


def test_jafar_and_bilinear_upsample_with_the_core_only():
    """`pip install jafar` without extras: JAFAR and bilinear upsample; nothing of the extras (nor
    numpy, pillow or triton, which the core does not ask for) is imported."""
    core, extras = _requirements()
    import_names = {_dist(d): i for i, d in DISTRIBUTION.items()}
    blocked = {import_names.get(d, d.replace("-", "_")) for d in set().union(*extras.values()) - core}
    blocked |= {"pytorch_lightning", "PIL", "numpy", "triton"}
    assert {"hydra", "omegaconf", "lightning", "tensorboard", "torchmetrics", "tqdm", "open_clip", "nuscenes",
            "spconv", "cv2", "skimage", "sklearn", "matplotlib"} <= blocked
    proc = subprocess.run([sys.executable, "-c", CORE_ONLY, ",".join(sorted(blocked))], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "core only: ok" in proc.stdout, proc.stderr[-3000:]
