"""The registry of merge methods: adding a method is one file plus one line in ``_BUILT_IN``."""

from __future__ import annotations

from lorakit.methods.base import MergeMethod
from lorakit.methods.block import Block
from lorakit.methods.cat import Cat
from lorakit.methods.dare import DareLinear, DareTies
from lorakit.methods.magnitude_prune import MagnitudePrune
from lorakit.methods.random import Random
from lorakit.methods.soups import Soups
from lorakit.methods.svd import Svd
from lorakit.methods.ties import Ties

__all__ = ["get_method", "method_names", "register_method"]

_METHODS: dict[str, MergeMethod] = {}


def register_method(method: MergeMethod) -> None:
    """Add ``method`` to the registry.

    Raises:
        ValueError: if a method of that name is registered already.
    """
    if method.name in _METHODS:
        raise ValueError(f"a merge method named {method.name!r} is registered already; choose another name")
    _METHODS[method.name] = method


def get_method(name: str) -> MergeMethod:
    """Return the registered method ``name``.

    Raises:
        KeyError: for an unknown name, with the valid names in the message.
    """
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; valid methods: {', '.join(method_names())}") from None


def method_names() -> list[str]:
    """Return the registered method names in registration order."""
    return list(_METHODS)


_BUILT_IN = (Block(), Random(), Soups(), Cat(), Svd(), Ties(), DareLinear(), DareTies(), MagnitudePrune())
for _method in _BUILT_IN:
    register_method(_method)
