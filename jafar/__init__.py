"""JAFAR: Jack up Any Feature at Any Resolution."""

from .attention import head_averaged_attention
from .model import JAFAR

__version__ = "0.1.0"
__all__ = ["JAFAR", "head_averaged_attention", "__version__"]
