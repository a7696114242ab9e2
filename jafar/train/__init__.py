"""JAFAR's task-agnostic training: image folders, loss, LightningModule, run composition."""

from .losses import CosineMSELoss
from .module import JafarPretraining

__all__ = ["CosineMSELoss", "JafarPretraining"]
