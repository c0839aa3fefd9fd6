"""Header filters: `region=eu,priority>=5` — comma-separated clauses that must all hold (see docs/filters.md)."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from decimal import Context, Decimal
from typing import Mapping, Union

from ._errors import BadFilterError

MAX_FILTER_BYTES = 1024
MAX_CLAUSES = 32

Number = Union[int, Decimal]

# Operators, longest first so that `>=` is not read as `>`.
_OPS = ("!=", ">=", "<=", "=", ">", "<")
_NUMERIC_OPS = frozenset((">", ">=", "<", "<="))
EXISTS = "exists"
MISSING = "missing"

_KEY_RE = re.compile(r"[A-Za-z0-9_.:/-]+")
_BARE_VALUE_RE = re.compile(r'[^\s,|"\\=!<>()]+')
_INT_RE = re.compile(r"[+-]?[0-9]{1,30}")
_NUM_RE = re.compile(r"[+-]?(?:[0-9]{1,200}(?:\.[0-9]{0,200})?|\.[0-9]{1,200})(?:[eE][+-]?[0-9]{1,4})?")
_CTX = Context(prec=200, Emax=999999, Emin=-999999)
_MAX_HEADER_NUMBER = 256
_MAX_DIGITS = 60
_MAX_EXPONENT = 999


def parse_number(text: str) -> Number | None:
    """The exact value of a header string written as a plain ASCII decimal number, or None if it is not one."""
    if not isinstance(text, str) or len(text) > _MAX_HEADER_NUMBER:
        return None
    if _INT_RE.fullmatch(text):
        return int(text)
    if _NUM_RE.fullmatch(text):
        return Decimal(text)
    return None


def _canonical_number(text: str) -> tuple[Number, str] | None:
    """(value, canonical text) of a filter literal, or None if it is not an accepted number."""
    if len(text) > 2 * 200 + 8 or not _NUM_RE.fullmatch(text):
        return None
    d = _CTX.normalize(Decimal(text))
    if d == 0:
        return 0, "0"
    if len(d.as_tuple().digits) > _MAX_DIGITS or abs(d.adjusted()) > _MAX_EXPONENT:
        return None
    sci = str(d)
    plain = format(d, "f")
    canon = plain if len(plain) <= len(sci) else sci
    value: Number = int(d) if d == d.to_integral_value(context=_CTX) else d
    return value, canon


def _quote(value: str) -> str:
    if value and _BARE_VALUE_RE.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True, slots=True)
class Clause:
    """One condition on one header: `op` is one of = != > >= < <= exists missing."""

    key: str
    op: str
    values: tuple[str, ...] = ()
    number: Number | None = field(default=None, compare=False, hash=False, repr=False)

    def matches(self, headers: Mapping[str, str]) -> bool:
        """True when this clause holds for `headers` (never raises for str-keyed mappings)."""
        value = headers.get(self.key)
        if value is not None and not isinstance(value, str):
            value = None  # non-string header values are treated as absent
        op = self.op
        if op == "=":
            return value is not None and value in self.values
        if op == "!=":
            return value is None or value not in self.values
        if op == EXISTS:
            return value is not None
        if op == MISSING:
            return value is None
        if value is None:
            return False
        n = parse_number(value)
        if n is None:
            return False
        limit = self.number
        if op == ">":
            return n > limit
        if op == ">=":
            return n >= limit
        if op == "<":
            return n < limit
        return n <= limit

    def __str__(self) -> str:
        if self.op == EXISTS:
            return self.key
        if self.op == MISSING:
            return "!" + self.key
        if self.op in _NUMERIC_OPS:
            return f"{self.key}{self.op}{self.values[0]}"
        return f"{self.key}{self.op}" + "|".join(_quote(v) for v in self.values)

    def _sort_key(self) -> tuple:
        return (self.key, self.op, self.values)


@dataclass(frozen=True, slots=True)
class Filter:
    """A conjunction of clauses; equal filters have equal canonical text (`str(f)`)."""

    clauses: tuple[Clause, ...]

    def matches(self, headers: Mapping[str, str] | None) -> bool:
        """True when every clause holds for `headers` (None means no headers); never raises."""
        if headers is None:
            headers = {}
        try:
            return all(c.matches(headers) for c in self.clauses)
        except Exception:  # an exotic Mapping whose get() misbehaves: treat as no match
            return False

    def __str__(self) -> str:
        return ",".join(str(c) for c in self.clauses)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.clause_no = 0
        self.clause_start = 0

    def fail(self, why: str) -> BadFilterError:
        end = self.text.find(",", self.clause_start)
        snippet = self.text[self.clause_start:end if end >= 0 else len(self.text)].strip()
        if len(snippet) > 60:
            snippet = snippet[:57] + "..."
        return BadFilterError(f"bad filter clause {self.clause_no} {snippet!r}: {why}")

    def ws(self) -> None:
        t = self.text
        while self.pos < len(t) and t[self.pos].isspace():
            self.pos += 1

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self, s: str) -> bool:
        return self.text.startswith(s, self.pos)

    def key(self) -> str:
        m = _KEY_RE.match(self.text, self.pos)
        if not m:
            raise self.fail("expected a header key (letters, digits, _ . : / -)")
        self.pos = m.end()
        return m.group()

    def value(self) -> str:
        t = self.text
        if self.peek('"'):
            self.pos += 1
            out = []
            while True:
                if self.pos >= len(t):
                    raise self.fail("unterminated quoted value")
                c = t[self.pos]
                if c == "\\":
                    if self.pos + 1 >= len(t) or t[self.pos + 1] not in '\\"':
                        raise self.fail('only \\\\ and \\" escapes are allowed in quoted values')
                    out.append(t[self.pos + 1])
                    self.pos += 2
                elif c == '"':
                    self.pos += 1
                    return "".join(out)
                else:
                    out.append(c)
                    self.pos += 1
        m = _BARE_VALUE_RE.match(t, self.pos)
        if not m:
            raise self.fail('expected a value (quote it with "..." if it holds spaces or , | = ! < > ( ) " \\)')
        self.pos = m.end()
        return m.group()

    def clause(self) -> Clause:
        self.ws()
        if self.peek("!") and not self.peek("!="):
            self.pos += 1
            self.ws()
            return Clause(self.key(), MISSING)
        key = self.key()
        self.ws()
        if self.at_end() or self.peek(","):
            return Clause(key, EXISTS)
        op = next((o for o in _OPS if self.peek(o)), None)
        if op is None:
            raise self.fail("expected one of = != > >= < <= or the end of the clause")
        self.pos += len(op)
        self.ws()
        if op in _NUMERIC_OPS:
            start = self.pos
            m = _BARE_VALUE_RE.match(self.text, self.pos)
            parsed = _canonical_number(m.group()) if m else None
            if parsed is None:
                self.pos = start
                raise self.fail(f"{op!r} needs a plain number such as 5, -2.5 or 1e3 "
                                f"(at most {_MAX_DIGITS} digits, exponent within ±{_MAX_EXPONENT})")
            self.pos = m.end()
            return Clause(key, op, (parsed[1],), parsed[0])
        values = {self.value()}
        self.ws()
        while self.peek("|"):
            self.pos += 1
            self.ws()
            values.add(self.value())
            self.ws()
        return Clause(key, op, tuple(sorted(values)))

    def parse(self) -> Filter:
        clauses = set()
        while True:
            self.clause_no += 1
            if self.clause_no > MAX_CLAUSES:
                raise BadFilterError(f"filter has more than {MAX_CLAUSES} clauses")
            self.clause_start = self.pos
            self.ws()
            if self.at_end() or self.peek(","):
                raise self.fail("empty clause (a doubled, leading or trailing comma?)")
            clauses.add(self.clause())
            self.ws()
            if self.at_end():
                break
            if not self.peek(","):
                raise self.fail("expected ',' between clauses")
            self.pos += 1
        return Filter(tuple(sorted(clauses, key=Clause._sort_key)))


@functools.lru_cache(maxsize=4096)
def _parse_cached(text: str) -> Filter:
    return _Parser(text).parse()


def parse_filter(text: str) -> Filter:
    """Parse a filter expression (max 1 KiB UTF-8, 32 clauses) or raise BadFilterError naming the bad clause."""
    if not isinstance(text, str):
        raise BadFilterError(f"filter must be a string, not {type(text).__name__}")
    if len(text) > MAX_FILTER_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_FILTER_BYTES:
        raise BadFilterError(f"filter is longer than {MAX_FILTER_BYTES} bytes")
    if not text.strip():
        raise BadFilterError("filter is empty")
    f = _parse_cached(text)
    if len(str(f).encode("utf-8", "surrogatepass")) > MAX_FILTER_BYTES:
        raise BadFilterError(f"filter is longer than {MAX_FILTER_BYTES} bytes once written canonically")
    return f
