"""JAFAR: Jack up Any Feature at Any Resolution.

``JAFAR(input_dim=3, qk_dim=128, v_dim=384, num_heads=4, kernel_size=1)`` is the upsampler;
``model(image, features, output_size)`` returns ``(B, v_dim, H_out, W_out)``. Every upsampler
(``jafar.upsamplers``) has that call; :func:`build_upsampler` builds one by name.
"""

from .backbones import Backbone, build_backbone
from .layers.attention import head_averaged_attention
from .upsamplers import (Interpolate, JAFAR, Upsampler, build_upsampler, create_upsampler, list_upsamplers,
                         register_upsampler)
from .upsamplers.jafar import OFFICIAL_RELEASES, from_pretrained, load_checkpoint, save_checkpoint

__version__ = "0.1.0"
__all__ = [
    "JAFAR", "Backbone", "Interpolate", "Upsampler", "build_backbone", "OFFICIAL_RELEASES", "build_upsampler",
    "create_upsampler", "list_upsamplers", "register_upsampler", "from_pretrained", "head_averaged_attention",
    "load_checkpoint", "save_checkpoint", "__version__",
]
