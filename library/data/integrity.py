"""A cheap "is this file complete?" test: each format's end marker or stored size, read from a few bytes.

A truncated download or an interrupted copy keeps a valid header, so a header scan passes it and the
decode in a DataLoader worker fails hours later. A complete file ends with its format's end marker
(JPEG EOI ``FF D9``, PNG ``IEND`` chunk) or is at least as long as its header says (WebP RIFF size,
BMP file size). Only the head and the last ``TAIL_BYTES`` are read, so 100,000 files take well under
a second.

``False`` means "suspect", not "broken": a file with data appended after its end marker (camera
trailers, motion photos) also fails it, so the caller decodes suspects to decide.
"""
from __future__ import annotations

from typing import BinaryIO

# end markers are searched this far from the end: trailing padding and small trailers pass
TAIL_BYTES = 4096
_JPEG_EOI = b"\xff\xd9"
_PNG_IEND = b"IEND\xaeB`\x82"  # chunk type and its fixed CRC


def _file_size(f: BinaryIO) -> int:
    return f.seek(0, 2)


def _tail(f: BinaryIO, size: int) -> bytes:
    f.seek(max(0, size - TAIL_BYTES))
    return f.read(TAIL_BYTES)


def _head(f: BinaryIO, count: int) -> bytes:
    f.seek(0)
    return f.read(count)


def _riff_complete(f: BinaryIO, size: int) -> bool:
    head = _head(f, 12)
    # RIFF size counts the bytes after its own 8-byte header; a pad byte past it is allowed
    return len(head) == 12 and size >= int.from_bytes(head[4:8], "little") + 8


def _bmp_complete(f: BinaryIO, size: int) -> bool:
    stored = int.from_bytes(_head(f, 6)[2:6], "little")
    return stored == 0 or size >= stored  # some writers leave the size field 0


def looks_complete(image_format: str | None, f: BinaryIO) -> bool:
    """Whether the open image file ``f`` (format as Pillow names it) ends where its format says it does.

    Formats without a cheap check (AVIF, JPEG XL, ...) count as complete. Moves the file position.
    """
    size = _file_size(f)
    if image_format in ("JPEG", "MPO"):
        return _JPEG_EOI in _tail(f, size)
    if image_format == "PNG":
        return _PNG_IEND in _tail(f, size)
    if image_format == "WEBP":
        return _riff_complete(f, size)
    if image_format == "BMP":
        return _bmp_complete(f, size)
    return True
