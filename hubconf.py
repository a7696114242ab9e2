"""torch.hub entry points: ``torch.hub.load("<owner>/<repo>", "jafar", backbone=...)``."""

dependencies = ["torch", "torchvision", "timm", "safetensors", "huggingface_hub"]


def jafar(backbone: str = "vit_small_patch14_dinov2.lvd142m", pretrained: bool = True, **kwargs):
    """A JAFAR upsampler and its frozen backbone: ``(upsampler, backbone)``.

    With ``pretrained=True`` the official release trained for ``backbone`` and the backbone's
    timm weights are downloaded (``jafar.OFFICIAL_RELEASES`` lists the backbones);
    with ``pretrained=False`` both are randomly initialised. ``kwargs`` go to ``JAFAR``
    (e.g. ``attention="reference"``).
    """
    from jafar import JAFAR, build_backbone, from_pretrained

    encoder = build_backbone(backbone, pretrained=pretrained)
    if pretrained:
        upsampler = from_pretrained(backbone, feature_dim=encoder.embed_dim, **kwargs)
    else:
        upsampler = JAFAR(v_dim=encoder.embed_dim, **kwargs)
    return upsampler, encoder
