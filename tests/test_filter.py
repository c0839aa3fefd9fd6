"""Header filters: parsing, canonical text, evaluation, limits and typed errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshq._errors import BadFilterError, MeshqError
from meshq._filter import MAX_CLAUSES, Filter, parse_filter, parse_number


@pytest.mark.parametrize("text,headers,expected", [
    ("region=eu", {"region": "eu"}, True),
    ("region=eu", {"region": "us"}, False),
    ("region=eu", {}, False),
    ("region=eu|us", {"region": "us"}, True),
    ("region!=eu", {"region": "us"}, True),
    ("region!=eu", {}, True),                       # absent is "not equal"
    ("region!=eu|us", {"region": "us"}, False),
    ("region", {"region": ""}, True),
    ("region", {}, False),
    ("!region", {}, True),
    ("!region", {"region": "eu"}, False),
    ("priority>5", {"priority": "6"}, True),
    ("priority>5", {"priority": "5"}, False),
    ("priority>=5", {"priority": "5.0"}, True),
    ("priority<5", {"priority": "-1e3"}, True),
    ("priority<=0.1", {"priority": ".1"}, True),
    ("priority>5", {"priority": "high"}, False),     # not a number: clause is false
    ("priority<5", {"priority": "high"}, False),
    ("priority>5", {}, False),
    ("priority>5", {"priority": " 6"}, False),       # no surrounding whitespace in numbers
    ("priority>5", {"priority": "nan"}, False),
    ("n>9007199254740992", {"n": "9007199254740993"}, True),   # exact, not float
    ("n<0.3", {"n": "0.29999999999999999999"}, True),
    ("region=eu,priority>=5", {"region": "eu", "priority": "7"}, True),
    ("region=eu,priority>=5", {"region": "eu", "priority": "4"}, False),
    ('ct="application/json; charset=utf-8"', {"ct": "application/json; charset=utf-8"}, True),
    ('q="a,b"|"x\\"y"', {"q": 'x"y'}, True),
    ('e=""', {"e": ""}, True),
    ("region=eu", None, False),
    ("!region", None, True),
    ("  region = eu ,  priority >= 5 ", {"region": "eu", "priority": "5"}, True),
])
def test_evaluation(text, headers, expected):
    assert parse_filter(text).matches(headers) is expected


@pytest.mark.parametrize("text,canonical", [
    ("region=eu,priority>=5", "priority>=5,region=eu"),
    ("b=2, a = y|x|y ,!c, d", "a=x|y,b=2,!c,d"),
    ("p>1e3", "p>1000"),
    ("p<=1.50", "p<=1.5"),
    ("p>-0.0", "p>0"),
    ("p>+05", "p>5"),
    ("p>1e39", "p>1E+39"),
    ("p>0.00000015", "p>1.5E-7"),
    ('x=""', 'x=""'),
    ('x="plain"', "x=plain"),
    ('x="a b"', 'x="a b"'),
    ("a=1,a=1", "a=1"),
])
def test_canonical_text(text, canonical):
    f = parse_filter(text)
    assert str(f) == canonical
    assert parse_filter(canonical) == f and hash(parse_filter(canonical)) == hash(f)


def test_equal_filters_are_interchangeable():
    assert parse_filter("a=1,b=2") == parse_filter("b=2 , a=1")
    assert len({parse_filter("a=1,b=2"), parse_filter("b=2,a=1")}) == 1
    assert parse_filter("a=1") != parse_filter("a!=1")


@pytest.mark.parametrize("text,fragment", [
    ("", "empty"),
    ("   ", "empty"),
    ("a=", "clause 1 'a='"),
    ("a=1,", "clause 2"),
    (",a", "clause 1"),
    ("a=1,,b", "clause 2"),
    ("a b", "clause 1 'a b'"),
    ("a=1,priority>=high", "clause 2 'priority>=high'"),
    ('a="x', "unterminated"),
    ('a="\\n"', "escapes"),
    ("a==b", "clause 1"),
    ("a=b)", "clause 1"),
    ("!", "header key"),
    ("!=x", "header key"),
    ("a>", "number"),
    ('a>"5"', "number"),
    ("a>5x", "number"),
    ("a>1e5000", "number"),
    ("a>" + "1" * 61, "number"),
    ("a in (x|y)", "clause 1"),
    ("é=1", "header key"),
])
def test_errors_point_at_the_clause(text, fragment):
    with pytest.raises(BadFilterError) as info:
        parse_filter(text)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, MeshqError)


def test_limits():
    parse_filter(",".join(f"k{i}" for i in range(MAX_CLAUSES)))
    with pytest.raises(BadFilterError, match="32 clauses"):
        parse_filter(",".join(f"k{i}" for i in range(MAX_CLAUSES + 1)))
    with pytest.raises(BadFilterError, match="1024 bytes"):
        parse_filter("k=" + "v" * 1023)
    with pytest.raises(BadFilterError, match="1024 bytes"):
        parse_filter("k=" + "é" * 600)                # bytes, not characters
    with pytest.raises(BadFilterError, match="string"):
        parse_filter(None)  # type: ignore[arg-type]


def test_parse_number():
    assert parse_number("42") == 42 and parse_number("-1.5") == parse_number("-15e-1")
    for bad in ["", "1_000", "inf", "nan", "0x10", "١٢", " 1", "1.2.3", "e5", "1" * 300]:
        assert parse_number(bad) is None


def test_exotic_header_values_never_raise():
    f = parse_filter("a=1,b>2,!c")
    assert f.matches({"a": 1, "b": 3}) is False      # non-string values count as absent
    assert parse_filter("!a").matches({"a": None}) is True

    class Broken(dict):
        def get(self, key, default=None):
            raise RuntimeError("boom")
    assert f.matches(Broken()) is False


# ------------------------------------------------------------------------------ properties

keys = st.text(alphabet="abcXYZ019_.:/-", min_size=1, max_size=6)
values = st.text(min_size=0, max_size=8)           # anything, incl. quotes, commas, backslashes, unicode
numbers = st.one_of(
    st.integers(-10**12, 10**12).map(str),
    st.decimals(allow_nan=False, allow_infinity=False, places=4, min_value=-10**6, max_value=10**6).map(str),
    st.sampled_from(["1e3", "-2.5E-3", ".5", "+7", "0.0", "1e39"]),
)


def _quote(v: str) -> str:
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


clause_text = st.one_of(
    st.builds(lambda k, vs: f"{k}=" + "|".join(_quote(v) for v in vs), keys, st.lists(values, min_size=1, max_size=3)),
    st.builds(lambda k, vs: f"{k} != " + " | ".join(_quote(v) for v in vs), keys, st.lists(values, min_size=1, max_size=3)),
    st.builds(lambda k, op, n: f"{k}{op}{n}", keys, st.sampled_from([">", ">=", "<", "<="]), numbers),
    keys,
    keys.map(lambda k: "!" + k),
)
filter_text = st.lists(clause_text, min_size=1, max_size=8).map(lambda cs: " , ".join(cs))
headers = st.dictionaries(st.one_of(keys, st.text(max_size=4)),
                          st.one_of(values, numbers, st.sampled_from(["", "nan", "1e999999", "-0"])), max_size=6)


@settings(max_examples=200, deadline=None)
@given(filter_text)
def test_canonical_round_trip(text):
    f = parse_filter(text)
    canon = str(f)
    g = parse_filter(canon)
    assert g == f and hash(g) == hash(f) and str(g) == canon
    assert isinstance(f, Filter)


@settings(max_examples=200, deadline=None)
@given(filter_text, headers)
def test_evaluation_never_raises_and_canonical_form_agrees(text, hdrs):
    f = parse_filter(text)
    result = f.matches(hdrs)
    assert isinstance(result, bool)
    assert parse_filter(str(f)).matches(hdrs) is result
    # AND semantics: the filter holds exactly when each single-clause filter holds
    assert result == all(parse_filter(str(c)).matches(hdrs) for c in f.clauses)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_arbitrary_text_parses_or_raises_bad_filter(text):
    try:
        f = parse_filter(text)
    except BadFilterError:
        return
    assert parse_filter(str(f)) == f
