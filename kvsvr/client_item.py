"""`Item`, what the client's reads return, and its fast constructor."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Item:
    """A stored value and the version that wrote it.

    `key` is set by `scan` only, where it is the row's *sort key* (the partition
    key is the one scanned); `get` leaves it None, as the caller knows the key.
    """

    value: bytes
    version: int
    key: bytes | None = None


# `Item(value, version)` for the hot path: a frozen dataclass's __init__ sets
# each field through `object.__setattr__`, which costs twice as much as
# filling the slots directly. Same class, same fields, same immutability.
_new_object = object.__new__
_set_item_value = Item.__dict__["value"].__set__
_set_item_version = Item.__dict__["version"].__set__
_set_item_key = Item.__dict__["key"].__set__


def item_of(value: bytes, version: int) -> Item:
    item: Item = _new_object(Item)
    _set_item_value(item, value)
    _set_item_version(item, version)
    _set_item_key(item, None)
    return item
