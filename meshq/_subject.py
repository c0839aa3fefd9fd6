"""Subjects: dot-separated tokens; patterns add `*` (one token) and `>` (one or more trailing tokens)."""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from ._errors import BadSubjectError

MAX_SUBJECT_LENGTH = 1024
_FORBIDDEN = frozenset(" \t\r\n\x00")

T = TypeVar("T")


def _check_tokens(text: str, what: str) -> list[str]:
    if not isinstance(text, str) or not text:
        raise BadSubjectError(f"{what} must be a non-empty string")
    if len(text) > MAX_SUBJECT_LENGTH:
        raise BadSubjectError(f"{what} is longer than {MAX_SUBJECT_LENGTH} characters")
    if any(c in _FORBIDDEN for c in text):
        raise BadSubjectError(f"{what} {text!r} contains whitespace or NUL")
    tokens = text.split(".")
    if any(t == "" for t in tokens):
        raise BadSubjectError(f"{what} {text!r} has an empty token")
    return tokens


def validate_subject(subject: str) -> str:
    """Return `subject` if it is a valid literal subject (no wildcards), else raise BadSubjectError."""
    for token in _check_tokens(subject, "subject"):
        if token in ("*", ">"):
            raise BadSubjectError(f"subject {subject!r} contains a wildcard; publish to a literal subject")
    return subject


def validate_pattern(pattern: str) -> str:
    """Return `pattern` if it is a valid subscription pattern, else raise BadSubjectError."""
    tokens = _check_tokens(pattern, "pattern")
    for i, token in enumerate(tokens):
        if token == ">" and i != len(tokens) - 1:
            raise BadSubjectError(f"pattern {pattern!r}: '>' may only be the last token")
        if ("*" in token or ">" in token) and token not in ("*", ">"):
            raise BadSubjectError(f"pattern {pattern!r}: wildcards must be whole tokens")
    return pattern


def matches(pattern: str, subject: str) -> bool:
    """True when the literal `subject` matches `pattern`."""
    p = pattern.split(".")
    s = subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s):
            return False
        if token != "*" and token != s[i]:
            return False
    return len(p) == len(s)


def pattern_covers(outer: str, inner: str) -> bool:
    """True when every subject matched by `inner` is also matched by `outer`."""
    o = outer.split(".")
    n = inner.split(".")
    for i, token in enumerate(o):
        if token == ">":
            return len(n) > i
        if i >= len(n):
            return False
        if n[i] == ">":
            return False
        if token != "*" and (n[i] == "*" or token != n[i]):
            return False
    return len(o) == len(n)


class _Node(Generic[T]):
    __slots__ = ("children", "values", "tail_values")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = {}
        self.values: set = set()        # patterns ending exactly here
        self.tail_values: set = set()   # patterns ending here with '>'


class SubjectIndex(Generic[T]):
    """A trie of patterns → values; `match(subject)` returns every value whose pattern matches."""

    def __init__(self) -> None:
        self._root: _Node[T] = _Node()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, pattern: str, value: T) -> None:
        node = self._root
        tokens = pattern.split(".")
        for token in tokens[:-1]:
            node = node.children.setdefault(token, _Node())
        last = tokens[-1]
        if last == ">":
            target = node.tail_values
        else:
            node = node.children.setdefault(last, _Node())
            target = node.values
        if value not in target:
            target.add(value)
            self._count += 1

    def remove(self, pattern: str, value: T) -> bool:
        path: list[tuple[_Node[T], str]] = []
        node = self._root
        tokens = pattern.split(".")
        for token in tokens[:-1]:
            child = node.children.get(token)
            if child is None:
                return False
            path.append((node, token))
            node = child
        last = tokens[-1]
        if last == ">":
            target = node.tail_values
        else:
            child = node.children.get(last)
            if child is None:
                return False
            path.append((node, last))
            node = child
            target = node.values
        if value not in target:
            return False
        target.discard(value)
        self._count -= 1
        for parent, token in reversed(path):  # prune empty branches
            child = parent.children[token]
            if child.children or child.values or child.tail_values:
                break
            del parent.children[token]
        return True

    def match(self, subject: str) -> set:
        out: set = set()
        tokens = subject.split(".")
        self._walk(self._root, tokens, 0, out)
        return out

    def _walk(self, node: _Node[T], tokens: list[str], i: int, out: set) -> None:
        if i < len(tokens) and node.tail_values:
            out |= node.tail_values
        if i == len(tokens):
            out |= node.values
            return
        for key in (tokens[i], "*"):
            child = node.children.get(key)
            if child is not None:
                self._walk(child, tokens, i + 1, out)

    def __iter__(self) -> Iterator[T]:
        stack = [self._root]
        while stack:
            node = stack.pop()
            yield from node.values
            yield from node.tail_values
            stack.extend(node.children.values())
