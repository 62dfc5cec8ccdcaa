"""PEP 562 exports: a package names what its modules define, and each module is imported when first used.

    __getattr__, __dir__ = lazy_exports(__name__, {"FCMAE": ".model", ...})

This is what keeps `import fcmae` and `--help` free of torch and timm, and lets `python -m fcmae.convert` find its
package not yet loaded. A leaf module: it imports nothing of fcmae.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping

__all__ = ["lazy_exports"]


def lazy_exports(package: str, attributes: Mapping[str, str], submodules: bool = False
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level `__getattr__` and `__dir__` of `package`.

    attributes: name -> the module that defines it, relative to `package` (".model", "..errors").
    submodules: also give `package.NAME` for any submodule NAME, imported on first use (`fcmae.sparse`).
    """

    def __getattr__(name: str) -> Any:
        module = sys.modules[package]
        if name in attributes:
            value = getattr(importlib.import_module(attributes[name], package), name)
            setattr(module, name, value)  # once: later lookups find it without __getattr__
            return value
        if submodules and not name.startswith("_"):
            try:
                return importlib.import_module(f".{name}", package)
            except ModuleNotFoundError as e:
                if e.name != f"{package}.{name}":  # the module exists but a dependency of it is missing: say so
                    raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *attributes})

    return __getattr__, __dir__
