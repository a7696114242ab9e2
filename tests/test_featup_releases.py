"""FeatUp's released JBU stacks (github mhamilton723/FeatUp @ 6b5a6c0, hubconf.py and its README
table), offline: each release loads for the backbone it was trained on, from a file in the
release's own layout (a Lightning checkpoint whose ``state_dict`` holds ``model.*`` (the featurizer,
``model.1.norm.*`` its ChannelNorm when use_norm), ``upsampler.*``, ``downsampler.*`` and
``scale_net.*``, random tensors of the right names and shapes) placed where the download would put
it; ``checkpoint=auto`` picks it from the backbone; another backbone is refused in one sentence, or
gets random weights with a note when ``on_missing=random``."""

from types import SimpleNamespace

import pytest
import torch

from conftest import refuse_network
from jafar import build_backbone, build_upsampler
from jafar.upsamplers.featup import FEATUP_BACKBONES, FEATUP_RELEASES, featup_release_url

#: hubconf.py ``_load_backbone``: the URL pattern, typed from the file
URL = "https://marhamilresearch4.blob.core.windows.net/feature-upsampling-public/pretrained/{}{}_jbu_stack_cocostuff.ckpt"
#: the README table: release -> width of the features it upsamples (featurizers/util.py get_featurizer ``dim``)
WIDTHS = {"dino16": 384, "dinov2": 384, "clip": 512, "maskclip": 512, "vit": 384, "resnet50": 2048}


def _release_state(width: int, norm: bool, seed: int) -> dict:
    """A FeatUp JBU checkpoint's ``state_dict``, names and shapes from featup/upsamplers.py
    (JBUStack: up1..up4 = JBULearnedRange(3, dim, 32, radius=3), fixup_proj = Dropout2d, Conv2d(dim,
    dim, 1)) and train_jbu_upsampler.py (model = Sequential(featurizer, ChannelNorm(dim)),
    downsampler, scale_net), all random."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    state = {"model.0.model.blocks.0.attn.qkv.weight": r(3 * width, width)}  # the featurizer: not the upsampler's
    if norm:
        state.update({"model.1.norm.weight": r(width), "model.1.norm.bias": r(width)})
    for i in range(1, 5):
        p = f"upsampler.up{i}."
        state.update({p + "range_temp": r(()), p + "sigma_spatial": r(()).abs() + 0.5,
                      p + "range_proj.0.weight": r(32, 3, 1, 1), p + "range_proj.0.bias": r(32),
                      p + "range_proj.3.weight": r(32, 32, 1, 1), p + "range_proj.3.bias": r(32),
                      p + "fixup_proj.0.weight": r(49, 52, 1, 1), p + "fixup_proj.0.bias": r(49),
                      p + "fixup_proj.3.weight": r(49, 49, 1, 1), p + "fixup_proj.3.bias": r(49)})
    state.update({"upsampler.fixup_proj.1.weight": r(width, width, 1, 1), "upsampler.fixup_proj.1.bias": r(width),
                  "downsampler.attention_net.0.weight": r(1, width, 1, 1), "scale_net.net.weight": r(1, width, 1, 1)})
    return state


def _place_release(tmp_path, name: str, norm: bool, seed: int = 0) -> dict:
    """The release written where :func:`jafar.hub.download` caches it (torch hub dir/checkpoints/
    featup/<norm|no_norm>/<file of the URL>)."""
    state = _release_state(WIDTHS[name], norm, seed)
    path = tmp_path / "torch" / "checkpoints" / "featup" / ("norm" if norm else "no_norm") / f"{name}_jbu_stack_cocostuff.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "epoch": 0, "global_step": 2000}, path)
    return state


def _tiny_backbone(name: str, width: int):
    """A random one-block timm ViT of ``name`` at the release's width: its name is the one the
    released weights of that name would give."""
    return build_backbone(name, pretrained=False, depth=1, embed_dim=width, num_heads=6)


#: the backbones of this repository each release was trained on (their built name)
BACKBONES = {
    "dinov2": lambda: _tiny_backbone("dinov2_vits14", 384),
    "dino16": lambda: _tiny_backbone("dino_vits16", 384),
    "vit": lambda: _tiny_backbone("vit_small_patch16_224.augreg_in21k_ft_in1k", 384),
    "maskclip": lambda: SimpleNamespace(name="maskclip_ViT-B-16.openai", embed_dim=512),  # jafar.eval.maskclip's name
}


def test_urls_and_table_are_hubconf_s():
    assert set(FEATUP_RELEASES) == set(WIDTHS) == set(FEATUP_BACKBONES)
    assert {k: v[1] for k, v in FEATUP_RELEASES.items()} == WIDTHS
    for name in WIDTHS:
        assert featup_release_url(name) == URL.format("no_norm/", name)
        if name != "maskclip":  # hubconf.py maskclip(): "MaskCLIP only supports unnormed model"
            assert featup_release_url(name, norm=True) == URL.format("", name)
    with pytest.raises(ValueError, match="MaskCLIP only without LayerNorm"):
        featup_release_url("maskclip", norm=True)
    assert {k for k, v in FEATUP_BACKBONES.items() if not v} == {"clip", "resnet50"}


@pytest.mark.parametrize("name, norm", [(n, norm) for n in BACKBONES for norm in (False, True)
                                        if not (n == "maskclip" and norm)])
def test_each_release_loads_for_its_backbone(monkeypatch, tmp_path, name, norm):
    calls = refuse_network(monkeypatch, tmp_path, hf_offline=True)
    state = _place_release(tmp_path, name, norm, seed=len(name))
    backbone = BACKBONES[name]()
    for checkpoint in ("auto", name):
        up = build_upsampler("featup", backbone=backbone, checkpoint=checkpoint, norm=norm)
        assert up.feature_dim == WIDTHS[name]
        assert up.weights_source == f"FeatUp release {name!r}" + (" (LayerNorm)" if norm else "")
        ours = up.state_dict()
        for key, value in state.items():
            if key.startswith("upsampler."):
                assert torch.equal(ours[key[len("upsampler."):]], value), key
        if norm:
            assert torch.equal(ours["norm.weight"], state["model.1.norm.weight"])
            assert torch.equal(ours["norm.bias"], state["model.1.norm.bias"])
        else:
            assert up.norm is None
    assert calls == []


def test_a_release_for_another_backbone_is_refused_or_random(monkeypatch, tmp_path):
    refuse_network(monkeypatch, tmp_path, hf_offline=True)
    _place_release(tmp_path, "dinov2", norm=False)
    dino = _tiny_backbone("dino_vits16", 384)  # same width as the dinov2 release, other features
    with pytest.raises(ValueError, match=r"FeatUp's 'dinov2' release was trained on the features of DINOv2 ViT-S/14 "
                                         r"\(vit_small_patch14_dinov2.lvd142m\), not of vit_small_patch16_224.dino"):
        build_upsampler("featup", backbone=dino, checkpoint="dinov2")
    with pytest.warns(UserWarning, match="random weights"):
        up = build_upsampler("featup", backbone=dino, checkpoint="dinov2", on_missing="random")
    assert up.weights_source.startswith("random init ('dinov2' not loaded: FeatUp's 'dinov2' release was trained on")
    # LiFT's extractor (the key facet) is not FeatUp's dino16 extractor (the normed tokens)
    keys = build_backbone("dino_vits16", pretrained=False, depth=1, embed_dim=384, num_heads=6, facet="key", layer=0)
    with pytest.raises(ValueError, match="FeatUp has no release for the backbone vit_small_patch16_224.dino "
                                         r"\(key of block 0\)"):
        build_upsampler("featup", backbone=keys, checkpoint="auto")
    with pytest.raises(ValueError, match="checkpoint=auto picks the release of the backbone: pass backbone="):
        build_upsampler("featup", feature_dim=384, checkpoint="auto")
    # no backbone named: the width check as before (the dinov2 release is for 384 channels)
    with pytest.raises(ValueError, match="upsamples 384-channel features, not 32"):
        build_upsampler("featup", feature_dim=32, checkpoint="dinov2")


def test_the_maskclip_backbone_name_is_the_one_the_release_table_names():
    """jafar.eval.maskclip.build_maskclip names its backbone maskclip_<open_clip name>.<weights tag>;
    configs/backbone/maskclip_vitb16.yaml asks for ViT-B-16 with the openai weights, FeatUp's."""
    from jafar.eval.config import compose

    b = compose("task=ovseg").backbone
    assert f"maskclip_{b.name}.{b.pretrained}" in FEATUP_BACKBONES["maskclip"]
