"""The gzip reader under the extractor: what GzipFile reads, its headers skipped in chunks."""

from __future__ import annotations

import gzip
import io
import itertools
import random
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.hostile_archives import gzip_member
from tests.support.memory import least_peak
from watcher.gunzip import GzipReader

MiB = 1024 * 1024
ONE = gzip_member(b"hello, world\n" * 100)


class Polled(Exception):
    """Raised by a test's poll."""


def read_all(data: bytes, size: int = 1000) -> bytes:
    reader = GzipReader(io.BytesIO(data))
    return b"".join(iter(lambda: reader.read(size), b""))


class TestGzipReader:
    def test_members_and_the_zero_padding_between_and_after_them(self) -> None:
        parts = [b"first " * 1000, b"", b"second", bytes(70_000), b"third"]
        data = b"".join(gzip_member(p) + bytes(i * 40_000) for i, p in enumerate(parts))
        assert read_all(data) == b"".join(parts) == gzip.decompress(data)
        assert read_all(data, size=1) == b"".join(parts)

    @pytest.mark.parametrize(
        "fields",
        [
            {"name": b"release.tar"},
            {"comment": b"built by CI"},
            {"extra": b"AP\x04\x00abcd"},
            {"header_crc": True},
            {"name": b"", "comment": b"", "extra": b"", "header_crc": True},
            {"name": b"n" * 100_000, "comment": b"c" * 100_000, "extra": b"e" * 65_535},
        ],
    )
    def test_optional_header_fields_are_skipped(self, fields: dict[str, object]) -> None:
        data = gzip_member(b"payload" * 50, **fields)  # type: ignore[arg-type]
        assert read_all(data) == b"payload" * 50 == gzip.decompress(data)

    def test_reads_are_full_and_seeks_go_forward_only(self) -> None:
        reader = GzipReader(io.BytesIO(gzip_member(b"0123456789" * 10_000)))
        assert reader.read(0) == b""
        assert reader.read(5) == b"01234"
        assert reader.seek(12) == 12
        assert reader.seek(3, 1) == 15
        assert reader.read(70_000) == (b"0123456789" * 7_002)[15:70_015]
        assert reader.tell() == 70_015
        with pytest.raises(OSError, match="only forward"):
            reader.seek(70_000)
        assert reader.seek(200_000) == 100_000  # where the data ends
        assert reader.read(10) == b""

    def test_a_huge_name_is_skipped_a_chunk_at_a_time_between_polls(self) -> None:
        raw = io.BytesIO(gzip_member(b"data", name=b"n" * 10 * MiB))
        seen: list[int] = []
        reader = GzipReader(raw, poll=lambda: seen.append(raw.tell()))
        assert reader.read(10) == b"data"
        assert seen[0] <= 64 * 1024
        assert len(seen) >= 10 * MiB // (64 * 1024)
        assert max(b - a for a, b in itertools.pairwise(seen)) <= 64 * 1024

    def test_a_poll_that_raises_stops_the_skip_of_a_huge_name(self) -> None:
        raw = io.BytesIO(gzip_member(b"data", name=b"n" * 10 * MiB))

        def cancel() -> None:
            raise Polled

        with pytest.raises(Polled):
            GzipReader(raw, poll=cancel).read(10)
        assert raw.tell() <= 64 * 1024

    def test_huge_padding_is_skipped_a_chunk_at_a_time_between_polls(self) -> None:
        raw = io.BytesIO(gzip_member(b"a") + bytes(20 * MiB) + gzip_member(b"b") + bytes(MiB))
        seen: list[int] = []
        reader = GzipReader(raw, poll=lambda: seen.append(raw.tell()))
        assert reader.read(10) == b"ab"
        assert reader.read(10) == b""
        assert len(seen) >= 21 * MiB // (64 * 1024)

    def test_a_bomb_is_inflated_no_further_than_asked(self) -> None:
        data = gzip.compress(bytes(256 * MiB), compresslevel=9)  # about 250 KB
        small, first = least_peak(lambda: GzipReader(io.BytesIO(data)).read(512))
        assert first == bytes(512)

        def first_then_more() -> int:
            reader = GzipReader(io.BytesIO(data))
            reader.read(512)
            return len(reader.read(MiB))

        large, more = least_peak(first_then_more)
        assert more == MiB
        assert small < MiB // 2, small
        assert large < 3 * MiB, large


def _truncated_in_second_member() -> bytes:
    second = gzip_member(b"second" * 1000)
    return ONE + second[: len(second) // 2]


def _with_byte(data: bytes, at: int, value: int) -> bytes:
    return data[:at] + bytes([value]) + data[at + 1 :]


class TestBrokenInput:
    @pytest.mark.parametrize(
        ("data", "error", "message"),
        [
            pytest.param(
                _with_byte(ONE, -8, ONE[-8] ^ 0xFF),
                gzip.BadGzipFile,
                "CRC check failed: gzip member 1's trailer says 0x",
                id="bad-crc",
            ),
            pytest.param(
                _with_byte(ONE, -4, ONE[-4] ^ 0x01),
                gzip.BadGzipFile,
                "Incorrect length of data produced: gzip member 1's trailer says 1301 bytes "
                "(mod 2**32), its data has 1300",
                id="bad-isize",
            ),
            pytest.param(
                ONE[:-3],
                EOFError,
                "end-of-stream marker was reached: the file ends at byte "
                f"{len(ONE) - 3}, in gzip member 1's trailer",
                id="truncated-trailer",
            ),
            pytest.param(
                ONE[:20],
                EOFError,
                "the file ends at byte 20, in gzip member 1's compressed data",
                id="truncated-data",
            ),
            pytest.param(
                _truncated_in_second_member(),
                EOFError,
                "in gzip member 2's compressed data",
                id="truncated-second-member",
            ),
            pytest.param(ONE[:7], EOFError, "in gzip member 1's header", id="truncated-header"),
            pytest.param(
                gzip_member(b"x", name=b"n" * 200_000)[:150_000],
                EOFError,
                "the file ends at byte 150000, in gzip member 1's header file name",
                id="truncated-name",
            ),
            pytest.param(
                gzip_member(b"x", extra=b"e" * 1000)[:500],
                EOFError,
                "in gzip member 1's header extra field",
                id="truncated-extra",
            ),
            *(
                pytest.param(
                    gzip_member(b"x", flags=bit),
                    gzip.BadGzipFile,
                    f"reserved flag bits set (flags 0x{bit:02x}) in the header of gzip member 1",
                    id=f"reserved-flag-0x{bit:02x}",
                )
                for bit in (0x20, 0x40, 0x80)
            ),
            pytest.param(
                _with_byte(ONE, 2, 7),
                gzip.BadGzipFile,
                "Unknown compression method 7 in the header of gzip member 1 at byte 0",
                id="not-deflate",
            ),
            pytest.param(
                ONE + bytes(1000) + b"garbage",
                gzip.BadGzipFile,
                f"Not a gzipped file (b'ga' at byte {len(ONE) + 1000}, after gzip member 1)",
                id="trailing-garbage",
            ),
            pytest.param(
                ONE + b"\x1f", gzip.BadGzipFile, "Not a gzipped file (b'\\x1f'", id="one-byte"
            ),
            pytest.param(
                b"PK\x03\x04", gzip.BadGzipFile, "Not a gzipped file (b'PK' at byte 0)", id="zip"
            ),
            pytest.param(
                ONE[:10] + b"\xff" * 100, zlib.error, "invalid block type", id="corrupt-deflate"
            ),
        ],
    )
    def test_refused_with_gzip_files_error_saying_where(
        self, data: bytes, error: type[Exception], message: str
    ) -> None:
        with pytest.raises(error) as caught:
            read_all(data)
        assert message in str(caught.value)
        if "reserved" not in message:  # GzipFile reads on past them
            with pytest.raises(error):
                gzip.GzipFile(fileobj=io.BytesIO(data)).read()

    def test_an_empty_file_has_no_data(self) -> None:
        assert read_all(b"") == b""

    def test_a_file_of_zeros_is_not_gzip(self) -> None:
        with pytest.raises(gzip.BadGzipFile, match=r"Not a gzipped file \(b'\\x00\\x00' at byte 0"):
            read_all(bytes(100))


def _data(kind: str, size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    if kind == "zeros":
        return bytes(size)
    if kind == "random":
        return rng.randbytes(size)
    return b" ".join(rng.choice([b"def", b"return", b"self", b"x = 1\n"]) for _ in range(size))[
        :size
    ]


_TEXT = st.none() | st.binary(max_size=300).map(lambda b: b.replace(b"\0", b"x"))
#: One member: its data (a kind, a size, a seed), its header's fields, its level, the zero
#: bytes after it.
_MEMBERS = st.lists(
    st.tuples(
        st.sampled_from(["zeros", "random", "text"]),
        st.integers(0, 3) | st.integers(0, 100_000),
        st.integers(0, 2**32),
        st.fixed_dictionaries(
            {
                "name": _TEXT,
                "comment": _TEXT,
                "extra": st.none() | st.binary(max_size=300),
                "header_crc": st.booleans(),
                "level": st.integers(0, 9),
            }
        ),
        st.integers(0, 3) | st.integers(0, 200_000),
    ),
    min_size=1,
    max_size=4,
)
_READ_SIZES = st.lists(
    st.sampled_from([1, 511, 512, 65_536, 1 << 20]) | st.integers(1, 100_000),
    min_size=1,
    max_size=8,
)


class TestSameAsTheStandardLibrary:
    @settings(max_examples=200, deadline=None)
    @given(_MEMBERS, _READ_SIZES)
    def test_reads_what_gzip_decompress_reads(
        self, members: list[tuple[str, int, int, dict[str, Any], int]], sizes: list[int]
    ) -> None:
        data = b"".join(
            gzip_member(_data(kind, size, seed), **fields) + bytes(padding)
            for kind, size, seed, fields, padding in members
        )
        reader = GzipReader(io.BytesIO(data))
        got = []
        while piece := reader.read(sizes[len(got) % len(sizes)]):
            got.append(piece)
        assert b"".join(got) == gzip.decompress(data)
        assert reader.tell() == sum(map(len, got))
