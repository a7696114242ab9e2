"""One registry type for everything the project builds by name: upsamplers
(:data:`jafar.upsamplers.UPSAMPLERS`), BeV heads (:data:`bev.heads.HEADS`) and evaluation tasks
(:data:`jafar.eval.tasks.TASKS`).

A :class:`Registry` owns a package. Its first lookup imports every module of that package
(``pkgutil.iter_modules``, modules whose name starts with ``_`` excepted), and each module
registers what it defines with ``@REGISTRY.register(name)``. Adding an entry is therefore one file
in the package (plus its yaml under ``configs/``): there is no list of modules to keep, and the
contract tests, parametrised over :meth:`Registry.list`, cover the new entry without being edited.

A module that fails to import is not hidden: the failure is logged when the package is scanned,
and asking for a name that is not registered says which modules failed and why, in the same
sentence as the registered names.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from typing import Any, Callable, Dict, List, Optional

log = logging.getLogger(__name__)


class Registry:
    """Names -> objects (classes or factories) of one kind.

    Args:
        kind: what the entries are, for sentences (``"upsampler"``, ``"BeV head"``).
        package: the package whose modules register the entries (imported on first lookup);
            None: only what is registered explicitly.
        key: the config key that chooses an entry (``"upsampler"``, ``"model"``, ``"task.name"``),
            for the sentence that refuses an unknown name.
    """

    def __init__(self, kind: str, package: Optional[str] = None, key: Optional[str] = None):
        self.kind, self.package, self.key = kind, package, key or kind
        self._entries: Dict[str, Any] = {}
        self._failed: Dict[str, str] = {}
        self._scanned = package is None

    # -------------------------------------------------------------- registering
    def register(self, name: str, obj: Any = None) -> Callable:
        """``@registry.register(name)`` on a class or factory, or ``registry.register(name, obj)``.
        A name registered twice is refused."""

        def wrap(o):
            if name in self._entries:
                raise ValueError(f"a {self.kind} named {name!r} is already registered "
                                 f"({_where(self._entries[name])}).")
            self._entries[name] = o
            return o

        return wrap if obj is None else wrap(obj)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a test's temporary entry); absent names are ignored."""
        self._entries.pop(name, None)

    # -------------------------------------------------------------- looking up
    def scan(self) -> None:
        """Import every module of the package once (each registers its entries)."""
        if self._scanned:
            return
        self._scanned = True
        package = importlib.import_module(self.package)
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            if info.name.startswith("_"):
                continue
            module = f"{self.package}.{info.name}"
            try:
                importlib.import_module(module)
            except ImportError as err:  # an optional dependency missing: said, not swallowed
                self._failed[module] = f"{type(err).__name__}: {err}"
                log.warning("%s not loaded (%s): its %ss are unavailable.", module, self._failed[module], self.kind)

    def list(self) -> List[str]:
        """The registered names, in registration order (modules scanned in name order)."""
        self.scan()
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        self.scan()
        return name in self._entries

    def get(self, name: str) -> Any:
        """The object registered as ``name``; an unknown name is refused in one sentence."""
        self.scan()
        if name not in self._entries:
            raise ValueError(self.unknown(name))
        return self._entries[name]

    def build(self, name: str, *args, **kwargs) -> Any:
        """``get(name)(*args, **kwargs)``."""
        return self.get(name)(*args, **kwargs)

    def unknown(self, name: str) -> str:
        """The sentence refusing ``name``: what was given, the registered names, and any module of
        the package that failed to import."""
        failed = "".join(f"; {m} failed to import ({why})" for m, why in self._failed.items())
        return (f"{self.key}={name!r} is not a registered {self.kind}; expected one of "
                f"{', '.join(self._entries) or '(none)'}{failed}.")


def _where(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
