"""torch.hub entry points.

* ``torch.hub.load("<owner>/<repo>", "dinov2_s", resolution=448)`` (or any of the official hub's
  names below, or ``"load", name="dinov3_l"``): an official release and its backbone as one module
  from an RGB batch in [0, 1] to upsampled features (``jafar.load``).
* ``torch.hub.load("<owner>/<repo>", "jafar", backbone=...)``: ``(upsampler, backbone)``.
"""

dependencies = ["torch", "torchvision", "timm", "safetensors", "huggingface_hub"]

#: the official hub's names (github PaulCouairon/JAFAR ``hubconf.py``); jafar.HUB_NAMES maps them
NAMES = ("dinov2_s", "dinov2_b", "dinov2_reg4_s", "dinov3_s", "dinov3_s_plus", "dinov3_b", "dinov3_l", "dino_b",
         "clip_b", "siglip2_b", "vit_b", "radio_b", "radio_l", "radio_h")


def load(name: str, resolution=512, **kwargs):
    """``jafar.load(name, resolution, **kwargs)``: weights=, backbone_weights= (local files),
    pretrained=, device=, cache_dir=; see ``jafar.pipeline.load``."""
    from jafar import load as _load

    return _load(name, resolution, **kwargs)


def _entry(name: str):
    def entry(resolution=512, **kwargs):
        return load(name, resolution, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"``jafar.load({name!r}, resolution, **kwargs)``: the official release for {name}."
    return entry


for _name in NAMES:
    globals()[_name] = _entry(_name)


def jafar(backbone: str = "vit_small_patch14_dinov2.lvd142m", pretrained: bool = True, **kwargs):
    """A JAFAR upsampler and its frozen backbone: ``(upsampler, backbone)``.

    With ``pretrained=True`` the official release trained for ``backbone`` and the backbone's
    weights are downloaded (``jafar.OFFICIAL_RELEASES`` lists the backbones; RADIO's through its
    authors' torch.hub loader); with ``pretrained=False`` both are randomly initialised (timm
    backbones only). ``kwargs`` go to ``JAFAR`` (e.g. ``attention="reference"``).
    """
    from jafar import JAFAR, build_backbone, from_pretrained
    from jafar.upsamplers.jafar import find_release, resolve_release

    release = resolve_release(backbone) if pretrained else find_release(backbone)
    name = release.backbone if release is not None else backbone
    encoder = build_backbone(name, pretrained=pretrained)
    if pretrained:
        upsampler = from_pretrained(name, feature_dim=encoder.embed_dim, **kwargs)
    else:
        upsampler = JAFAR(v_dim=encoder.embed_dim, **kwargs)
    return upsampler, encoder
