"""A JSON file's top-level array, item by item, as raw bytes: an item over the row limit is passed over
as it is read, so memory holds one item at most, whatever the file holds (a parser that builds each
item first held 574 MB for a 40 MB item under a 1 MiB limit)."""

from __future__ import annotations

import re
from typing import IO, Iterator

_READ_BLOCK = 1 << 16  # what the array is scanned by

class BrokenArray(ValueError):
    """The array is cut or broken at this point: nothing after it is read."""


# Outside a string, what matters to an item's bounds: a whole string (skipped at once), a quote that
# opens one running past the block read, or a bracket or comma. Inside one: its end or an escape.
_STRUCTURE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|["{}\[\],]', re.S)
_IN_STRING = re.compile(rb'["\\]')


def array_items(handle: IO[bytes], limit: int | None) -> Iterator[bytes | None]:
    """The raw bytes of each item of the top-level JSON array the file holds (None for one over
    `limit`, whose bytes are dropped as they are read), by a scan that jumps from one string quote
    or bracket to the next: nothing is parsed here, and memory holds one item at most."""
    depth, in_string, escaped = 0, False, False
    item = bytearray()
    over = False
    started = False  # the item has a byte other than space
    while block := handle.read(_READ_BLOCK):
        at, taken = 0, 0
        while at < len(block):
            if escaped:
                escaped, at = False, at + 1
                continue
            found = (_IN_STRING if in_string else _STRUCTURE).search(block, at)
            if found is None:
                at = len(block)
                break
            char, at = found.group(), found.end()
            if in_string:
                if char == b"\\":
                    escaped = True
                else:
                    in_string = False
                continue
            if depth == 0:  # before the array: its own bracket, where items start
                if char != b"[":
                    raise BrokenArray(f"{char[:1].decode()} before the array's [")
                depth, taken = 1, at
            elif len(char) > 1:
                continue  # a whole string
            elif char == b'"':
                in_string = True
            elif char in (b"{", b"["):
                depth += 1
            elif char in (b"}", b"]") and depth > 1:
                depth -= 1
            elif depth == 1 and char in (b",", b"]"):  # the end of an item (and of the array, at "]")
                item, over, started = _add(item, block[taken : at - 1], limit, over, started)
                taken = at
                if started:
                    yield None if over else bytes(item)
                elif char == b",":
                    raise BrokenArray("an empty item")
                item, over, started = bytearray(), False, False
                if char == b"]":
                    depth = 0
                    return
            elif char != b",":  # (a comma inside an item is the item's)
                raise BrokenArray(f"an unmatched {char.decode()}")
        if depth >= 1:
            item, over, started = _add(item, block[taken:], limit, over, started)
    raise BrokenArray("the file ends before the array does")


def _add(item: bytearray, part: bytes, limit: int | None, over: bool, started: bool) -> tuple[bytearray, bool, bool]:
    started = started or bool(part.strip())
    if over:
        return item, over, started
    item += part
    if limit is not None and len(item) > limit:
        return bytearray(), True, started
    return item, over, started
