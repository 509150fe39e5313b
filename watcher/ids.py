"""The rules for ids and names that become KV keys, paths and event payloads (DESIGN.md 3).

One checker per kind of name. Each raises ``InvalidName`` (a ``PayloadError``) whose message
says what was wrong, shows the value safely (escaped, shortened) and states the rule, so a
CLI can print it as is and a library caller can never build a key from a bad id.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from datetime import datetime

from watcher.errors import PayloadError, WatcherError

ARTIFACT_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
DEPLOY_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
RELEASE_PATTERN = r"[0-9]{8}T[0-9]{6}Z-" + ARTIFACT_ID_PATTERN  # ASCII: \d takes any digit
COMMIT_LENGTHS = (40, 64)  # SHA-1 and SHA-256 object names
# A release name whose time exists (``check_release_input``), as a regular expression for
# descriptions (the web API's OpenAPI: a client generated from it must not send a name the
# server refuses as "not a date and time"). Years 0001-9999, Gregorian leap years.
_YEAR = r"(?:[0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)"
_LEAP = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DAY = (
    r"(?:(?:0[13578]|1[02])(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)(?:0[1-9]|[12][0-9]|30)"
    r"|02(?:0[1-9]|1[0-9]|2[0-8]))"
)
RELEASE_INPUT_PATTERN = (
    rf"(?:{_YEAR}{_DAY}|{_LEAP}0229)T(?:[01][0-9]|2[0-3])[0-5][0-9][0-5][0-9]Z-"
    + ARTIFACT_ID_PATTERN
)

ARTIFACT_ID_RULE = (
    "1 to 128 characters, letters, digits, '.', '_' or '-', starting with a letter or "
    "digit, e.g. master-15eb13af"
)
DEPLOY_ID_RULE = (
    "1 to 64 characters, letters, digits, '.', '_' or '-', starting with a letter or "
    "digit, e.g. 20261126T143844Z-3f9a1c"
)
RELEASE_RULE = (
    "<YYYYmmddTHHMMSSZ>-<artifact id>, e.g. 20261126T143844Z-master-15eb13af "
    "(see `watcherctl history APP` or `watcherctl releases APP`)"
)
COMMIT_RULE = "40 hex digits, or 64 in a SHA-256 repository"

_SHOWN = 48  # characters of a bad value shown in a message


class InvalidName(PayloadError):
    """An id or name that breaks its rule; the message states the rule. ``detail``: what
    is wrong when the value looks right at a glance (a time that does not exist)."""

    detail = ""


def shown(value: object) -> str:
    """``value`` safe for a one-line message: escaped (newlines, NUL, undecodable bytes
    from argv) and cut after a few dozen characters, with its length."""
    if not isinstance(value, str):
        return f"of type {type(value).__name__}"
    if value == "":
        return "'' (empty)"
    if len(value) > _SHOWN:
        return f"{value[:_SHOWN]!r}... ({len(value)} characters)"
    return repr(value)


# Compiled once: every key of a deploy is built through a check (one key per expected host
# in each txn, a few hundred checks a deploy at 100 hosts).
_ARTIFACT_ID = re.compile(ARTIFACT_ID_PATTERN)
_DEPLOY_ID = re.compile(DEPLOY_ID_PATTERN)
_RELEASE = re.compile(RELEASE_PATTERN)


def _check(value: object, pattern: re.Pattern[str], what: str, rule: str) -> str:
    if isinstance(value, str) and pattern.fullmatch(value):
        return value
    raise InvalidName(f"invalid {what} {shown(value)}: must be {rule}")


def check_artifact_id(value: object) -> str:
    return _check(value, _ARTIFACT_ID, "artifact id", ARTIFACT_ID_RULE)


def check_deploy_id(value: object) -> str:
    return _check(value, _DEPLOY_ID, "deploy id", DEPLOY_ID_RULE)


def check_release_name(value: object) -> str:
    return _check(value, _RELEASE, "release name", RELEASE_RULE)


def check_release_input(value: object) -> str:
    """A release name typed by an operator (``--to``, ``--release``, the API's rollback):
    ``check_release_name``, and its time must be one that exists, since no deploy can have
    named a release after 2026-13-45 (records from KV get the pattern check only: it is
    cheaper, and a host that names an impossible release is refused elsewhere)."""
    name = check_release_name(value)
    stamp = name[:16]
    try:
        datetime.strptime(stamp, "%Y%m%dT%H%M%SZ")
    except ValueError:
        detail = f"{stamp} is not a date and time (YYYYmmddTHHMMSSZ, UTC)"
        error = InvalidName(
            f"invalid release name {shown(value)}: {detail}; must be {RELEASE_RULE}"
        )
        error.detail = detail
        raise error from None
    return name


def artifact_of_release(value: object) -> str | None:
    """The artifact id a release name ends with (``<YYYYmmddTHHMMSSZ>-<artifact id>``, as
    ``check_release_input`` takes one), or None when ``value`` is no release name."""
    try:
        name = check_release_input(value)
    except InvalidName:
        return None
    return name[len("YYYYmmddTHHMMSSZ-") :]


def release_name_slip(given: str, artifact_record: Callable[[str], object]) -> str:
    """What to add to "unknown artifact GIVEN" when GIVEN is a release name (pasted from
    `history` or `releases` where an artifact id goes) whose artifact ``artifact_record``
    finds (not None); "" otherwise, and when it cannot tell (the hint is a courtesy: the
    error it adds to stays the one to report)."""
    artifact = artifact_of_release(given)
    if artifact is None:
        return ""
    try:
        if artifact_record(artifact) is None:
            return ""
    except WatcherError:
        return ""
    return f"that is a release name; its artifact is {artifact}"


def check_commit(value: object) -> str:
    """A full commit SHA; a short one gets "too short" (CI must pass the whole SHA)."""
    if isinstance(value, str) and re.fullmatch(r"[0-9a-fA-F]+", value):
        if len(value) in COMMIT_LENGTHS:
            return value
        if len(value) < COMMIT_LENGTHS[0]:
            raise InvalidName(
                f"invalid commit {shown(value)}: too short, need the full commit SHA "
                f"({COMMIT_RULE})"
            )
    raise InvalidName(f"invalid commit {shown(value)}: must be the full hex SHA ({COMMIT_RULE})")


def check_free_text(value: str) -> str:
    """Free text that is stored and shown to others later (an abort's or a hold's
    reason): no surrogates (argv bytes that are not UTF-8) and no control character but
    tab, which would break the JSON, the terminal or the log of whoever reads it."""
    for char in value:
        if 0xD800 <= ord(char) <= 0xDFFF:
            raise PayloadError(
                f"not valid UTF-8 text: {shown(value)} (check the terminal's encoding)"
            )
        if char != "\t" and unicodedata.category(char) == "Cc":
            raise PayloadError(
                f"control character {char!r} in {shown(value)}: give one line of printable text"
            )
        if ord(char) in _BIDI_CONTROLS:
            # They reorder what a page or a terminal shows after them ("aborted by" could
            # read as something else); printable() escapes them where text is shown
            # (terminals, the page), but the JSON API passes text on as it is.
            raise PayloadError(
                f"bidirectional control character U+{ord(char):04X} in {shown(value)}: "
                "give plain text"
            )
    return value


# The bidirectional embeddings, overrides and isolates (Trojan Source, CVE-2021-42574).
_BIDI_CONTROLS = frozenset((*range(0x202A, 0x202F), *range(0x2066, 0x206A)))
# The same rule as a regular expression, for descriptions (the web API's OpenAPI): the
# control characters (Unicode's Cc) but tab, the bidirectional controls. Not surrogates,
# which no text in UTF-8 holds (only a JSON escape can), and which regex engines that
# work on code points (Rust's, which schemathesis validates with) cannot name.
FREE_TEXT_PATTERN = r"[^\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]*"

# C0 and C1 control characters but newline and tab, each to its escape (ESC -> "\x1b"),
# and the bidirectional controls, which reorder what a terminal shows.
_UNPRINTABLE = {
    **{c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if c not in (0x09, 0x0A)},
    **{c: f"\\u{c:04x}" for c in _BIDI_CONTROLS},
}
_ONE_LINE = {**_UNPRINTABLE, 0x0A: "\\n"}


def printable(text: str) -> str:
    """``text`` for a terminal: what others wrote into KV (a host's error, a forged
    reason) can carry escape sequences that would clear the screen or forge lines."""
    return text.translate(_UNPRINTABLE)


def one_line_short(text: str, limit: int = 200) -> str:
    """``one_line``, cut after ``limit`` characters with the length said: for text another
    host wrote (a hold's reason in its record) shown inside a message of our own."""
    if len(text) <= limit:
        return one_line(text)
    return f"{one_line(text[:limit])}... ({len(text)} characters)"


def one_line(text: str) -> str:
    """``printable``, and a newline escaped too: for a field shown on one line of a
    table or a progress list (an error, a reason), where one would start a forged line."""
    return text.translate(_ONE_LINE)
