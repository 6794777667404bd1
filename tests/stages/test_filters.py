"""Tests for the safe ``--filter`` expression language."""
from __future__ import annotations

import ast
import builtins
import operator
import pickle
import re
from pathlib import Path

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dask_imgcurator.stages import filters as filters_module
from dask_imgcurator.stages.filters import (
    MAX_FILTER_DEPTH,
    MAX_FILTER_LENGTH,
    And,
    Column,
    Compare,
    Filter,
    FilterSyntaxError,
    Number,
    Or,
    drop_reason,
    parse_filter,
    parse_filters,
)


@pytest.fixture(scope="module")
def df() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "aesthetic_score": [1.0, 4.0, 5.0, 6.5, 8.0, np.nan, 9.5, 5.0],
            "nsfw_score": [0.1, 0.6, 0.2, np.nan, 0.4, 0.1, 0.9, 0.5],
            "width": pd.array([128, 256, 512, None, 1024, 300, 64, 256], dtype="Int64"),
            "caption": ["a cat", "", None, "dog", "a cat", "x", "it's", "dog"],
            "error": [None, "timeout", None, None, "decode", None, None, None],
            "is_dup": [False, True, False, False, True, False, False, True],
            "n": np.arange(8),
        }
    )


@pytest.fixture(scope="module")
def ddf(df) -> dd.DataFrame:
    return dd.from_pandas(df, npartitions=2)


# (filter text, equivalent hand-written pandas expression)
CASES = [
    ("aesthetic_score >= 5", lambda d: d.aesthetic_score >= 5),
    (
        "aesthetic_score >= 5 and nsfw_score < 0.5",
        lambda d: (d.aesthetic_score >= 5) & (d.nsfw_score < 0.5),
    ),
    (
        "aesthetic_score>=5 AND nsfw_score<.5",
        lambda d: (d.aesthetic_score >= 5) & (d.nsfw_score < 0.5),
    ),
    ("5 <= aesthetic_score", lambda d: d.aesthetic_score >= 5),
    ("aesthetic_score != 5", lambda d: (d.aesthetic_score != 5) & d.aesthetic_score.notna()),
    ("aesthetic_score == 5.0", lambda d: d.aesthetic_score == 5),
    ("aesthetic_score > -1e1", lambda d: d.aesthetic_score > -10),
    ("width > 256", lambda d: (d.width > 256).fillna(False)),
    ("width <= 2.56E+2", lambda d: (d.width <= 256).fillna(False)),
    ("width != 256", lambda d: (d.width != 256).fillna(False)),
    ("n < 3 or n >= 6", lambda d: (d.n < 3) | (d.n >= 6)),
    ("caption == 'a cat'", lambda d: d.caption == "a cat"),
    ('caption == "it\'s"', lambda d: d.caption == "it's"),
    ("caption == 'it\\'s'", lambda d: d.caption == "it's"),
    ("caption != ''", lambda d: (d.caption != "") & d.caption.notna()),
    ("caption > 'b'", lambda d: (d.caption > "b").fillna(False)),
    ("error is null", lambda d: d.error.isna()),
    ("error IS NOT NULL", lambda d: d.error.notna()),
    ("error is none", lambda d: d.error.isna()),
    ("is_dup == false", lambda d: ~d.is_dup),
    ("is_dup == TRUE or n == 0", lambda d: d.is_dup | (d.n == 0)),
    ("not is_dup == true", lambda d: ~d.is_dup),
    ("~(n > 2) & ~(n > 5)", lambda d: ~(d.n > 2) & ~(d.n > 5)),
    ("n > 5 | n < 1", lambda d: (d.n > 5) | (d.n < 1)),
    ("nsfw_score < aesthetic_score", lambda d: d.nsfw_score < d.aesthetic_score),
    (
        "not aesthetic_score > 5",
        lambda d: ~(d.aesthetic_score > 5),  # missing scores pass: not(False)
    ),
    (
        "4 <= aesthetic_score < 8",
        lambda d: (d.aesthetic_score >= 4) & (d.aesthetic_score < 8),
    ),
    (
        "0 < nsfw_score <= aesthetic_score < 9",
        lambda d: (d.nsfw_score > 0)
        & (d.nsfw_score <= d.aesthetic_score)
        & (d.aesthetic_score < 9),
    ),
    (
        "(aesthetic_score >= 5 or error is not null) and (caption is null or width < 300)",
        lambda d: ((d.aesthetic_score >= 5) | d.error.notna())
        & (d.caption.isna() | (d.width < 300).fillna(False)),
    ),
    (
        "error is null and not (caption == 'dog' or is_dup == true)",
        lambda d: d.error.isna() & ~((d.caption == "dog") | d.is_dup),
    ),
    ("((((n == 3))))", lambda d: d.n == 3),
    ("n == 1e20", lambda d: d.n == 1e20),
    ("n < 99999999999999999999999999", lambda d: d.n == d.n),
    ("\tn\n>\r2  ", lambda d: d.n > 2),
]


def _expected(d, fn) -> list[bool]:
    return [bool(v) for v in fn(d).tolist()]


@pytest.mark.parametrize("text, reference", CASES, ids=[c[0] for c in CASES])
def test_mask_matches_pandas(df, text, reference):
    filt = parse_filter(text)
    result = filt.mask(df)
    assert result.dtype == bool
    assert result.index.equals(df.index)
    assert result.tolist() == _expected(df, reference)
    # canonical text means the same thing
    assert parse_filter(str(filt)).mask(df).tolist() == result.tolist()


@pytest.mark.parametrize("text, reference", CASES, ids=[c[0] for c in CASES])
def test_mask_on_dask_matches_pandas(df, ddf, text, reference):
    filt = parse_filter(text)
    lazy = filt.mask(ddf)
    assert isinstance(lazy, dd.Series)
    computed = lazy.compute()
    assert computed.astype(bool).tolist() == filt.mask(df).tolist() == _expected(df, reference)
    assert computed.index.tolist() == df.index.tolist()


def test_dask_filtering_end_to_end(df, ddf):
    filt = parse_filter("aesthetic_score >= 5 and nsfw_score < 0.5")
    got = ddf[filt.mask(ddf)].compute()
    pd.testing.assert_frame_equal(got, df[filt.mask(df)], check_dtype=False)
    assert got.n.tolist() == [2, 4]


# --------------------------------------------------------------------------
# parsing: precedence, canonical text, structure
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, same_as",
    [
        ("a > 1 or b > 2 and c > 3", "a > 1 or (b > 2 and c > 3)"),
        ("a > 1 and b > 2 or c > 3", "(a > 1 and b > 2) or c > 3"),
        ("not a > 1 and b > 2", "(not a > 1) and b > 2"),
        ("not a > 1 or b > 2", "(not (a > 1)) or b > 2"),
        ("not not a > 1", "not (not (a > 1))"),
        ("a > 1 & b > 2 | c > 3", "(a > 1 and b > 2) or c > 3"),
        ("~a > 1 & b > 2", "(not a > 1) and b > 2"),
        ("a > 1 AnD b > 2 oR NoT c Is NoT nUlL", "a > 1 and b > 2 or not c is not null"),
        ("(a > 1 and b > 2) and c > 3", "a > 1 and (b > 2 and c > 3)"),
    ],
)
def test_precedence(text, same_as):
    assert parse_filter(text) == parse_filter(same_as)
    assert str(parse_filter(text)) == str(parse_filter(same_as))


def test_precedence_changes_meaning():
    assert parse_filter("(a > 1 or b > 2) and c > 3") != parse_filter("a > 1 or b > 2 and c > 3")
    assert parse_filter("not (a > 1 and b > 2)") != parse_filter("not a > 1 and b > 2")


def test_precedence_evaluated(df):
    # or binds loosest: n == 0 rows pass whatever the and-part says
    mask = parse_filter("n == 0 or n > 5 and is_dup == true").mask(df)
    assert mask.tolist() == ((df.n == 0) | ((df.n > 5) & df.is_dup)).tolist()
    mask = parse_filter("(n == 0 or n > 5) and is_dup == true").mask(df)
    assert mask.tolist() == (((df.n == 0) | (df.n > 5)) & df.is_dup).tolist()


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("aesthetic_score>=5   AND nsfw_score<0.5", "aesthetic_score >= 5 and nsfw_score < 0.5"),
        ("(a > 1)", "a > 1"),
        ("a > 1 and (b < 2 or c == 'x')", 'a > 1 and (b < 2 or c == "x")'),
        ("not (a > 1)", "not a > 1"),
        ("not (a > 1 or b > 1)", "not (a > 1 or b > 1)"),
        ("~~(x is null)", "not not x is null"),
        ("4<=x<8", "4 <= x < 8"),
        ("x == +5", "x == 5"),
        ("x == .5e1", "x == 5.0"),
        ("x == 'a\"b\\\\c'", 'x == "a\\"b\\\\c"'),
        ("x == 'C:\\data'", 'x == "C:\\\\data"'),
        ("x is None", "x is null"),
        ("x == True", "x == true"),
    ],
)
def test_canonical_text(text, canonical):
    filt = parse_filter(text)
    assert str(filt) == canonical
    assert filt.text == text
    assert parse_filter(canonical) == filt
    assert repr(filt) == f"Filter({canonical!r})"


def test_ast_structure_and_columns():
    filt = parse_filter("4 <= a < 8 or b > a and c is null")
    assert isinstance(filt.node, Or)
    first, second = filt.node.operands
    assert first == Compare((Number(4), Column("a"), Number(8)), ("<=", "<"))
    assert isinstance(second, And)
    assert filt.columns == frozenset({"a", "b", "c"})
    assert parse_filter("x > 1").columns == frozenset({"x"})


def test_string_escapes():
    assert parse_filter(r"c == 'it\'s'").node.operands[1].value == "it's"
    assert parse_filter(r'c == "say \"hi\""').node.operands[1].value == 'say "hi"'
    assert parse_filter(r"c == 'back\\slash'").node.operands[1].value == "back\\slash"
    assert parse_filter(r"c == 'C:\data'").node.operands[1].value == "C:\\data"
    assert parse_filter("c == 'two\nlines'").node.operands[1].value == "two\nlines"


def test_filter_is_immutable_hashable_picklable():
    filt = parse_filter("a > 1 and b is null")
    with pytest.raises(AttributeError):
        filt.text = "x"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        filt.node.operands = ()  # type: ignore[misc]
    assert hash(filt) == hash(parse_filter("(a>1) AND b IS NULL"))
    assert {filt, parse_filter("(a>1) AND b IS NULL")} == {filt}
    clone = pickle.loads(pickle.dumps(filt))
    assert clone == filt and clone.text == filt.text
    assert dask.base.tokenize(filt) == dask.base.tokenize(parse_filter("a>1 and b is null"))
    assert dask.base.tokenize(filt) != dask.base.tokenize(parse_filter("a>2 and b is null"))
    assert Filter("a > 1") == parse_filter("a > 1")


def test_error_is_picklable_value_error():
    with pytest.raises(ValueError) as info:
        parse_filter("a >")
    err = pickle.loads(pickle.dumps(info.value))
    assert isinstance(err, FilterSyntaxError)
    assert str(err) == str(info.value)


# --------------------------------------------------------------------------
# conditions / drop_reason
# --------------------------------------------------------------------------
def test_conditions():
    filt = parse_filter(
        "aesthetic_score>=5 and (nsfw_score<0.5 or error is null) and not is_dup==true"
    )
    conds = filt.conditions()
    assert [t for t, _ in conds] == [
        "aesthetic_score >= 5",
        "nsfw_score < 0.5 or error is null",
        "not is_dup == true",
    ]
    assert all(isinstance(f, Filter) and f.text == t for t, f in conds)
    assert conds[0][1].columns == frozenset({"aesthetic_score"})
    single = parse_filter("a > 1 or b > 2")
    assert single.conditions() == [("a > 1 or b > 2", single)]
    assert parse_filter("4 <= a < 8").conditions()[0][0] == "4 <= a < 8"


def test_conditions_of_long_compact_filter_are_not_length_limited():
    # canonical text is longer than the (accepted) original
    text = "(" + "|".join(["a<1"] * 2400) + ")&b>1"
    assert len(text) <= MAX_FILTER_LENGTH
    conds = parse_filter(text).conditions()
    assert len(conds) == 2 and len(conds[0][0]) > MAX_FILTER_LENGTH


def test_drop_reason(df):
    filt = parse_filter("aesthetic_score >= 5 and nsfw_score < 0.5 and error is null")
    reason = drop_reason(df, filt)
    assert reason.name == "drop_reason"
    assert reason.dtype == "string"
    assert reason.index.equals(df.index)
    expected = [
        "aesthetic_score >= 5",  # 1.0
        "aesthetic_score >= 5",  # 4.0
        None,  # passes
        "nsfw_score < 0.5",  # nsfw NaN
        "error is null",  # error "decode"
        "aesthetic_score >= 5",  # NaN score
        "nsfw_score < 0.5",  # 0.9
        "nsfw_score < 0.5",  # 0.5 is not < 0.5
    ]
    assert [None if pd.isna(v) else v for v in reason.tolist()] == expected
    assert reason.isna().tolist() == filt.mask(df).tolist()
    # a plain string is accepted too, and the canonical condition text is used
    again = drop_reason(df, "aesthetic_score>=5 AND nsfw_score<.5 AND error IS NULL")
    pd.testing.assert_series_equal(again, reason)


def test_drop_reason_dask(df, ddf):
    filt = parse_filter("(n < 6 or is_dup == true) and caption != 'dog' and width >= 128")
    lazy = drop_reason(ddf, filt)
    assert isinstance(lazy, dd.Series)
    got = lazy.compute()
    want = drop_reason(df, filt)
    assert [None if pd.isna(v) else v for v in got.tolist()] == [
        None if pd.isna(v) else v for v in want.tolist()
    ]
    assert want.tolist()[3] == 'caption != "dog"'
    assert pd.isna(want.tolist()[0]) and want.tolist()[6] == "n < 6 or is_dup == true"


# --------------------------------------------------------------------------
# several expressions (repeated --filter)
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "exprs, bad, message, position",
    [
        # would turn "A and B" into "A or (...)" if the texts were pasted together
        (["aesthetic_score < 5.078) or (aesthetic_score > 5.085", "nsfw_score < 0.5095"],
         0, "unmatched ')'", 23),
        (["nsfw_score < 0.5095", "(aesthetic_score < 5.078"], 1, "unclosed '('", 0),
        ([""], 0, "empty filter expression", 0),
        (["aesthetic_score >= 5", "   "], 1, "empty filter expression", 3),
    ],
)
def test_parse_filters_parses_each_expression_on_its_own(exprs, bad, message, position):
    with pytest.raises(FilterSyntaxError) as info:
        parse_filters(exprs)
    assert info.value.reason == message and info.value.text == exprs[bad]
    assert info.value.position == position
    assert "parentheses" not in str(info.value)


def test_parse_filters_is_the_and_of_the_expressions(df, ddf):
    exprs = ["aesthetic_score >= 5 or nsfw_score < 0.2", "nsfw_score < 0.5 and error is null"]
    filt = parse_filters(exprs)
    want = ((df.aesthetic_score >= 5) | (df.nsfw_score < 0.2)) & (df.nsfw_score < 0.5) & df.error.isna()
    assert filt.mask(df).tolist() == want.tolist()
    assert filt.mask(ddf).compute().tolist() == want.tolist()
    assert [t for t, _ in filt.conditions()] == [
        "aesthetic_score >= 5 or nsfw_score < 0.2", "nsfw_score < 0.5", "error is null",
    ]
    reasons = [None if pd.isna(r) else r for r in drop_reason(df, filt).tolist()]
    assert reasons == [None, "aesthetic_score >= 5 or nsfw_score < 0.2", None, "nsfw_score < 0.5",
                       "error is null", None, "nsfw_score < 0.5", "nsfw_score < 0.5"]
    assert drop_reason(ddf, filt).compute().isna().tolist() == want.tolist()
    # the same filter (and dask token) as the one expression written with its parentheses
    same = parse_filter("(aesthetic_score >= 5 or nsfw_score < 0.2) and nsfw_score < 0.5 and error is null")
    assert filt == same and str(filt) == str(same)
    assert dask.base.tokenize(filt) == dask.base.tokenize(same)
    assert filt.columns == frozenset({"aesthetic_score", "nsfw_score", "error"})
    clone = pickle.loads(pickle.dumps(filt))
    assert clone == filt and clone.text == filt.text and clone.mask(df).tolist() == want.tolist()
    assert parse_filters(["a > 1"]) == parse_filter("a > 1")


def test_parse_filters_errors_quote_the_expression_concerned(df, ddf):
    filt = parse_filters(["aesthetic_score >= 5", "nsfw > 0.5"])
    for run in (lambda: filt.validate(df), lambda: filt.mask(ddf), lambda: drop_reason(df, filt)):
        with pytest.raises(FilterSyntaxError, match="unknown column 'nsfw'") as info:
            run()
        assert info.value.text == "nsfw > 0.5" and info.value.position == 0
    with pytest.raises(FilterSyntaxError, match="cannot compare column 'caption'") as info:
        parse_filters(["n > 1", "caption > 5"]).mask(df)
    assert info.value.text == "caption > 5"


def test_parse_filters_rejects_no_expressions_and_a_bare_string():
    with pytest.raises(ValueError, match="at least one"):
        parse_filters([])
    with pytest.raises(TypeError, match="parse_filter"):
        parse_filters("a > 1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        parse_filters(["a > 1", 5])  # type: ignore[list-item]


def test_drop_reason_rejects_other_types():
    with pytest.raises(TypeError):
        drop_reason({"a": [1]}, parse_filter("a > 1"))  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------
def _caret_lines(err: FilterSyntaxError) -> tuple[str, str]:
    lines = str(err).split("\n")
    assert len(lines) == 3, str(err)
    return lines[1], lines[2]


def test_error_message_example():
    with pytest.raises(FilterSyntaxError) as info:
        parse_filter("aesthetic_score 5")
    assert str(info.value) == (
        "invalid filter: expected a comparison operator after 'aesthetic_score'\n"
        "  aesthetic_score 5\n"
        "                  ^"
    )
    assert info.value.position == 16
    assert info.value.text == "aesthetic_score 5"


@pytest.mark.parametrize(
    "text, message, position",
    [
        ("", "empty filter expression", 0),
        ("   ", "empty filter expression", 3),
        ("a >", "expected a column name or value after '>', found end of expression", 3),
        ("a > 5 and", "expected a condition after 'and', found end of expression", 9),
        ("and a > 5", "expected a condition, found 'and'", 0),
        ("a > 5 b < 2", "expected 'and', 'or' or end of expression, found 'b'", 6),
        ("(a > 5", "unclosed '('", 0),
        ("a > 5)", "unmatched ')'", 5),
        ("(a > 5 b)", "expected 'and', 'or' or ')', found 'b'", 7),
        ("()", "empty parentheses", 1),
        ("a = 5", "use '==' to test for equality", 2),
        ("a => 5", "use '==' to test for equality", 2),
        ("a <> 5", "expected a column name or value after '<', found '>'", 3),
        ("!a", "use 'not' or '!=' instead", 0),
        ("a == null", "use 'is null' or 'is not null'", 5),
        ("a is 5", "expected 'null' after 'is', found '5'", 5),
        ("a is not", "expected 'null' after 'is not', found end of expression", 8),
        ("5 is null", "'is null' needs a column name on its left", 0),
        ("5 > 3", "a comparison needs a column name on at least one side", 0),
        ("a < 5 < 6", "a comparison needs a column name on at least one side", 4),
        ("a > 'abc", "unterminated string literal", 4),
        ("a > 5abc", "invalid number '5a'", 5),
        ("a > 1.2.3", "invalid number '1.2.'", 7),
        ("a > 1e999", "out of range", 4),
        ("a > 1_000", "invalid number", 5),
        ("a > - 5", "arithmetic is not supported", 4),
        ("a + 1 > 5", "arithmetic is not supported", 2),
        ("a > 1 && b > 2", "expected a condition after '&', found '&'", 7),
        ("a > 5 or or b > 1", "expected a condition after 'or', found 'or'", 9),
        ("not", "expected a condition after 'not', found end of expression", 3),
        ("and > 5", "expected a condition, found 'and'", 0),
        ("a\u00a0> 5", "unexpected character '\\xa0'", 1),
        ("größe > 5", "unexpected character 'ö'", 2),
    ],
)
def test_error_messages_with_caret(text, message, position):
    with pytest.raises(FilterSyntaxError) as info:
        parse_filter(text)
    err = info.value
    assert str(err).startswith("invalid filter: ")
    assert message in err.reason
    assert err.position == position
    shown, caret = _caret_lines(err)
    assert caret == "  " + " " * position + "^"
    assert shown.strip() == text.replace("\u00a0", " ").strip() or not text.strip()


@pytest.mark.parametrize("digits", [310, 400, 5000])
def test_a_whole_number_beyond_a_floats_range_is_out_of_range(digits):
    """It was accepted and then crashed the mask with OverflowError (or Python's 4300-digit limit)."""
    text = "width > 1" + "0" * (digits - 1)
    with pytest.raises(FilterSyntaxError) as info:
        parse_filter(text)
    assert info.value.reason == f"number 1000000000...0000000000 ({digits} characters) is out of range"
    assert info.value.position == 8


def test_a_whole_number_within_a_floats_range_still_compares():
    frame = pd.DataFrame({"width": [1, 2]})
    assert parse_filter("width < 1" + "0" * 300).mask(frame).tolist() == [True, True]


def test_the_caret_counts_wide_characters_as_two_columns():
    with pytest.raises(FilterSyntaxError) as info:
        parse_filter("caption == '日本語' and 5 5")
    shown, caret = _caret_lines(info.value)
    assert shown == "  caption == '日本語' and 5 5"
    assert caret == "  " + " " * (len("caption == '' and 5 ") + 6) + "^"


def test_error_caret_on_multiline_and_long_text():
    with pytest.raises(FilterSyntaxError) as info:
        parse_filter("a > 1\n  and b c")
    shown, caret = _caret_lines(info.value)
    assert shown == "    and b c"
    assert caret == "  " + " " * 8 + "^"
    long_text = " or ".join(f"col{i} > {i}" for i in range(300)) + " oops"
    with pytest.raises(FilterSyntaxError) as info:
        parse_filter(long_text)
    shown, caret = _caret_lines(info.value)
    assert len(shown) < 100 and shown.startswith("  ...")
    assert shown[caret.index("^") : caret.index("^") + 4] == "oops"


def test_unknown_column(df):
    filt = parse_filter("aesthetic_score >= 5 and nsfw > 0.5")
    with pytest.raises(FilterSyntaxError) as info:
        filt.validate(df.columns)
    message = str(info.value)
    assert "unknown column 'nsfw'" in message
    assert "did you mean 'nsfw_score'?" in message
    assert "available columns: aesthetic_score, nsfw_score, width, caption" in message
    shown, caret = _caret_lines(info.value)
    assert caret.index("^") - 2 == filt.text.index("nsfw >")
    with pytest.raises(FilterSyntaxError, match="unknown column 'nsfw'"):
        filt.mask(df)
    with pytest.raises(FilterSyntaxError, match="unknown column 'nsfw'"):
        drop_reason(df, filt)
    with pytest.raises(FilterSyntaxError, match="unknown column 'zzz'.*available columns: a, b"):
        parse_filter("a > 1 or zzz is null").validate(["a", "b"])
    assert parse_filter("a > 1").validate(["a"]).text == "a > 1"
    assert parse_filter("a > 1").validate({"a": np.dtype("float64")}) == parse_filter("a>1")


def test_unknown_column_dask(ddf):
    with pytest.raises(FilterSyntaxError, match="unknown column 'missing'"):
        parse_filter("missing > 1").mask(ddf)


@pytest.mark.parametrize(
    "text, message",
    [
        ("caption > 5", "cannot compare column 'caption' (str) with number 5"),
        ("aesthetic_score == 'x'", "cannot compare column 'aesthetic_score' (float64) with string"),
        ("5 < caption", "cannot compare number 5 with column 'caption'"),
        ("caption == true", "with boolean true"),
        ("caption < width", "cannot compare column 'caption'"),
    ],
)
def test_type_mismatch_is_reported_eagerly(df, ddf, text, message):
    with pytest.raises(FilterSyntaxError) as info:
        parse_filter(text).mask(df)
    assert message in str(info.value)
    with pytest.raises(FilterSyntaxError):
        parse_filter(text).mask(ddf)


@pytest.fixture(scope="module")
def nested_df() -> pd.DataFrame:
    rows = [[0.6, 0.8], None, [1.0, 0.0]]
    return pd.DataFrame({
        "embedding": pd.Series(rows, dtype=pd.ArrowDtype(pa.list_(pa.float32(), 2))),
        "boxes": pd.Series([[1], [], None], dtype=pd.ArrowDtype(pa.list_(pa.int64()))),
        "meta": pd.Series([{"w": 1}, {"w": 2}, None], dtype=pd.ArrowDtype(pa.struct([("w", pa.int64())]))),
        "aesthetic_score": np.array([5.0, 6.0, 7.0], dtype=np.float32),
    })


@pytest.mark.parametrize(
    "text, column, position",
    [
        ("embedding > 0", "embedding", 0),
        ("0 < embedding", "embedding", 4),
        ("aesthetic_score >= 5 and aesthetic_score < embedding", "embedding", 43),
        ("boxes == 1", "boxes", 0),
        ("meta != 'x'", "meta", 0),
    ],
)
def test_comparing_a_list_column_is_rejected_before_any_work(nested_df, text, column, position):
    lazy = dd.from_pandas(nested_df, npartitions=1)
    dtype = nested_df[column].dtype
    for run in (lambda: parse_filter(text).validate(lazy._meta), lambda: parse_filter(text).mask(lazy),
                lambda: parse_filter(text).mask(nested_df), lambda: drop_reason(lazy, text)):
        with pytest.raises(FilterSyntaxError) as info:
            run()
        first_line = str(info.value).split("\n")[0]
        assert first_line.startswith(f"invalid filter: cannot compare column {column!r} ({dtype}): it holds a list")
        assert info.value.position == position


def test_list_columns_can_still_be_tested_for_null(nested_df):
    assert parse_filter("embedding is not null").mask(nested_df).tolist() == [True, False, True]
    lazy = dd.from_pandas(nested_df, npartitions=1)
    assert parse_filter("meta is null or aesthetic_score > 6").mask(lazy).compute().tolist() == [False, False, True]


def test_arrays_in_an_object_column_give_a_filter_error():
    frame = pd.DataFrame({"emb": pd.Series([np.ones(2), np.zeros(2)], dtype=object)})
    with pytest.raises(FilterSyntaxError, match=r"cannot compare column 'emb' \(object\) with 0"):
        parse_filter("emb > 0").mask(frame)


# --------------------------------------------------------------------------
# limits
# --------------------------------------------------------------------------
def test_length_limit():
    text = "a > 1 or " * 1200 + "a > 1"
    assert len(text) > MAX_FILTER_LENGTH
    with pytest.raises(FilterSyntaxError, match="too long"):
        parse_filter(text)
    ok = ("a > 1 or " * 1000 + "a > 2")
    assert len(ok) <= MAX_FILTER_LENGTH
    assert len(parse_filter(ok).node.operands) == 1001


@pytest.mark.parametrize(
    "opener, closer, levels_each",
    [("(", ")", 1), ("not ", "", 1), ("~", "", 1), ("~(", ")", 2), ("(not ", ")", 2)],
)
def test_depth_limit_without_recursion_error(opener, closer, levels_each):
    def nested(depth):
        return opener * depth + "a > 1" + closer * depth

    parse_filter(nested(MAX_FILTER_DEPTH // levels_each))
    as_deep_as_allowed_length = (MAX_FILTER_LENGTH - 5) // len(opener + closer)
    for depth in (MAX_FILTER_DEPTH // levels_each + 1, as_deep_as_allowed_length):
        with pytest.raises(FilterSyntaxError, match="nested too deeply"):
            parse_filter(nested(depth))


def test_deep_but_allowed_filter_evaluates(df):
    text = "not " * 100 + "n > 3"
    assert parse_filter(text).mask(df).tolist() == (df.n > 3).tolist()
    text = "(" * 100 + "n > 3" + ")" * 100
    assert parse_filter(text).mask(df).tolist() == (df.n > 3).tolist()


def test_non_string_input():
    with pytest.raises(TypeError):
        parse_filter(None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# hostile input
# --------------------------------------------------------------------------
HOSTILE = [
    "__import__('os').system('touch {marker}')",
    "aesthetic_score.__class__",
    "aesthetic_score.__class__.__bases__[0].__subclasses__()",
    "open('{marker}', 'w')",
    "open('{marker}') == 1",
    "lambda: __import__('os')",
    "(lambda x: x)(1) > 0",
    "a.b > 1",
    "len(caption) > 5",
    "exec('import os') > 0",
    "eval('1') == 1",
    "caption[0] == 'a'",
    "caption['a'] == 'a'",
    "f'{{__import__(\"os\")}}' == 'x'",
    "F\"x\" == 'x'",
    "a > 1; __import__('os').system('touch {marker}')",
    "`a` > 1",
    "`__import__('os').system('touch {marker}')` > 0",
    "@a > 1",
    "a > 1 if True else 0",
    "[x for x in ()] == 1",
    "{{}} == 1",
    "a > 1 # comment",
    "a > 1 and __import__",
    "os.system('touch {marker}')",
    "a.str.len() > 1",
    "a > @b",
    "$a > 1",
    "a > 1 \\\n and b < 2",
    "a == 'x' 'y'",
    "a == b'x'",
    "a == r'x'",
    "a ** 2 > 1",
    "a := 1",
    "import os",
    "a > 1\x00",
]


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_input_rejected_and_nothing_executed(template, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    text = template.format(marker=marker)

    def forbidden(*args, **kwargs):
        raise AssertionError("user text must never reach eval/exec/compile/ast")

    # parse_filter must not evaluate or even compile anything
    with monkeypatch.context() as m:
        m.setattr(builtins, "eval", forbidden)
        m.setattr(builtins, "exec", forbidden)
        m.setattr(builtins, "compile", forbidden)
        m.setattr(ast, "parse", forbidden)
        with pytest.raises(FilterSyntaxError):
            parse_filter(text)
    assert not marker.exists()


def test_valid_filters_never_compile(df, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("user text must never reach eval/exec/compile/ast")

    with monkeypatch.context() as m:
        m.setattr(builtins, "eval", forbidden)
        m.setattr(builtins, "exec", forbidden)
        m.setattr(ast, "parse", forbidden)
        filt = parse_filter("__import__ > 1 or open == 'x' or os is null")
    assert filt.columns == frozenset({"__import__", "open", "os"})
    # they are just column names
    frame = pd.DataFrame({"__import__": [0, 2], "open": ["x", "y"], "os": [1.0, None]})
    assert filt.mask(frame).tolist() == [True, True]


def test_module_source_has_no_dynamic_evaluation():
    source = Path(filters_module.__file__).read_text()
    tree = ast.parse(source)  # our own source, not user text
    called = {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert not called & {"eval", "exec", "compile", "__import__", "getattr"}
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    } | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "ast" not in imported
    assert not re.search(r"\.query\(|\.eval\(|pd\.eval", source)


# --------------------------------------------------------------------------
# hypothesis: fuzzing
# --------------------------------------------------------------------------
TOKEN_SOUP = [
    "a", "b", "score", "_x1", "and", "or", "not", "AND", "Or", "is", "null", "none", "true",
    "false",
    "&", "|", "~", "(", ")", "<", "<=", ">", ">=", "==", "!=", "=", "!", "5", "-1.5", "+.5", "1e3",
    "1e", "'s'", '"t"', "'", '"', "\\", ".", ",", "[", "]", " ", "\t", "\n", "__class__", "0x1f",
    "é", "\x00", "`", ";",
]


def _check_total(text: str) -> None:
    try:
        filt = parse_filter(text)
    except FilterSyntaxError as err:
        assert str(err).startswith("invalid filter: ")
        assert err.position is None or 0 <= err.position <= len(text)
        return
    assert isinstance(filt, Filter)
    # canonical text round-trips to the same tree and the same text
    again = parse_filter(str(filt))
    assert again == filt
    assert str(again) == str(filt)
    assert filt.columns == again.columns
    for cond_text, cond in filt.conditions():
        assert str(cond) == cond_text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=120))
def test_fuzz_arbitrary_text(text):
    _check_total(text)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(TOKEN_SOUP), max_size=25),
    st.sampled_from(["", " "]),
)
def test_fuzz_token_soup(tokens, sep):
    _check_total(sep.join(tokens))


# --------------------------------------------------------------------------
# hypothesis: random valid expressions vs an independent row-wise reference
# --------------------------------------------------------------------------
STRINGS = ["a", "b", "", "it's", 'say "hi"', "back\\slash", "B"]

PROP_DF = pd.DataFrame(
    {
        "x": [0.0, 1.5, np.nan, 5.0, -1.0, 2.5, 10.0, np.nan, 5.0, 0.5],
        "y": pd.array([1, None, 5, 0, -1, 10, None, 2, 5, 3], dtype="Int64"),
        "z": np.array([5, 0, 1, 2, 10, -1, 3, 5, 0, 2], dtype="int64"),
        "s": ["a", None, "b", "", "it's", 'say "hi"', "back\\slash", "B", "a", None],
    }
)
NUMERIC = ["x", "y", "z"]
PROP_ROWS = [
    {k: (None if pd.isna(v) else v) for k, v in row.items()}
    for row in PROP_DF.astype(object).to_dict("records")
]

# (literal text, value)
NUMBER_LITERALS = [
    ("0", 0), ("5", 5), ("+5", 5), ("5.0", 5.0), ("0.5e1", 5.0), (".5", 0.5), ("-1", -1),
    ("-1.0", -1.0), ("1e-1", 0.1), ("2.5", 2.5), ("10", 10), ("1E1", 10.0), ("3", 3),
]
CMP = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt,
    ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
}
PREC = {"or": 1, "and": 2, "not": 3, "atom": 4}


def _quote(value: str, quote: str) -> str:
    return quote + value.replace("\\", "\\\\").replace(quote, "\\" + quote) + quote


@st.composite
def numeric_comparison(draw):
    n = draw(st.integers(1, 3))  # number of operators in the chain
    operands = []
    for i in range(n + 1):
        previous_is_column = i > 0 and operands[-1][0] == "col"
        if i > 0 and not previous_is_column:
            kind = "col"
        else:
            kind = draw(st.sampled_from(["col", "col", "num"]))
        if kind == "col":
            operands.append(("col", draw(st.sampled_from(NUMERIC))))
        else:
            operands.append(("num", draw(st.sampled_from(NUMBER_LITERALS))))
    ops = draw(st.lists(st.sampled_from(list(CMP)), min_size=n, max_size=n))
    return ("cmp", operands, ops, draw(st.sampled_from([" ", "", "  "])))


@st.composite
def string_comparison(draw):
    literal = ("str", draw(st.sampled_from(STRINGS)), draw(st.sampled_from(["'", '"'])))
    column = ("col", "s")
    operands = [column, literal] if draw(st.booleans()) else [literal, column]
    return ("cmp", operands, [draw(st.sampled_from(list(CMP)))], " ")


leaves = st.one_of(
    numeric_comparison(),
    string_comparison(),
    st.tuples(
        st.just("isnull"),
        st.sampled_from(NUMERIC + ["s"]),
        st.booleans(),
        st.sampled_from(["is", "IS", "Is"]),
        st.sampled_from(["null", "NULL", "None"]),
    ),
)


def _extend(children):
    return st.one_of(
        st.tuples(st.just("not"), children, st.sampled_from(["not ", "NOT ", "~", "~ "])),
        st.tuples(
            st.just("and"), st.lists(children, min_size=2, max_size=3),
            st.sampled_from([" and ", " AND ", "&", " & "]),
        ),
        st.tuples(
            st.just("or"), st.lists(children, min_size=2, max_size=3),
            st.sampled_from([" or ", " Or ", "|", " | "]),
        ),
        st.tuples(st.just("paren"), children),
    )


trees = st.recursive(leaves, _extend, max_leaves=8)


def render(tree) -> tuple[str, int]:
    """Render a generated tree as filter text; returns (text, precedence)."""
    kind = tree[0]
    if kind == "cmp":
        _, operands, ops, ws = tree
        parts = []
        for operand in operands:
            if operand[0] == "col":
                parts.append(operand[1])
            elif operand[0] == "num":
                parts.append(operand[1][0])
            else:
                parts.append(_quote(operand[1], operand[2]))
        text = parts[0]
        for op, part in zip(ops, parts[1:]):
            text += ws + op + ws + part
        return text, PREC["atom"]
    if kind == "isnull":
        _, column, negated, is_kw, null_kw = tree
        return f"{column} {is_kw} {'not ' if negated else ''}{null_kw}", PREC["atom"]
    if kind == "paren":
        return "(" + render(tree[1])[0] + ")", PREC["atom"]
    if kind == "not":
        text, prec = render(tree[1])
        if prec < PREC["not"]:
            text = f"({text})"
        return tree[2] + text, PREC["not"]
    # and / or
    _, children, joiner = tree
    mine = PREC[kind]
    texts = []
    for child in children:
        text, prec = render(child)
        if prec < mine:
            text = f"({text})"
        texts.append(text)
    return joiner.join(texts), mine


def reference(tree, row) -> bool:
    """Independent row-wise evaluation with 'null compares False' semantics."""
    kind = tree[0]
    if kind == "cmp":
        _, operands, ops, _ = tree
        values = []
        for operand in operands:
            if operand[0] == "col":
                values.append(row[operand[1]])
            elif operand[0] == "num":
                values.append(operand[1][1])
            else:
                values.append(operand[1])
        return all(
            left is not None and right is not None and CMP[op](left, right)
            for left, op, right in zip(values, ops, values[1:])
        )
    if kind == "isnull":
        return (row[tree[1]] is None) != tree[2]
    if kind == "paren":
        return reference(tree[1], row)
    if kind == "not":
        return not reference(tree[1], row)
    results = [reference(child, row) for child in tree[1]]
    return all(results) if kind == "and" else any(results)


def top_level_conditions(tree) -> list:
    while tree[0] == "paren":
        tree = tree[1]
    if tree[0] != "and":
        return [tree]
    out = []
    for child in tree[1]:
        out.extend(top_level_conditions(child))
    return out


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees)
def test_random_valid_expressions_match_reference(tree):
    text, _ = render(tree)
    filt = parse_filter(text)
    expected = [reference(tree, row) for row in PROP_ROWS]
    assert filt.mask(PROP_DF).tolist() == expected, text
    # the canonical form means the same
    assert parse_filter(str(filt)).mask(PROP_DF).tolist() == expected
    # conditions: flattened top-level and-terms, in order
    conds = top_level_conditions(tree)
    assert len(filt.conditions()) == len(conds)
    for (_, cond), sub in zip(filt.conditions(), conds):
        assert cond.mask(PROP_DF).tolist() == [reference(sub, row) for row in PROP_ROWS]
    # drop_reason names the first failing top-level condition
    reasons = drop_reason(PROP_DF, filt).tolist()
    cond_texts = [t for t, _ in filt.conditions()]
    for row, reason, passed in zip(PROP_ROWS, reasons, expected):
        if passed:
            assert pd.isna(reason)
        else:
            first = next(i for i, c in enumerate(conds) if not reference(c, row))
            assert reason == cond_texts[first]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees)
def test_random_valid_expressions_on_dask(tree):
    text, _ = render(tree)
    filt = parse_filter(text)
    ddf = dd.from_pandas(PROP_DF, npartitions=2)
    expected = [reference(tree, row) for row in PROP_ROWS]
    assert filt.mask(ddf).compute().astype(bool).tolist() == expected, text
