"""JAFAR: Jack up Any Feature at Any Resolution.

``JAFAR(input_dim=3, qk_dim=128, v_dim=384, num_heads=4, kernel_size=1)`` is the upsampler;
``model(image, features, output_size)`` returns ``(B, v_dim, H_out, W_out)``. Every upsampler
(``jafar.upsamplers``) has that call; :func:`build_upsampler` builds one by name.
``jafar.load("dinov2_s", resolution=448)`` is an official release with its backbone, one module
from an RGB batch in [0, 1] to upsampled features (``jafar.pipeline``).
"""

from .backbones import Backbone, build_backbone
from .layers.attention import head_averaged_attention
from .pipeline import JafarFeatures, load
from .upsamplers import (
                         JAFAR,
                         Interpolate,
                         Upsampler,
                         build_upsampler,
                         create_upsampler,
                         list_upsamplers,
                         register_upsampler,
)
from .upsamplers.jafar import HUB_NAMES, OFFICIAL_RELEASES, from_pretrained, load_checkpoint, save_checkpoint

__version__ = "0.1.0"
__all__ = [
    "JAFAR", "Backbone", "Interpolate", "Upsampler", "build_backbone", "OFFICIAL_RELEASES", "HUB_NAMES",
    "build_upsampler", "create_upsampler", "list_upsamplers", "register_upsampler", "from_pretrained",
    "head_averaged_attention", "load_checkpoint", "save_checkpoint", "JafarFeatures", "load", "__version__",
]
