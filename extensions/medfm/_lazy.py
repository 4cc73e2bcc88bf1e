"""Attributes of a package imported on first use (PEP 562), so ``medfm --help`` and ``medfm list`` do not
load torch, MONAI and ITK, while ``medfm.io.LoadScan`` and the configs' ``$medfm.x.y`` still resolve."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_attributes(package: str, submodules: tuple[str, ...] = (), attributes: dict[str, str] | None = None
                    ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: its ``submodules`` by name, and ``attributes``, a map of
    each other public name to the submodule (relative, e.g. ``".inference"``) that defines it."""
    attributes = attributes or {}

    def __getattr__(name: str) -> object:
        if name in submodules:
            value = importlib.import_module(f".{name}", package)
        elif name in attributes:
            value = getattr(importlib.import_module(attributes[name], package), name)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        globals_of_package = importlib.import_module(package).__dict__
        globals_of_package[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*importlib.import_module(package).__dict__, *submodules, *attributes})

    return __getattr__, __dir__
