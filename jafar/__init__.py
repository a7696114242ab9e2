"""JAFAR: Jack up Any Feature at Any Resolution.

``JAFAR(input_dim=3, qk_dim=128, v_dim=384, num_heads=4, kernel_size=1)`` is the upsampler;
``model(image, features, output_size)`` returns ``(B, v_dim, H_out, W_out)``.
"""

from .attention import head_averaged_attention
from .backbones import Backbone, build_backbone
from .baselines import Interpolate
from .checkpoint import OFFICIAL_RELEASES, from_pretrained, load_checkpoint, save_checkpoint
from .model import JAFAR
from .upsamplers import build_upsampler

__version__ = "0.1.0"
__all__ = [
    "JAFAR", "Backbone", "Interpolate", "build_backbone", "OFFICIAL_RELEASES", "build_upsampler", "from_pretrained",
    "head_averaged_attention", "load_checkpoint", "save_checkpoint", "__version__",
]
