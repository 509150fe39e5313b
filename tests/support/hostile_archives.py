"""A corpus of hostile and broken tar.gz archives, built in memory, for the extraction tests."""

from __future__ import annotations

import gzip
import io
import os
import random
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from watcher.archive import MAX_PATH_DEPTH

#: Limits the corpus is meant to be extracted with: the bombs are sized just over them, so the
#: tests stay fast while the same code path refuses a real multi-gigabyte bomb.
CORPUS_MAX_MEMBERS = 100
CORPUS_MAX_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Entry:
    """One member to put in a test archive."""

    name: str
    kind: str = "file"  # file | dir | symlink | hardlink | chr | blk | fifo | raw
    data: bytes = b""
    mode: int | None = None  # default: 0o755 for a directory, 0o644 otherwise
    target: str = ""  # symlink / hardlink target
    size: int | None = None  # header size, when it should lie about ``data``
    mtime: int = 1_700_000_000


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def make_tar(entries: list[Entry], *, end_marker: bool = True) -> bytes:
    """An uncompressed tar (GNU format) of ``entries``, written header by header.

    Headers are written by hand (``TarInfo.tobuf``) so that they can lie about sizes and keep
    names tarfile's own writer would clean up (absolute paths, ``..``).
    """
    out = io.BytesIO()
    for e in entries:
        info = tarfile.TarInfo(e.name)
        info.type = _TYPES[e.kind]
        info.mode = e.mode if e.mode is not None else (0o755 if e.kind == "dir" else 0o644)
        info.mtime = e.mtime
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.linkname = e.target
        if e.kind in ("chr", "blk"):
            info.devmajor, info.devminor = 1, 3
        info.size = len(e.data) if e.size is None else e.size
        out.write(info.tobuf(format=tarfile.GNU_FORMAT))
        if e.data:
            out.write(e.data)
            pad = -len(e.data) % tarfile.BLOCKSIZE
            out.write(b"\0" * pad)
    if end_marker:
        out.write(b"\0" * (2 * tarfile.BLOCKSIZE))
    return out.getvalue()


def make_tar_gz(entries: list[Entry], *, end_marker: bool = True) -> bytes:
    """``make_tar`` compressed with gzip (fixed mtime, so the bytes are reproducible)."""
    return gzip_bytes(make_tar(entries, end_marker=end_marker))


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


def gzip_member(
    data: bytes,
    *,
    name: bytes | None = None,
    comment: bytes | None = None,
    extra: bytes | None = None,
    header_crc: bool = False,
    flags: int = 0,
    level: int = 6,
) -> bytes:
    """One gzip member of ``data`` whose header, written by hand, has the optional fields
    given (RFC 1952: FEXTRA, FNAME, FCOMMENT, FHCRC) and the other ``flags`` bits."""
    plain = gzip.compress(data, compresslevel=level, mtime=0)
    assert plain[3] == 0  # 10 bytes of header, no optional field
    fields = b""
    if extra is not None:
        flags |= 0x04
        fields += struct.pack("<H", len(extra)) + extra
    if name is not None:
        flags |= 0x08
        fields += name + b"\0"
    if comment is not None:
        flags |= 0x10
        fields += comment + b"\0"
    if header_crc:
        flags |= 0x02
    header = plain[:3] + bytes([flags]) + plain[4:10] + fields
    if header_crc:
        header += struct.pack("<H", zlib.crc32(header) & 0xFFFF)
    return header + plain[10:]


def _gnu_longname_bomb(size: int) -> bytes:
    """A GNU long-name header announcing ``size`` bytes of name: tarfile would read it whole."""
    info = tarfile.TarInfo("././@LongLink")
    info.type = tarfile.GNUTYPE_LONGNAME
    info.size = size
    body = info.tobuf(format=tarfile.USTAR_FORMAT) + b"\0" * size
    return gzip_bytes(body + make_tar([Entry("x", data=b"x")]))


def _chained_headers(kind: str, count: int) -> bytes:
    """``count`` GNU long-name (``kind="gnu"``) or pax (``"pax"``) headers in a row, then one
    member: each header applies to the next one, which tarfile reads recursively."""
    if kind == "gnu":
        info = tarfile.TarInfo("././@LongLink")
        info.type = tarfile.GNUTYPE_LONGNAME
        body = b"name\0"
    else:
        info = tarfile.TarInfo("././@PaxHeader")
        info.type = tarfile.XHDTYPE
        body = b"13 path=name\n"  # a pax record's length counts its own digits
    info.size = len(body)
    block = info.tobuf(format=tarfile.USTAR_FORMAT) + body.ljust(tarfile.BLOCKSIZE, b"\0")
    return gzip_bytes(block * count + make_tar([Entry("x", data=b"x")]))


def deep_path(depth: int) -> str:
    """A relative path of ``depth`` one-letter components: ``d/d/.../d``."""
    return "/".join(["d"] * depth)


def _negative_long_name() -> bytes:
    """A GNU long-name header whose size is -1024 (base-256)."""
    info = tarfile.TarInfo("././@LongLink")
    info.type = tarfile.GNUTYPE_LONGNAME
    info.size = -1024
    return info.tobuf(format=tarfile.GNU_FORMAT)


def _zip_file() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("app/main.py", "print('hi')\n")
    return out.getvalue()


def _bad_crc() -> bytes:
    good = bytearray(make_tar_gz([Entry("a.txt", data=b"hello\n")]))
    good[-8] ^= 0xFF  # the gzip trailer: CRC32, then ISIZE
    return bytes(good)


def _bad_length() -> bytes:
    good = bytearray(make_tar_gz([Entry("a.txt", data=b"hello\n")]))
    good[-1] ^= 0x01  # the trailer's ISIZE, little-endian: its top byte
    return bytes(good)


def _lying_short_header() -> bytes:
    """The header says 10 bytes, 2048 follow: the rest is read as a (corrupt) header."""
    return make_tar_gz([Entry("liar", data=b"A" * 2048, size=10), Entry("after", data=b"x")])


def _noise(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def hostile_archives() -> list[tuple[str, bytes, str]]:
    """(name, tar.gz bytes, fragment the ArchiveRefused message must contain) for each case.

    Extract each with ``max_members=CORPUS_MAX_MEMBERS`` and ``max_bytes=CORPUS_MAX_BYTES``.
    Paths that escape aim at ``<tmp>/outside`` when extracted into
    ``<tmp>/root/app/.tmp-stage-x`` (three levels up), so a test can check nothing landed there.
    """
    out3 = "../../../outside"
    good_tar = make_tar([Entry("dir", kind="dir"), Entry("dir/a.txt", data=b"a" * 3000)])
    return [
        ("traversal_dotdot", make_tar_gz([Entry(f"{out3}/pwned", data=b"x")]), "'..' component"),
        (
            "traversal_nested",
            make_tar_gz([Entry("a/../../../../outside/pwned", data=b"x")]),
            "'..' component",
        ),
        ("absolute_path", make_tar_gz([Entry("/etc/passwd", data=b"x")]), "absolute path"),
        (
            "symlink_escape_relative",
            make_tar_gz([Entry("link", kind="symlink", target=out3)]),
            f"symlink 'link' -> '{out3}' leaves the release",
        ),
        (
            "symlink_escape_absolute",
            make_tar_gz([Entry("link", kind="symlink", target="/etc")]),
            "symlink 'link' -> '/etc' is absolute",
        ),
        (
            "symlink_then_write_through_absolute",
            make_tar_gz(
                [
                    Entry("link", kind="symlink", target="/tmp"),
                    Entry("link/evil", data=b"x"),
                ]
            ),
            "symlink 'link' -> '/tmp' is absolute",
        ),
        (
            "write_through_internal_symlink",
            make_tar_gz(
                [
                    Entry("sub", kind="dir"),
                    Entry("inner", kind="symlink", target="sub"),
                    Entry("inner/evil", data=b"x"),
                ]
            ),
            "'inner/evil' goes through symlink 'inner'",
        ),
        (
            "symlink_escape_through_other_symlink",
            make_tar_gz(
                [
                    Entry("d", kind="dir"),
                    Entry("d/up", kind="symlink", target=".."),
                    Entry("e", kind="symlink", target="d/up/../../outside"),
                ]
            ),
            "leaves the release through other symlinks",
        ),
        (
            "symlink_dotdot_after_missing",
            make_tar_gz([Entry("x", kind="symlink", target="missing/..")]),
            "uses '..' after 'missing'",
        ),
        (
            "symlink_loop",
            make_tar_gz(
                [
                    Entry("a", kind="symlink", target="b"),
                    Entry("b", kind="symlink", target="a"),
                ]
            ),
            "loops",
        ),
        (
            "hardlink_escape_relative",
            make_tar_gz([Entry("h", kind="hardlink", target=f"{out3}/secret")]),
            "hardlink 'h' -> '../../../outside/secret' has a '..' component",
        ),
        (
            "hardlink_escape_absolute",
            make_tar_gz([Entry("h", kind="hardlink", target="/etc/passwd")]),
            "hardlink 'h' -> '/etc/passwd' is absolute",
        ),
        (
            "hardlink_to_unknown_member",
            make_tar_gz([Entry("h", kind="hardlink", target="nowhere")]),
            "not an earlier regular file",
        ),
        (
            "hardlink_to_symlink",
            make_tar_gz(
                [
                    Entry("f", data=b"x"),
                    Entry("s", kind="symlink", target="f"),
                    Entry("h", kind="hardlink", target="s"),
                ]
            ),
            "not an earlier regular file",
        ),
        ("char_device", make_tar_gz([Entry("dev/null", kind="chr")]), "is a device file"),
        ("block_device", make_tar_gz([Entry("dev/sda", kind="blk")]), "is a device file"),
        ("fifo", make_tar_gz([Entry("pipe", kind="fifo")]), "is a FIFO"),
        (
            "setuid_file",
            make_tar_gz([Entry("bin/su", data=b"#!/bin/sh\n", mode=0o4755)]),
            "'bin/su' has setuid/setgid/sticky bits",
        ),
        (
            "setgid_file",
            make_tar_gz([Entry("bin/sg", data=b"#!/bin/sh\n", mode=0o2755)]),
            "setuid/setgid/sticky",
        ),
        (
            "bomb_member_count",
            make_tar_gz([Entry(f"f{i}") for i in range(CORPUS_MAX_MEMBERS + 1)]),
            f"more than {CORPUS_MAX_MEMBERS} members",
        ),
        (
            "bomb_bytes_one_member",  # 16 MiB of zeros: about 16 KiB of gzip
            make_tar_gz([Entry("zeros", data=bytes(16 * CORPUS_MAX_BYTES))]),
            f"declares more than {CORPUS_MAX_BYTES} bytes",
        ),
        (
            "bomb_bytes_many_members",
            make_tar_gz([Entry(f"z{i}", data=bytes(64 * 1024)) for i in range(20)]),
            f"declares more than {CORPUS_MAX_BYTES} bytes",
        ),
        (
            "bomb_long_name_header",
            _gnu_longname_bomb(24 * 1024 * 1024),
            "header read",
        ),
        ("header_lies_size_short", _lying_short_header(), "corrupt tar header"),
        (
            "negative_member_size",  # base-256 -1024: tarfile would seek back to the next header
            make_tar_gz([Entry("neg", size=-1024), Entry("after", data=b"x")]),
            "member 'neg' declares a negative size (-1024)",
        ),
        (
            "negative_long_name_size",
            gzip_bytes(_negative_long_name() + make_tar([Entry("x", data=b"x")])),
            "a header declares a negative size",
        ),
        (
            "chained_gnu_long_name_headers",  # about 12 KB of gzip
            _chained_headers("gnu", 3000),
            "its headers nest too deep",
        ),
        ("chained_pax_headers", _chained_headers("pax", 3000), "its headers nest too deep"),
        (
            "deep_directory_tree",  # 2000 levels from two directory members
            make_tar_gz([Entry(deep_path(1000), kind="dir"), Entry(deep_path(2000), kind="dir")]),
            f"is 1000 path components deep (limit {MAX_PATH_DEPTH} components)",
        ),
        (
            "deep_symlink_target",
            make_tar_gz([Entry("link", kind="symlink", target=deep_path(MAX_PATH_DEPTH + 1))]),
            f"symlink 'link' -> {deep_path(MAX_PATH_DEPTH + 1)[:120]!r}... has "
            f"{MAX_PATH_DEPTH + 1} path components (limit {MAX_PATH_DEPTH} components)",
        ),
        (
            "header_lies_size_long",
            make_tar_gz([Entry("liar", data=b"A" * 100, size=100_000)], end_marker=False),
            "truncated",
        ),
        (
            "truncated_gzip",
            make_tar_gz([Entry("a.bin", data=_noise(50_000, 1))])[:20_000],
            "Compressed file ended before the end-of-stream marker",
        ),
        (
            "truncated_tar_mid_data",
            gzip_bytes(good_tar[: tarfile.BLOCKSIZE * 2 + 1000]),
            "truncated",
        ),
        (
            "truncated_tar_on_member_boundary",
            make_tar_gz([Entry("a.txt", data=b"a")], end_marker=False),
            "no end-of-archive marker",
        ),
        ("gzip_crc_mismatch", _bad_crc(), "CRC check failed"),
        ("gzip_length_mismatch", _bad_length(), "Incorrect length of data produced"),
        (
            "gzip_reserved_flag_bits",  # RFC 1952: a decompressor must refuse them
            gzip_member(make_tar([Entry("a.txt", data=b"hello\n")]), flags=0x20),
            "reserved flag bits set (flags 0x20) in the header of gzip member 1",
        ),
        (
            "gzip_second_member_truncated",
            gzip_bytes(good_tar[:1024]) + gzip_bytes(good_tar[1024:])[:-12],
            "Compressed file ended before the end-of-stream marker",
        ),
        (
            "gzip_trailing_garbage",
            gzip_bytes(good_tar) + b"\0" * 100 + b"garbage",
            "Not a gzipped file",
        ),
        (
            "members_hidden_after_end_marker",
            gzip_bytes(make_tar([Entry("a", data=b"1")]) + make_tar([Entry("b", data=b"2")])),
            "corrupt tar header or trailing data",
        ),
        (
            "bomb_padding_after_end_marker",  # 24 MiB of zeros after the end: ~24 KiB of gzip
            gzip_bytes(make_tar([Entry("a", data=b"1")]) + bytes(24 * 1024 * 1024)),
            "archive inflates past",
        ),
        ("random_bytes", _noise(4096, 2), "Not a gzipped file"),
        ("zip_file", _zip_file(), "is a zip file (only tar.gz, tgz, tar are accepted)"),
        ("gzip_of_garbage", gzip_bytes(_noise(4096, 3)), "not a valid tar.gz archive"),
        ("empty_file", b"", "empty file"),
        ("empty_tar", gzip_bytes(bytes(2 * tarfile.BLOCKSIZE)), "no members"),
        (
            "reserved_release_json",
            make_tar_gz(
                [Entry(".watcher", kind="dir"), Entry(".watcher/release.json", data=b"{}")]
            ),
            "'.watcher/release.json' is reserved",
        ),
        (
            "watcher_dir_is_a_symlink",
            make_tar_gz([Entry(".watcher", kind="symlink", target="elsewhere")]),
            "'.watcher' must be a directory",
        ),
        (
            "file_replaces_directory",
            make_tar_gz([Entry("a", kind="dir"), Entry("a/x", data=b"1"), Entry("a", data=b"2")]),
            "'a' would replace an earlier directory",
        ),
        (
            "directory_replaces_file",
            make_tar_gz([Entry("a", data=b"1"), Entry("a", kind="dir")]),
            "'a' (directory) would replace an earlier file",
        ),
        (
            "duplicate_file",
            make_tar_gz([Entry("a", data=b"1"), Entry("a", data=b"2")]),
            "duplicate of an earlier file",
        ),
        (
            "path_through_file",
            make_tar_gz([Entry("a", data=b"1"), Entry("a/b", data=b"2")]),
            "'a/b' goes through file 'a'",
        ),
    ]


def write_zeros_bomb(
    path: str | os.PathLike[str], size: int, *, name: str = "zeros", level: int = 9
) -> int:
    """Write a tar.gz holding one member of ``size`` zero bytes to ``path``, streamed.

    Never holds the member in memory. At ``level`` 9 a 1 GiB member costs about 1 MiB on
    disk (1000:1) and 8 s of CPU; level 1 is twice as fast at about 230:1. Returns the size
    of the file written.
    """
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 1_700_000_000
    zeros = bytes(1024 * 1024)
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=level, mtime=0) as gz,
    ):
        gz.write(info.tobuf(format=tarfile.GNU_FORMAT))
        left = size
        while left > 0:
            n = min(left, len(zeros))
            gz.write(zeros[:n] if n < len(zeros) else zeros)
            left -= n
        gz.write(b"\0" * (-size % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE))
    return Path(path).stat().st_size


def random_files_tar_gz(sizes: list[int], *, seed: int = 11) -> bytes:
    """A tar.gz of incompressible files ``f0.bin``, ``f1.bin`` ... of the given sizes."""
    rng = random.Random(seed)
    return make_tar_gz([Entry(f"f{i}.bin", data=rng.randbytes(n)) for i, n in enumerate(sizes)])
