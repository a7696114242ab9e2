"""The shape of the house: one registry type whose contract tests cover a new entry without being
edited, imports that point one way, and a tree that speaks of what the code does."""

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# the registry type
# ---------------------------------------------------------------------------------------------


def test_a_registry_scans_its_package_and_refuses_an_unknown_name_with_what_failed(tmp_path, monkeypatch):
    pkg = tmp_path / "toy_entries"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from jafar.registry import Registry\nTOYS = Registry('toy', 'toy_entries')\n")
    (pkg / "alpha.py").write_text("from . import TOYS\n\n@TOYS.register('alpha')\ndef alpha(x):\n    return x + 1\n")
    (pkg / "broken.py").write_text("import a_package_that_is_not_installed\n")
    (pkg / "_private.py").write_text("raise RuntimeError('never imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import toy_entries

    toys = toy_entries.TOYS
    assert toys.list() == ["alpha"] and toys.build("alpha", 1) == 2 and "alpha" in toys
    with pytest.raises(ValueError, match=r"^toy='beta' is not a registered toy; expected one of alpha; "
                                         r"toy_entries.broken failed to import \(ModuleNotFoundError: No module "
                                         r"named 'a_package_that_is_not_installed'\)\.$"):
        toys.get("beta")
    with pytest.raises(ValueError, match="a toy named 'alpha' is already registered"):
        toys.register("alpha", len)
    toys.unregister("alpha")
    assert toys.list() == []
    sys.modules.pop("toy_entries", None)
    sys.modules.pop("toy_entries.alpha", None)


def test_a_new_upsampler_file_and_a_new_head_file_are_covered_by_the_contract_tests(tmp_path):
    """One new file in each package (here in an extra folder of the packages' search path, as a
    file added to jafar/upsamplers/ and bev/heads/ would be): the contract tests, run unchanged,
    have a case for each and pass. A subprocess (a fresh registry scan): about 15 s."""
    ups, heads = tmp_path / "upsamplers", tmp_path / "heads"
    ups.mkdir(), heads.mkdir()
    (ups / "zz_dummy_upsampler.py").write_text(textwrap.dedent('''
        import torch.nn.functional as F
        from jafar.upsamplers.base import Upsampler, check_output_size, register_upsampler

        class NearestThenAverage(Upsampler):
            def forward(self, image, features, output_size):
                h, w = check_output_size(output_size)
                return F.avg_pool2d(F.interpolate(features, size=(h, w), mode="nearest"), 3, 1, 1)

            def describe(self):
                return "nearest, then a 3x3 average (a test upsampler)."

        @register_upsampler("zz_dummy")
        def build(feature_dim=None, checkpoint=None, backbone=None, **options):
            return NearestThenAverage()
    '''))
    (heads / "zz_dummy_head.py").write_text(textwrap.dedent('''
        from torch import nn
        from bev.heads.common import HEADS, check_camera_inputs, lift_to_voxels

        @HEADS.register("zz_dummy")
        class VoxelMean(nn.Module):
            SMOKE_OPTIONS = {}

            def __init__(self, in_channels, grid):
                super().__init__()
                self.grid = grid
                self.out = nn.Conv2d(in_channels * grid.z_bins, 4, 1)

            def forward(self, features, intrinsics, cam2ego, image_size):
                image_size = check_camera_inputs(features, intrinsics, cam2ego, image_size)
                voxels, _ = lift_to_voxels(features, intrinsics, cam2ego, image_size, self.grid)
                b, c, x, y, z = voxels.shape
                out = self.out(voxels.permute(0, 1, 4, 2, 3).reshape(b, c * z, x, y))
                return {"seg": out[:, :1], "centerness": out[:, 1:2].sigmoid(), "offset": out[:, 2:]}
    '''))
    (tmp_path / "extra_entries.py").write_text(textwrap.dedent(f'''
        import bev.heads
        import jafar.upsamplers

        jafar.upsamplers.__path__.append({str(ups)!r})
        bev.heads.__path__.append({str(heads)!r})
    '''))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "extra_entries", "-p", "no:cacheprovider", "-rA",
         "tests/test_upsampler_registry.py::test_every_registered_upsampler_shares_the_call_and_describes_itself",
         "tests/test_bev_model.py::test_a_training_step_with_bev_augment", "-k", "zz_dummy"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "PASSED tests/test_upsampler_registry.py::test_every_registered_upsampler_shares_the_call_and_describes_" \
           "itself[zz_dummy]" in out, out
    assert "PASSED tests/test_bev_model.py::test_a_training_step_with_bev_augment[zz_dummy]" in out, out


# ---------------------------------------------------------------------------------------------
# imports point one way
# ---------------------------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph():
    """``{module: modules it imports}`` over jafar/ and bev/, imports inside functions included (a
    lazy import still makes a cycle of responsibilities); a module's own parent packages, which
    Python initialises first anyway, are not edges."""
    paths = {_module_name(p): p for pkg in ("jafar", "bev") for p in (ROOT / pkg).rglob("*.py")}
    graph = {m: set() for m in paths}
    for name, path in paths.items():
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    stem = ".".join(base[:len(base) - (node.level - 1)])
                    full = stem + (f".{node.module}" if node.module else "")
                else:
                    full = node.module
                targets = [full] + [f"{full}.{a.name}" for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in paths and t != name and not name.startswith(t + ".")}
    return graph


def _cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_the_packages():
    graph = _import_graph()
    assert "jafar.layers.norm" in graph["jafar.upsamplers.jafar"]  # the graph is read at all
    assert _cycles(graph) == []
    # the kernels know no model and no layer
    assert not {m for m in graph["jafar.kernels.encoders"] | graph["jafar.kernels.attention"]
                if m.startswith(("jafar.layers", "jafar.upsamplers"))}


def test_the_checker_finds_a_lazy_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_tool_and_no_package_imports_the_tests():
    for folder in ("tools", "jafar", "bev"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                assert not any(n == "tests" or n.startswith("tests.") for n in names), path
    assert "spec_from_file_location" not in "".join(p.read_text() for p in (ROOT / "tools").glob("*.py"))


# ---------------------------------------------------------------------------------------------
# the tree speaks of what the code does
# ---------------------------------------------------------------------------------------------

#: words about how the code was made rather than what it does (a tracker's issue numbers, phases of
#: work, the machines a measurement lacked); an upstream issue is cited by its address
HISTORY = re.compile(r"issue #[0-9]|lent (gpu|machine)|\b(first|second|third) round|\bround [0-9]|"
                     r"(this|that|each|a|the) session\b", re.IGNORECASE)


def test_code_configs_tests_and_docs_speak_of_what_the_code_does():
    files = [ROOT / "README.md"] + [p for folder in ("jafar", "bev", "tools", "configs", "tests", "docs")
                                    for p in sorted((ROOT / folder).rglob("*"))
                                    if p.suffix in (".py", ".md", ".yaml", ".cfg", ".toml") and p.is_file()]
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in files
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
            if HISTORY.search(line) and p != Path(__file__)]
    assert hits == []


def test_every_registered_entry_has_its_yaml_and_every_yaml_names_an_entry():
    """The config groups and the registries agree: ``configs/upsampler/<name>.yaml`` names a
    registered upsampler (``none``, BeV's no-upsampler choice, excepted), ``configs/model/`` a
    registered head, ``configs/task/`` a registered task, and every entry has its yaml."""
    import yaml

    from bev.heads import HEADS
    from jafar.eval.tasks import TASKS
    from jafar.upsamplers import UPSAMPLERS

    for group, registry, key, extra in (("upsampler", UPSAMPLERS, "name", {"none"}), ("model", HEADS, "name", set()),
                                        ("task", TASKS, "name", set())):
        named = {}
        for path in sorted((ROOT / "configs" / group).glob("*.yaml")):
            node = yaml.safe_load(path.read_text())
            named[path.stem] = (node.get("task", node) if group == "task" else node).get(key, path.stem)
        assert set(named.values()) - extra <= set(registry.list()), (group, named)
        assert set(registry.list()) <= set(named.values()), (group, registry.list())
