"""Istio string patterns: exact, ``prefix*``, ``*suffix``, and ``*`` for any non-empty value.

Patterns are validated when a policy loads and compiled once into a :class:`StringMatcher`,
whose ``matches`` does set and tuple look-ups only.
"""

from __future__ import annotations

__all__ = ["StringMatcher", "pattern_problem"]


def pattern_problem(pattern: str) -> str | None:
    """Return why ``pattern`` is not an Istio string pattern, or ``None`` when it is one."""
    if pattern == "":
        return "empty pattern (use '*' for any non-empty value)"
    if pattern == "*":
        return None
    inner = pattern[1:-1] if len(pattern) > 1 else ""
    if "*" in inner or (pattern.startswith("*") and pattern.endswith("*")):
        return f"{pattern!r}: '*' may only stand at the start or the end (Istio matching)"
    return None


class StringMatcher:
    """A compiled list of Istio patterns; a value matches when any pattern does."""

    __slots__ = ("any", "exact", "patterns", "prefixes", "suffixes")

    def __init__(self, patterns: list[str] | tuple[str, ...]) -> None:
        self.patterns = tuple(patterns)
        self.any = "*" in self.patterns
        self.exact = frozenset(p for p in self.patterns if "*" not in p)
        self.prefixes = tuple(p[:-1] for p in self.patterns if len(p) > 1 and p.endswith("*"))
        self.suffixes = tuple(p[1:] for p in self.patterns if len(p) > 1 and p.startswith("*"))

    def matches(self, value: str) -> bool:
        """Whether ``value`` matches one of the patterns (``*`` needs a non-empty value)."""
        if value in self.exact:
            return True
        if self.any:
            return value != ""
        return (bool(self.prefixes) and value.startswith(self.prefixes)) or (
            bool(self.suffixes) and value.endswith(self.suffixes)
        )

    def __repr__(self) -> str:
        return f"StringMatcher({list(self.patterns)!r})"
