"""Frozen submodules that are ordinary children of their ``nn.Module``.

A module that holds a frozen encoder (the pretraining module's backbone, a probe's backbone and
upsampler, ...) registers it with :meth:`FrozenChildren.add_frozen`: it is a normal child, so
``.to(device)``, ``.to(dtype)`` and ``.cuda()`` move it with the rest, but

* its parameters do not require gradients (so optimisers built from ``requires_grad`` never see
  them);
* it stays in eval mode whatever ``train(mode)`` is called with;
* it is left out of ``state_dict()`` (a checkpoint holds what was trained, not the encoder that
  the configuration rebuilds), and ``load_state_dict`` neither needs nor applies its entries,
  so checkpoints written before it was a child load as they are.
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import nn


class FrozenChildren(nn.Module):
    """Mixin for ``nn.Module`` subclasses (put it before ``nn.Module`` / ``LightningModule`` in
    the bases) that hold frozen children; see the module's docstring."""

    _frozen_names: Tuple[str, ...] = ()

    def add_frozen(self, name: str, module: Optional[nn.Module]) -> None:
        """Register ``module`` (or None) as the frozen child ``name``: no gradients, eval mode,
        outside the state dict."""
        if not self._frozen_names:
            self.register_state_dict_post_hook(_drop_frozen_entries)
            self.register_load_state_dict_pre_hook(_ignore_frozen_entries)
            self.register_load_state_dict_post_hook(_forgive_frozen_missing)
        if name not in self._frozen_names:
            self._frozen_names = self._frozen_names + (name,)
        if module is not None:
            module.requires_grad_(False)
            module.train(False)
        setattr(self, name, module)

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self._frozen_names:
            module = getattr(self, name, None)
            if module is not None:
                module.train(False)
        return self


def _heads(module: FrozenChildren, prefix: str) -> Tuple[str, ...]:
    return tuple(f"{prefix}{name}." for name in module._frozen_names)


def _drop_frozen_entries(module, state_dict, prefix, local_metadata) -> None:
    heads = _heads(module, prefix)
    for key in [k for k in state_dict if k.startswith(heads)]:
        del state_dict[key]


def _ignore_frozen_entries(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                           error_msgs) -> None:
    heads = _heads(module, prefix)
    for key in [k for k in state_dict if k.startswith(heads)]:
        del state_dict[key]  # the frozen child keeps its weights
    module._frozen_load_heads = heads


def _forgive_frozen_missing(module, incompatible_keys) -> None:
    heads = module.__dict__.pop("_frozen_load_heads", ())
    if heads:
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.startswith(heads)]
