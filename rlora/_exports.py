"""Package names resolved on first use, so that importing a light module of the library (a
dataset check, a config) does not import torch, transformers and the serving code with it."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` giving each name of ``exports`` (name -> submodule, relative to
    ``package``) from its submodule, imported when the name is first asked for."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name], package), name)

    return __getattr__
