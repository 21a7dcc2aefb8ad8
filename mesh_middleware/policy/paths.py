"""Request path normalization, the same for authorization and routing.

Strip the query; percent-decode unreserved characters; resolve ``.`` and ``..``; merge repeated
slashes; reject an encoded slash (``%2F``), a backslash (raw or ``%5C``), NUL (raw or ``%00``) and
malformed escapes. Other escapes are kept, with upper-case hex, so the result is idempotent:
``normalize_path(normalize_path(p)) == normalize_path(p)``.
"""

from __future__ import annotations

from mesh_middleware.errors import PathError

__all__ = ["encode_path", "normalize_path", "normalized_pattern_problem"]

_HEX = frozenset("0123456789abcdefABCDEF")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_REJECTED_ESCAPES = {
    "2F": "an encoded slash (%2F)",
    "5C": "an encoded backslash (%5C)",
    "00": "NUL",
}
MAX_PATH_LENGTH = 8192
# Characters that need work or a refusal; a path without them, "//" and "/." is already normal.
_NEEDS_WORK = frozenset("?#%\\\x00")


def normalize_path(raw: str) -> str:
    """Return the normalized form of a request target's path; raise :class:`PathError` if unsafe."""
    if (
        raw[:1] == "/"
        and len(raw) <= MAX_PATH_LENGTH
        and _NEEDS_WORK.isdisjoint(raw)  # a fifth of a regex search's cost, on every request
        and "//" not in raw
        and "/." not in raw
    ):
        return raw
    cut = len(raw)
    for stop in ("?", "#"):
        at = raw.find(stop)
        if 0 <= at < cut:
            cut = at
    path = raw[:cut]
    if len(path) > MAX_PATH_LENGTH:
        raise PathError(f"path is longer than {MAX_PATH_LENGTH} characters")
    if not path.startswith("/"):
        raise PathError("path must start with '/'")
    # Fast path: most paths have nothing to decode, resolve or merge.
    if "%" not in path and "//" not in path and "/." not in path:
        if "\\" in path or "\x00" in path:
            raise PathError("backslash or NUL in path")
        return path
    return _resolve_segments(_decode_unreserved(path))


def _decode_unreserved(path: str) -> str:
    if "\\" in path or "\x00" in path:
        raise PathError("backslash or NUL in path")
    if "%" not in path:
        return path
    out: list[str] = []
    i, n = 0, len(path)
    while i < n:
        char = path[i]
        if char != "%":
            out.append(char)
            i += 1
            continue
        hex_digits = path[i + 1 : i + 3]
        if len(hex_digits) != 2 or not (hex_digits[0] in _HEX and hex_digits[1] in _HEX):
            raise PathError("malformed percent-escape in path")
        upper = hex_digits.upper()
        rejected = _REJECTED_ESCAPES.get(upper)
        if rejected is not None:
            raise PathError(f"{rejected} in path")
        decoded = chr(int(upper, 16))
        out.append(decoded if decoded in _UNRESERVED else "%" + upper)
        i += 3
    return "".join(out)


def _resolve_segments(path: str) -> str:
    # RFC 3986 remove_dot_segments over '/'-separated segments, with empty segments merged.
    segments = path.split("/")
    output: list[str] = []
    last = len(segments) - 1
    trailing_slash = False
    for index, segment in enumerate(segments[1:], start=1):
        if segment == "" or segment == ".":
            trailing_slash = index == last
            continue
        if segment == "..":
            if output:
                output.pop()
            trailing_slash = index == last
            continue
        output.append(segment)
        trailing_slash = False
    if not output:
        return "/"
    return "/" + "/".join(output) + ("/" if trailing_slash else "")


_PRINTABLE_ASCII = frozenset(chr(c) for c in range(0x21, 0x7F))


def normalized_pattern_problem(body: str) -> str | None:
    """Why a path pattern (without its ``*``) could never match a normalized path, if it could not.

    Requests are matched after normalization, so a pattern must be written the normalized way:
    non-ASCII percent-encoded as UTF-8 with upper-case hex, unreserved characters plain, no
    dot-segments or repeated slashes.
    """
    if body == "":
        return None
    if any(char not in _PRINTABLE_ASCII for char in body):
        example = encode_path(body)
        return f"write spaces, controls and non-ASCII characters percent-encoded, as {example!r}"
    try:
        normal = _decode_unreserved(body)
    except PathError as exc:
        return f"can never match: {exc.reason}"
    if body.startswith("/"):
        normal = _resolve_segments(normal) if normal != "/" else normal
        if body.endswith("/") and not normal.endswith("/"):
            normal += "/"
    if normal != body:
        return f"requests are matched after normalization; write it as {normal!r}"
    return None


def encode_path(path: str) -> str:
    """Percent-encode what may not stand raw in a request path (spaces, controls, non-ASCII)."""
    out = []
    for char in path:
        if char in _PRINTABLE_ASCII:
            out.append(char)
        else:
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8"))
    return "".join(out)
