"""Load a policy file: YAML with line numbers, validated against the schema.

Every problem becomes a :class:`PolicyIssue` naming the file, the line, the field and what was
expected. Duplicate keys, unknown keys and oversized files are errors, never ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mesh_middleware.errors import PolicyError, PolicyIssue
from mesh_middleware.policy.schema import Policy

__all__ = ["LoadedPolicy", "field_path", "load_policy", "parse_policy"]

MAX_POLICY_BYTES = 1024 * 1024
# libyaml's parser when PyYAML was built with it (the wheels are): the same nodes and marks,
# about ten times faster on large files.
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MAX_NODES = 200_000
_MAX_DEPTH = 64

Loc = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    """A validated policy, the file it came from, and the line of every field in it."""

    policy: Policy
    source: str
    lines: dict[Loc, int]

    def line_of(self, *loc: str | int) -> int | None:
        """The 1-based line where ``loc`` (or its nearest enclosing field) is written."""
        return _nearest_line(self.lines, loc)


def field_path(loc: Loc) -> str:
    """Render a location such as ``("inbound", 0, "name")`` as ``inbound[0].name``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _nearest_line(lines: dict[Loc, int], loc: Loc) -> int | None:
    for end in range(len(loc), -1, -1):
        line = lines.get(loc[:end])
        if line is not None:
            return line
    return None


class _Converter:
    """Turns a composed YAML node tree into plain data, remembering each field's line."""

    def __init__(self, loader: yaml.SafeLoader, source: str) -> None:
        self.loader = loader
        self.source = source
        self.lines: dict[Loc, int] = {}
        self.issues: list[PolicyIssue] = []
        self.nodes = 0
        self.open: set[int] = set()

    def convert(self, node: yaml.Node, loc: Loc) -> Any:
        self.nodes += 1
        if self.nodes > _MAX_NODES or len(loc) > _MAX_DEPTH or id(node) in self.open:
            raise _TooLarge
        if isinstance(node, yaml.ScalarNode):
            line = node.start_mark.line + 1
            self.lines.setdefault(loc, line)
            return self._scalar(node, loc, line)
        self.open.add(id(node))
        try:
            return self._convert_collection(node, loc)
        finally:
            self.open.discard(id(node))

    def _scalar(self, node: yaml.ScalarNode, loc: Loc, line: int) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        except Exception:  # PyYAML constructors raise whatever a bad value provokes
            # An explicit tag the value does not fit (`!!int abc`), or an int too long to read.
            tag = str(node.tag).rsplit(":", 1)[-1]
            message = f"cannot read {str(node.value)[:40]!r} as {tag}"
            self.issues.append(PolicyIssue(self.source, line, field_path(loc), message))
            return None

    def _convert_collection(self, node: yaml.Node, loc: Loc) -> Any:
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                line = key_node.start_mark.line + 1
                if not isinstance(key_node, yaml.ScalarNode):
                    self.issues.append(
                        PolicyIssue(
                            self.source, line, field_path(loc), "keys must be plain strings"
                        )
                    )
                    continue
                # The raw text, not YAML 1.1's reading of it: `on:` is a key, not True.
                key = str(key_node.value)
                if key in out:
                    self.issues.append(
                        PolicyIssue(self.source, line, field_path((*loc, key)), "duplicate key")
                    )
                    continue
                self.lines[(*loc, key)] = line
                out[key] = self.convert(value_node, (*loc, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.convert(item, (*loc, i)) for i, item in enumerate(node.value)]
        raise _TooLarge


class _TooLarge(Exception):
    pass


def parse_policy(text: str, source: str = "<policy>") -> LoadedPolicy:
    """Parse and validate policy YAML; raise :class:`PolicyError` listing every problem."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_POLICY_BYTES:
        raise PolicyError(
            [PolicyIssue(source, None, "", f"file is larger than {MAX_POLICY_BYTES} bytes")]
        )
    too_deep = PolicyIssue(source, None, "", "too deep, too large or recursive (YAML aliases?)")
    loader: yaml.SafeLoader | None = None
    try:
        loader = _Loader(text)
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise PolicyError([PolicyIssue(source, line, "", f"invalid YAML: {problem}")]) from None
    except yaml.YAMLError as exc:  # e.g. a control character the reader refuses
        raise PolicyError([PolicyIssue(source, None, "", f"invalid YAML: {exc}")]) from None
    except RecursionError:
        raise PolicyError([too_deep]) from None
    finally:
        if loader is not None:
            loader.dispose()
    if root is None:
        raise PolicyError(
            [PolicyIssue(source, None, "", "the file is empty; expected a mapping with 'service'")]
        )
    converter = _Converter(loader, source)
    try:
        data = converter.convert(root, ())
    except (_TooLarge, RecursionError):
        raise PolicyError([too_deep]) from None
    if converter.issues:
        raise PolicyError(converter.issues)
    if not isinstance(data, dict):
        raise PolicyError(
            [
                PolicyIssue(
                    source,
                    converter.lines.get(()),
                    "",
                    "expected a mapping with 'service' at the top",
                )
            ]
        )
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(_issues_from(exc, source, converter.lines)) from None
    return LoadedPolicy(policy=policy, source=source, lines=converter.lines)


def load_policy(path: str | Path) -> LoadedPolicy:
    """Read and validate a policy file; raise :class:`PolicyError` if unreadable or invalid."""
    source = str(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise PolicyError(
            [PolicyIssue(source, None, "", f"cannot read the file: {exc.strerror or exc}")]
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(
            [PolicyIssue(source, None, "", f"not UTF-8 text: {exc.reason}")]
        ) from None
    return parse_policy(text, source)


def _issues_from(exc: ValidationError, source: str, lines: dict[Loc, int]) -> list[PolicyIssue]:
    issues: list[PolicyIssue] = []
    by_place: dict[tuple[int | None, str], int] = {}
    for error in exc.errors(include_url=False):
        data_loc = _data_location(tuple(error["loc"]), lines, missing=error["type"] == "missing")
        line, field = _nearest_line(lines, data_loc), field_path(data_loc)
        message = _message(error)
        seen = by_place.get((line, field))
        if seen is not None:
            # A union reports one error per member; say them as alternatives, once.
            first = issues[seen]
            issues[seen] = PolicyIssue(source, line, field, f"{first.message}; or {message}")
            continue
        by_place[(line, field)] = len(issues)
        issues.append(PolicyIssue(source, line, field, message))
    return issues


def _data_location(loc: Loc, lines: dict[Loc, int], *, missing: bool) -> Loc:
    """Drop what pydantic adds to a location (union members, validators); keep data keys."""
    kept: Loc = ()
    for index, part in enumerate(loc):
        is_last = index == len(loc) - 1
        if isinstance(part, int) or (*kept, part) in lines or (missing and is_last):
            kept = (*kept, part)
    return kept


def _message(error: Any) -> str:
    kind = error["type"]
    given = error.get("input")
    if kind == "extra_forbidden":
        return "unknown key (check its spelling and indentation)"
    if kind == "missing":
        return "required field is missing"
    msg = str(error["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind == "literal_error" or kind.endswith("_type"):
        return f"{msg} (got {given!r})"
    return msg
