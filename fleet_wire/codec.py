"""Bounded JSON: a payload is measured before it is parsed, so no input can escape the decoder.

`json.loads` recurses in C once per nesting level (RecursionError near 1000 levels, i.e. from a
2 KB payload), `int()` refuses more than 4,300 digits with a plain ValueError, and NaN/Infinity
are accepted by default. So before parsing we take one linear pass over the text with strings
blanked out (a regex, in C): count the nesting depth of the brackets and look for over-long
digit runs. Only a payload within every bound reaches `json.loads`, and anything it still raises
becomes a `PayloadRefused` with a stable reason.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from fleet_wire import limits
from fleet_wire.errors import PayloadRefused

# One JSON string. Possessive quantifiers keep each attempt linear; an unterminated string runs
# to the end of the text (\Z) instead of failing, so it is never retried from every later quote
# (which would be quadratic). Such a text is not JSON and json.loads refuses it at that quote.
_STRING_RE = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\Z)', re.DOTALL)
_NOT_BRACKET_RE = re.compile(r"[^\[\]{}]+")
_DIGITS_TO_ZERO = str.maketrans("123456789", "000000000")
_LONG_RUN = "0" * (limits.MAX_NUMBER_DIGITS + 1)


def _refuse_constant(name: str) -> Any:
    raise PayloadRefused(f"{name} is not a number JSON allows", reason="non_finite_number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise PayloadRefused(f"number {text[:40]} overflows a double", reason="non_finite_number")
    return value


def check_bounds(text: str, *, max_depth: int = limits.MAX_JSON_DEPTH) -> None:
    """Raise PayloadRefused if `text` nests deeper than `max_depth` or holds an over-long number."""
    if "\\" in text:
        bare = _STRING_RE.sub('""', text)
    else:
        # no escapes: strings are exactly what lies between alternate quotes (4x cheaper than
        # the regex on a 200-event batch, which is what honest terminals send)
        bare = '""'.join(text.split('"')[::2])
    brackets = _NOT_BRACKET_RE.sub("", bare)
    rest = brackets
    for _ in range(max_depth):  # each pass removes the innermost pairs; C speed, no recursion
        rest = rest.replace("{}", "").replace("[]", "")
    if rest:
        depth = 0
        for ch in brackets:  # exact count only when something was left over: too deep or unbalanced
            depth += 1 if ch in "[{" else -1
            if depth > max_depth:
                raise PayloadRefused(f"nested deeper than {max_depth} levels", reason="too_deep")
    if _LONG_RUN in bare.translate(_DIGITS_TO_ZERO):
        raise PayloadRefused(
            f"a number with more than {limits.MAX_NUMBER_DIGITS} digits in a row; shorten it",
            reason="number_too_long",
        )


def loads_bounded(
    payload: bytes | str,
    *,
    max_bytes: int,
    max_depth: int = limits.MAX_JSON_DEPTH,
    what: str = "message",
) -> Any:
    """Parse `payload` as JSON within size, depth and number bounds, or raise PayloadRefused."""
    if len(payload) > max_bytes:
        raise PayloadRefused(f"{what} is {len(payload)} bytes; the limit is {max_bytes}", reason="oversized")
    if isinstance(payload, bytes):
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as err:
            raise PayloadRefused(f"{what} is not UTF-8 text: {err}", reason="malformed_json") from err
    else:
        text = payload
    check_bounds(text, max_depth=max_depth)
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except PayloadRefused:
        raise
    except (ValueError, RecursionError, MemoryError) as err:  # JSONDecodeError is a ValueError
        raise PayloadRefused(f"{what} is not JSON: {err}", reason="malformed_json") from err


def dumps_checked(value: Any, *, what: str = "value") -> str:
    """Compact JSON of an already-parsed value, refusing text SQLite or UTF-8 cannot hold.

    JSON may spell a lone surrogate (\\ud800); Python keeps it in the str, and encoding it to
    UTF-8 (to store it) would then fail far from here, breaking a whole batch.
    """
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise PayloadRefused(f"{what} holds text that is not valid Unicode: {err}", reason="bad_text") from err
    return text
