"""The README's commands are the ones CI runs, and its Python example works."""

import re

import torch

from conftest import ROOT


def _blocks(text, lang):
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _commands(block):
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_ci_runs_the_readme_commands():
    """CI runs each of the README's two commands, each demo with smoke-size overrides appended."""
    readme = (ROOT / "README.md").read_text()
    first = _commands(_blocks(readme, "bash")[0])
    ci = [c for c in _commands((ROOT / ".ci" / "run").read_text()) if not c.startswith(("set ", "cd "))]
    assert len(ci) == len(first) == 2
    ci_parts, readme_parts = ci[0].split(" && "), first[0].split(" && ")
    assert len(ci_parts) == len(readme_parts) == 3  # set-up, pretraining demo, BeV demo
    assert all(c == r or c.startswith(r + " ") for c, r in zip(ci_parts, readme_parts)), (ci_parts, readme_parts)
    for c, r in zip(ci_parts[1:], readme_parts[1:]):
        assert "trainer.max_steps=" in c and "trainer.max_steps=" not in r
    assert ci[1] == first[1]


def test_readme_example_runs_offline(monkeypatch):
    import jafar

    code = _blocks((ROOT / "README.md").read_text(), "python")[0]
    # offline stand-ins: a tiny random DINOv2-shaped backbone of width 384, no checkpoint files
    real = jafar.build_backbone
    monkeypatch.setattr(jafar, "build_backbone", lambda name: real(name, pretrained=False, depth=1, num_heads=2))
    code = code.replace("from jafar import JAFAR, build_backbone, load_checkpoint",
                        "from jafar import JAFAR, load_checkpoint; build_backbone = jafar.build_backbone")
    code = code.replace("448", "112")  # same code path, a CPU-friendly size
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["features"].shape == (1, 384, 8, 8)
    assert scope["hr"].shape == (1, 384, 112, 112)
    assert torch.isfinite(scope["hr"]).all()


def test_torch_hub_entry_point(monkeypatch):
    import jafar

    real = jafar.build_backbone
    monkeypatch.setattr(jafar, "build_backbone",
                        lambda name, pretrained: real(name, pretrained=pretrained, depth=1, embed_dim=48, num_heads=2))
    upsampler, backbone = torch.hub.load(str(ROOT), "jafar", source="local", pretrained=False,
                                         attention="reference")
    assert upsampler.v_dim == backbone.embed_dim == 48 and upsampler.attention == "reference"
