"""The data of a gzip file (RFC 1952) read forward, its headers and padding skipped in chunks."""

from __future__ import annotations

import errno
import gzip
import os
import struct
import zlib
from collections.abc import Callable
from typing import IO

__all__ = ["GzipReader"]

_RAW_CHUNK = 64 * 1024  # bytes read from the file at a time
_BLOCK = 64 * 1024  # fewest bytes inflated at a time: tarfile reads a 512-byte header at once
_SKIP_CHUNK = 1024 * 1024  # bytes inflated at a time when seeking forward
_MAGIC = b"\x1f\x8b"
_DEFLATE = 8
_FHCRC, _FEXTRA, _FNAME, _FCOMMENT = 0x02, 0x04, 0x08, 0x10
_FRESERVED = 0xE0
_TRUNCATED = "Compressed file ended before the end-of-stream marker was reached"


class GzipReader:
    """The members of a gzip file inflated one after the other, like ``gzip.GzipFile``
    reads them, with the errors it raises (``gzip.BadGzipFile``, ``EOFError`` when the file
    is cut short, ``zlib.error``), a header's reserved flag bits refused as well.

    ``GzipFile`` reads a header's name and comment, and the zero bytes between members, one
    byte at a time, before it returns any data (a 10 MB name took 1.1 s, 20 MB of padding
    2.5 s, no cancel seen meanwhile). Here each is found in 64 KiB chunks, and ``poll`` is
    called after every chunk read from the file: the extractor's cancel and progress check.
    The header CRC (FHCRC) is skipped unchecked, as ``GzipFile`` does.
    """

    def __init__(self, raw: IO[bytes], poll: Callable[[], None] | None = None) -> None:
        self.poll = poll
        self._raw = raw
        self._consumed = 0  # bytes read from ``raw``
        self._input = b""  # read from ``raw``, not yet parsed or inflated
        self._inflater: zlib._Decompress | None = None  # of the member being read
        self._members = 0  # started so far
        self._crc = 0  # of the member being read, and its length so far
        self._size = 0
        self._block = b""  # inflated, not yet returned from ``_offset`` on
        self._offset = 0
        self._pos = 0

    def read(self, size: int = -1, /) -> bytes:
        """``size`` bytes (all that are left when negative); fewer only at the end."""
        if size < 0:
            return b"".join(iter(lambda: self.read(_SKIP_CHUNK), b""))
        parts = []
        while size > 0:
            if self._offset == len(self._block):
                self._block, self._offset = self._inflate(max(size, _BLOCK)), 0
                if not self._block:
                    break
            part = self._block[self._offset : self._offset + size]
            self._offset += len(part)
            size -= len(part)
            parts.append(part)
        data = b"".join(parts)
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET, /) -> int:
        """Skip forward to ``offset`` by reading; the position reached (short at the end)."""
        if whence == os.SEEK_CUR:
            offset += self._pos
        if whence not in (os.SEEK_SET, os.SEEK_CUR) or offset < self._pos:
            raise OSError(
                errno.ESPIPE, f"gzip stream seeks only forward (to {offset} from {self._pos})"
            )
        while self._pos < offset and self.read(min(offset - self._pos, _SKIP_CHUNK)):
            pass
        return self._pos

    def tell(self) -> int:
        return self._pos

    def _inflate(self, size: int) -> bytes:
        """At most ``size`` bytes of data; b"" at the end. A member's trailer is checked when
        data past it is asked for (as ``GzipFile`` does: a refusal comes at the same place)."""
        while True:
            if self._inflater is not None and self._inflater.eof:
                self._end_member()
            inflater = self._inflater or self._start_member()
            if inflater is None:
                return b""
            ended = not self._input and not self._more()
            data = inflater.decompress(self._input, size)
            self._crc = zlib.crc32(data, self._crc)
            self._size += len(data)
            if inflater.eof:
                self._input = inflater.unused_data
            else:
                self._input = inflater.unconsumed_tail
                if ended and not data:
                    raise EOFError(self._truncated("compressed data"))
            if data:
                return data

    def _start_member(self) -> zlib._Decompress | None:
        """Parse the next member's header; None at the end of the file.

        Zero bytes after a member are skipped (padding some writers add); an empty file has
        no member, as for ``GzipFile``.
        """
        if not (self._skip_padding() if self._members else self._fill(1)):
            return None
        start = self._consumed - len(self._input)
        self._fill(2)
        if self._input[:2] != _MAGIC:
            after = f", after gzip member {self._members}" if self._members else ""
            raise gzip.BadGzipFile(
                f"Not a gzipped file ({self._input[:2]!r} at byte {start}{after})"
            )
        self._members += 1
        header = self._take(10, "header")
        method, flags = header[2], header[3]
        if method != _DEFLATE:
            raise gzip.BadGzipFile(
                f"Unknown compression method {method} in the header of gzip member "
                f"{self._members} at byte {start} (gzip's is 8, deflate)"
            )
        if flags & _FRESERVED:
            raise gzip.BadGzipFile(
                f"reserved flag bits set (flags 0x{flags:02x}) in the header of gzip member "
                f"{self._members} at byte {start}"
            )
        if flags & _FEXTRA:
            (length,) = struct.unpack("<H", self._take(2, "header extra field"))
            self._take(length, "header extra field")
        if flags & _FNAME:
            self._skip_field("header file name")
        if flags & _FCOMMENT:
            self._skip_field("header comment")
        if flags & _FHCRC:
            self._take(2, "header CRC")
        self._crc = self._size = 0
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        return self._inflater

    def _end_member(self) -> None:
        """Check the member's trailer: CRC-32 and length (mod 2**32) of its data."""
        crc, isize = struct.unpack("<II", self._take(8, "trailer"))
        if crc != self._crc:
            raise gzip.BadGzipFile(
                f"CRC check failed: gzip member {self._members}'s trailer says 0x{crc:08x}, "
                f"its data has 0x{self._crc:08x}"
            )
        if isize != self._size & 0xFFFFFFFF:
            raise gzip.BadGzipFile(
                f"Incorrect length of data produced: gzip member {self._members}'s trailer says "
                f"{isize} bytes (mod 2**32), its data has {self._size}"
            )
        self._inflater = None

    # -- the file, a chunk at a time ------------------------------------------------------

    def _more(self) -> bool:
        """Add the next chunk of the file to ``_input``; False at the end of the file."""
        chunk = self._raw.read(_RAW_CHUNK)
        self._consumed += len(chunk)
        if self.poll is not None:
            self.poll()
        self._input += chunk
        return bool(chunk)

    def _fill(self, n: int) -> bool:
        """At least ``n`` bytes in ``_input``; False when the file ends before."""
        while len(self._input) < n:
            if not self._more():
                return False
        return True

    def _take(self, n: int, what: str) -> bytes:
        if not self._fill(n):
            raise EOFError(self._truncated(what))
        data, self._input = self._input[:n], self._input[n:]
        return data

    def _skip_field(self, what: str) -> None:
        """Skip a zero-terminated header field, however long, holding one chunk of it."""
        while (end := self._input.find(0)) < 0:
            self._input = b""
            if not self._more():
                raise EOFError(self._truncated(what))
        self._input = self._input[end + 1 :]

    def _skip_padding(self) -> bool:
        """Skip the zero bytes after a member; False when the file ends with them."""
        while not (rest := self._input.lstrip(b"\0")):
            self._input = b""
            if not self._more():
                return False
        self._input = rest
        return True

    def _truncated(self, what: str) -> str:
        where = f"gzip member {self._members}'s {what}"
        return f"{_TRUNCATED}: the file ends at byte {self._consumed}, in {where}"
