"""Finds output parsers by name: every module of a parser package is one parser family.

A parser class declares `names = ("hermes", ...)`; dropping a new module that defines one into
the package is all it takes to register it. A dotted `module:Class` path loads a parser kept
outside the package.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil


@functools.cache
def parsers_in(package: str, base: type) -> dict[str, type]:
    """Name -> class for every `base` subclass defined in the modules of `package`."""
    found: dict[str, type] = {}
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        module = importlib.import_module(f"{package}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, base) and cls.__module__ == module.__name__ and cls.__dict__.get("names"):
                for name in cls.names:
                    if name in found and found[name] is not cls:
                        raise RuntimeError(f"parser name {name!r} is defined twice in {package}")
                    found[name] = cls
    return found


def resolve_parser(name: str, package: str, base: type, what: str) -> type:
    if ":" in name:
        module_name, _, attr = name.partition(":")
        cls = getattr(importlib.import_module(module_name), attr, None)
        if not (inspect.isclass(cls) and issubclass(cls, base)):
            raise ValueError(f"{name!r} is not a {what} parser class")
        return cls
    known = parsers_in(package, base)
    if name not in known:
        raise ValueError(f"unknown {what} parser {name!r}; available: {', '.join(sorted(known))}")
    return known[name]
