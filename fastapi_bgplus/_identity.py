"""Memos keyed by an object's identity, for objects that are not hashable (or
whose equality is not identity), that forget an entry when its object goes.

Each entry is ``id(obj) -> (weak reference to obj, value)``. A lookup tells a
live entry by the reference (``entry[0]() is obj``): an id can be reused once
its object has gone. The lookups stay inline where they run per request; this
module only writes entries.
"""

from __future__ import annotations

import weakref
from typing import Any, TypeAlias, TypeVar

__all__ = ["Memo", "remember"]

V = TypeVar("V")

Memo: TypeAlias = dict[int, tuple["weakref.ref[Any]", V]]


def remember(memo: Memo[V], obj: Any, value: V) -> tuple[weakref.ref[Any], V]:
    """Keep `value` for `obj` in `memo` until `obj` goes; returns the entry.

    Raises `TypeError` if `obj` cannot be weakly referenced."""
    key = id(obj)
    entry = memo[key] = (weakref.ref(obj, lambda _: memo.pop(key, None)), value)
    return entry
