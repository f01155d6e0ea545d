"""Image files for the input-safety tests. Not a test module (no test_ prefix)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path


def png_header_bytes(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header claims width x height RGB pixels but holds almost no pixel data:
    the shape of a decompression bomb (width * height * 3 bytes once decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_png_header(path: Path, width: int, height: int) -> Path:
    """`png_header_bytes` written to `path`; returns `path`."""
    path.write_bytes(png_header_bytes(width, height))
    return path
