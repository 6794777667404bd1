"""Safe row filters written as small boolean expressions.

This module implements the ``--filter`` mini-language used by the curation
CLI, for example::

    --filter "aesthetic_score >= 5 and nsfw_score < 0.5"
    --filter "4 <= aesthetic_score < 8 and (error is null or retries == 0)"
    --filter "caption != '' and not width < 256"

The text is tokenised and parsed by a small hand-written recursive-descent
parser into an immutable syntax tree; **nothing in the user's text is ever
evaluated as Python** (no ``eval``/``exec``/``compile`` and no use of the
:mod:`ast` module).  The tree is then turned into ordinary vectorised
comparisons on a DataFrame, so the same :class:`Filter` works on pandas, Dask
and (for :meth:`Filter.mask`) cuDF / dask-cuDF frames.

Grammar
-------
::

    filter     := or_expr END
    or_expr    := and_expr (("or" | "|") and_expr)*
    and_expr   := not_expr (("and" | "&") not_expr)*
    not_expr   := ("not" | "~") not_expr | "(" or_expr ")" | condition
    condition  := operand (CMP operand)+            # chains allowed: 4 <= x < 8
                | column "is" ["not"] "null"
    operand    := column | number | string | "true" | "false"
    CMP        := "<" | "<=" | ">" | ">=" | "==" | "!="

* Keywords (``and or not is null none true false``) are case-insensitive and
  reserved; ``none`` is a synonym of ``null``.
* ``&``, ``|`` and ``~`` are synonyms of ``and``, ``or`` and ``not`` and have
  the *same* (boolean) precedence, i.e. ``a > 1 & b < 2`` means
  ``(a > 1) and (b < 2)``.  Precedence is ``not`` > ``and`` > ``or``.
* Column names are ASCII identifiers ``[A-Za-z_][A-Za-z0-9_]*``.
* Numbers: ``5``, ``-3``, ``+0.5``, ``.5``, ``1e-3``, ``2.5E+4``.
* Strings: single or double quoted; inside them ``\\\\``, ``\\'`` and ``\\"``
  are escapes, any other backslash is kept literally.

Null handling
-------------
A comparison involving a missing value (``NaN``, ``None``, ``pd.NA``) is
``False`` -- including ``!=``.  Boolean logic is ordinary two-valued logic on
those results, so ``not (x > 5)`` *is* true for rows where ``x`` is missing.
Use ``x is null`` / ``x is not null`` to test for missing values explicitly.
"""

from __future__ import annotations

import difflib
import math
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import numpy as np
import pandas as pd

__all__ = [
    "MAX_FILTER_DEPTH",
    "MAX_FILTER_LENGTH",
    "And",
    "Boolean",
    "Column",
    "Compare",
    "Filter",
    "FilterSyntaxError",
    "IsNull",
    "Not",
    "Number",
    "Or",
    "String",
    "drop_reason",
    "parse_filter",
    "parse_filters",
]

#: Longest accepted filter expression, in characters.
MAX_FILTER_LENGTH = 10_000
#: Deepest accepted nesting of parentheses and ``not`` operators.
MAX_FILTER_DEPTH = 100

_CMP_OPS = ("<", "<=", ">", ">=", "==", "!=")
_FLIPPED = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
_KEYWORDS = {"and", "or", "not", "is", "null", "none", "true", "false"}
_WHITESPACE = " \t\r\n\f\v"
_INT64_MAX = 2**63 - 1


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------
class FilterSyntaxError(ValueError):
    """A filter expression is malformed, unsafe or does not fit the data.

    The message names the problem and, when it has a position, shows the
    offending line of the expression with a caret under the position::

        invalid filter: expected a comparison operator after 'aesthetic_score'
          aesthetic_score 5
                          ^

    Parameters
    ----------
    reason : str
        Short description of the problem (without the ``invalid filter:``
        prefix).
    text : str
        The filter expression.
    position : int or None
        0-based character offset in `text` the problem points at, or None.

    Attributes
    ----------
    reason, text, position
        As passed in.
    """

    def __init__(self, reason: str, text: str, position: int | None = None):
        self.reason = reason
        self.text = text
        self.position = position
        super().__init__(_format_error(reason, text, position))

    def __reduce__(self):  # keep picklable despite the custom __init__
        return (type(self), (self.reason, self.text, self.position))


def _format_error(reason: str, text: str, position: int | None) -> str:
    message = f"invalid filter: {reason}"
    if position is None:
        return message
    position = max(0, min(position, len(text)))
    line_start = text.rfind("\n", 0, position) + 1
    line_end = text.find("\n", position)
    if line_end == -1:
        line_end = len(text)
    line = text[line_start:line_end]
    column = position - line_start
    # Keep the excerpt short for long expressions.
    width = 76
    if len(line) > width:
        start = max(0, min(column - width // 2, len(line) - width))
        prefix = "..." if start > 0 else ""
        suffix = "..." if start + width < len(line) else ""
        line = prefix + line[start : start + width] + suffix
        column = column - start + len(prefix)
    line = "".join(" " if (ch in _WHITESPACE or not ch.isprintable()) else ch for ch in line)
    return f"{message}\n  {line}\n  {' ' * _display_width(line[:column])}^"


def _display_width(text: str) -> int:
    """Terminal columns of ``text``: wide (CJK) characters take two, combining marks none."""
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


# --------------------------------------------------------------------------
# syntax tree
# --------------------------------------------------------------------------
# ``pos`` fields are the 0-based offsets of the node in the text it was
# parsed from; they are ignored by ``==`` and ``hash``.


@dataclass(frozen=True)
class Column:
    """Reference to a DataFrame column."""

    name: str
    pos: int = field(default=0, compare=False, repr=False)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Number:
    """Numeric literal (``int`` or finite ``float``)."""

    value: Union[int, float]
    pos: int = field(default=0, compare=False, repr=False)

    def __str__(self) -> str:
        return repr(self.value)


@dataclass(frozen=True)
class String:
    """String literal."""

    value: str
    pos: int = field(default=0, compare=False, repr=False)

    def __str__(self) -> str:
        return '"' + self.value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class Boolean:
    """``true`` / ``false`` literal."""

    value: bool
    pos: int = field(default=0, compare=False, repr=False)

    def __str__(self) -> str:
        return "true" if self.value else "false"


Operand = Union[Column, Number, String, Boolean]


@dataclass(frozen=True)
class Compare:
    """(Possibly chained) comparison ``operands[0] ops[0] operands[1] ...``.

    ``a < b < c`` means ``a < b and b < c``.
    """

    operands: tuple  # tuple[Operand, ...], len(ops) + 1 items
    ops: tuple  # tuple[str, ...]
    pos: int = field(default=0, compare=False, repr=False)

    def __str__(self) -> str:
        parts = [str(self.operands[0])]
        for op, operand in zip(self.ops, self.operands[1:]):
            parts += [op, str(operand)]
        return " ".join(parts)


@dataclass(frozen=True)
class IsNull:
    """``column is null`` (or ``column is not null`` when `negated`)."""

    column: Column
    negated: bool = False
    pos: int = field(default=0, compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.column} is {'not ' if self.negated else ''}null"


@dataclass(frozen=True)
class Not:
    """Logical negation."""

    operand: Any
    pos: int = field(default=0, compare=False, repr=False)

    def __str__(self) -> str:
        return "not " + _wrap(self.operand, _PREC_NOT)


@dataclass(frozen=True)
class And:
    """Logical conjunction of two or more operands (flattened)."""

    operands: tuple
    pos: int = field(default=0, compare=False, repr=False)

    def __str__(self) -> str:
        return " and ".join(_wrap(o, _PREC_AND) for o in self.operands)


@dataclass(frozen=True)
class Or:
    """Logical disjunction of two or more operands (flattened)."""

    operands: tuple
    pos: int = field(default=0, compare=False, repr=False)

    def __str__(self) -> str:
        return " or ".join(_wrap(o, _PREC_OR) for o in self.operands)


Node = Union[Compare, IsNull, Not, And, Or]

_PREC_OR, _PREC_AND, _PREC_NOT, _PREC_ATOM = 1, 2, 3, 4


def _precedence(node: Any) -> int:
    if isinstance(node, Or):
        return _PREC_OR
    if isinstance(node, And):
        return _PREC_AND
    if isinstance(node, Not):
        return _PREC_NOT
    return _PREC_ATOM


def _wrap(node: Any, parent_prec: int) -> str:
    text = str(node)
    # ``not`` only binds atoms and other ``not``s; and/or need the child to
    # bind at least as tightly as themselves (they are flattened anyway).
    if _precedence(node) < parent_prec:
        return f"({text})"
    return text


# --------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Token:
    kind: str  # NAME NUMBER STRING OP AND OR NOT IS NULL TRUE FALSE LPAREN RPAREN END
    text: str
    pos: int
    value: Any = None


_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NUMBER_TAIL_RE = re.compile(r"[A-Za-z0-9_.]")
_STRING_RES = {
    "'": re.compile(r"'(?:[^'\\]|\\.)*'", re.DOTALL),
    '"': re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL),
}
_STRING_ESCAPE_RE = re.compile(r"\\([\\'\"])")
_SYMBOLS = {
    "<=": "OP",
    ">=": "OP",
    "==": "OP",
    "!=": "OP",
    "<": "OP",
    ">": "OP",
    "&": "AND",
    "|": "OR",
    "~": "NOT",
    "(": "LPAREN",
    ")": "RPAREN",
}
_SYMBOL_HINTS = {
    "=": "use '==' to test for equality",
    "!": "use 'not' or '!=' instead",
    ".": "attribute access is not supported",
    "[": "subscripts are not supported",
    "]": "subscripts are not supported",
    ",": "lists and function arguments are not supported",
    ";": "only a single expression is allowed",
    "`": "backtick quoting is not supported; column names must be plain identifiers",
    "+": "arithmetic is not supported",
    "-": "arithmetic is not supported",
    "*": "arithmetic is not supported",
    "/": "arithmetic is not supported",
    "%": "arithmetic is not supported",
}


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos, n = 0, len(text)
    while True:
        while pos < n and text[pos] in _WHITESPACE:
            pos += 1
        if pos >= n:
            tokens.append(_Token("END", "", n))
            return tokens
        ch = text[pos]
        if ch == "_" or ("A" <= ch <= "Z") or ("a" <= ch <= "z"):
            m = _NAME_RE.match(text, pos)
            word = m.group()
            lower = word.lower()
            if lower in _KEYWORDS:
                kind = {"none": "NULL"}.get(lower, lower.upper())
                tokens.append(_Token(kind, word, pos))
            else:
                tokens.append(_Token("NAME", word, pos, word))
            pos = m.end()
            continue
        m = _NUMBER_RE.match(text, pos) if ch in "0123456789.+-" else None
        if m is not None:
            if m.end() < n and _NUMBER_TAIL_RE.match(text, m.end()):
                raise FilterSyntaxError(
                    f"invalid number {text[pos:m.end() + 1]!r}", text, m.end()
                )
            literal = m.group()
            digits = literal.lstrip("+-")
            if re.fullmatch(r"[+-]?[0-9]+", literal):
                # beyond a float's range it could be compared with nothing (nor converted past 4300 digits)
                if len(digits.lstrip("0")) > 309 or abs(int(literal)) > sys.float_info.max:
                    raise FilterSyntaxError(f"number {_shortened(literal)} is out of range", text, pos)
                value: Union[int, float] = int(literal)
            else:
                value = float(literal)
                if not math.isfinite(value):
                    raise FilterSyntaxError(f"number {_shortened(literal)} is out of range", text, pos)
            tokens.append(_Token("NUMBER", literal, pos, value))
            pos = m.end()
            continue
        if ch in _STRING_RES:
            m = _STRING_RES[ch].match(text, pos)
            if m is None:
                raise FilterSyntaxError("unterminated string literal", text, pos)
            value = _STRING_ESCAPE_RE.sub(r"\1", m.group()[1:-1])
            tokens.append(_Token("STRING", m.group(), pos, value))
            pos = m.end()
            continue
        two = text[pos : pos + 2]
        if two in _SYMBOLS:
            tokens.append(_Token(_SYMBOLS[two], two, pos))
            pos += 2
            continue
        if ch in _SYMBOLS:
            tokens.append(_Token(_SYMBOLS[ch], ch, pos))
            pos += 1
            continue
        reason = f"unexpected character {ch!r}"
        if ch in _SYMBOL_HINTS:
            reason += f" ({_SYMBOL_HINTS[ch]})"
        raise FilterSyntaxError(reason, text, pos)


# --------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------
def _describe(tok: _Token) -> str:
    return "end of expression" if tok.kind == "END" else repr(tok.text)


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0
        self.depth = 0

    # -- helpers ----------------------------------------------------------
    @property
    def tok(self) -> _Token:
        return self.tokens[self.i]

    def advance(self) -> _Token:
        tok = self.tokens[self.i]
        if tok.kind != "END":
            self.i += 1
        return tok

    def error(self, reason: str, pos: int | None = None) -> FilterSyntaxError:
        return FilterSyntaxError(reason, self.text, self.tok.pos if pos is None else pos)

    def enter(self, tok: _Token) -> None:
        self.depth += 1
        if self.depth > MAX_FILTER_DEPTH:
            raise self.error(
                f"expression is nested too deeply (more than {MAX_FILTER_DEPTH} "
                "levels of parentheses / 'not')",
                tok.pos,
            )

    # -- grammar ----------------------------------------------------------
    def parse(self) -> Node:
        if self.tok.kind == "END":
            raise self.error("empty filter expression")
        node = self.or_expr()
        tok = self.tok
        if tok.kind == "RPAREN":
            raise self.error("unmatched ')'")
        if tok.kind != "END":
            raise self.error(f"expected 'and', 'or' or end of expression, found {_describe(tok)}")
        return node

    def or_expr(self) -> Node:
        first = self.and_expr()
        items = [first]
        while self.tok.kind == "OR":
            op = self.advance()
            items.append(self.and_expr(after=op))
        return _make_nary(Or, items, first)

    def and_expr(self, after: _Token | None = None) -> Node:
        first = self.not_expr(after)
        items = [first]
        while self.tok.kind == "AND":
            op = self.advance()
            items.append(self.not_expr(after=op))
        return _make_nary(And, items, first)

    def not_expr(self, after: _Token | None = None) -> Node:
        tok = self.tok
        if tok.kind == "NOT":
            self.advance()
            self.enter(tok)
            operand = self.not_expr(after=tok)
            self.depth -= 1
            return Not(operand, pos=tok.pos)
        if tok.kind == "LPAREN":
            self.advance()
            self.enter(tok)
            if self.tok.kind == "RPAREN":
                raise self.error("empty parentheses")
            node = self.or_expr()
            if self.tok.kind != "RPAREN":
                if self.tok.kind == "END":
                    raise self.error("unclosed '('", tok.pos)
                raise self.error(
                    f"expected 'and', 'or' or ')', found {_describe(self.tok)}"
                )
            self.advance()
            self.depth -= 1
            return node
        return self.condition(after)

    def operand(self, after: _Token | None) -> Operand:
        tok = self.tok
        if tok.kind == "NAME":
            self.advance()
            return Column(tok.value, pos=tok.pos)
        if tok.kind == "NUMBER":
            self.advance()
            return Number(tok.value, pos=tok.pos)
        if tok.kind == "STRING":
            self.advance()
            return String(tok.value, pos=tok.pos)
        if tok.kind in ("TRUE", "FALSE"):
            self.advance()
            return Boolean(tok.kind == "TRUE", pos=tok.pos)
        if tok.kind == "NULL" and after is not None and after.kind == "OP":
            raise self.error(
                "cannot compare with null; use 'is null' or 'is not null' instead"
            )
        where = f" after {after.text!r}" if after is not None else ""
        if after is not None and after.kind == "OP":
            expected = "a column name or value"
        else:
            expected = "a condition"
        raise self.error(f"expected {expected}{where}, found {_describe(tok)}")

    def condition(self, after: _Token | None) -> Node:
        start = self.tok
        left = self.operand(after)
        tok = self.tok
        if tok.kind == "IS":
            self.advance()
            negated = False
            if self.tok.kind == "NOT":
                self.advance()
                negated = True
            if self.tok.kind != "NULL":
                keyword = "'is not'" if negated else "'is'"
                raise self.error(f"expected 'null' after {keyword}, found {_describe(self.tok)}")
            self.advance()
            if not isinstance(left, Column):
                raise self.error("'is null' needs a column name on its left", start.pos)
            return IsNull(left, negated, pos=start.pos)
        if tok.kind != "OP":
            if tok.kind == "LPAREN" and isinstance(left, Column):
                raise self.error("function calls are not supported")
            raise self.error(f"expected a comparison operator after {start.text!r}")
        operands, ops = [left], []
        while self.tok.kind == "OP":
            op = self.advance()
            right = self.operand(after=op)
            if not isinstance(operands[-1], Column) and not isinstance(right, Column):
                raise self.error(
                    "a comparison needs a column name on at least one side",
                    operands[-1].pos,
                )
            ops.append(op.text)
            operands.append(right)
        return Compare(tuple(operands), tuple(ops), pos=start.pos)


def _make_nary(cls, items: list, first: Any) -> Any:
    if len(items) == 1:
        return first
    flat: list = []
    for item in items:
        # (a or b) or c  ->  a or b or c : same meaning, simpler tree
        if isinstance(item, cls):
            flat.extend(item.operands)
        else:
            flat.append(item)
    return cls(tuple(flat), pos=first.pos)


def _walk(node: Any):
    stack = [node]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, (And, Or, Compare)):
            stack.extend(reversed(node.operands))
        elif isinstance(node, Not):
            stack.append(node.operand)
        elif isinstance(node, IsNull):
            stack.append(node.column)


# --------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------
def _is_nested(dtype: Any) -> bool:
    """Whether a column of this dtype holds lists, structs or maps (Arrow, cuDF, numpy) per row."""
    if isinstance(dtype, pd.ArrowDtype):
        import pyarrow as pa

        return pa.types.is_nested(dtype.pyarrow_dtype)
    if type(dtype).__name__ in ("ListDtype", "StructDtype"):  # cuDF, without importing it
        return True
    return isinstance(dtype, np.dtype) and (dtype.subdtype is not None or dtype.fields is not None)


def _dtype_kind(dtype: Any) -> str:
    """Coarse kind of a column dtype: number, bool, string, datetime, nested or other."""
    try:
        if _is_nested(dtype):
            return "nested"
        if pd.api.types.is_bool_dtype(dtype):
            return "bool"
        if pd.api.types.is_numeric_dtype(dtype):
            return "number"
        if pd.api.types.is_datetime64_any_dtype(dtype):
            return "datetime"
        if isinstance(dtype, pd.StringDtype) or (
            pd.api.types.is_string_dtype(dtype) and dtype != np.dtype(object)
        ):
            return "string"
    except TypeError:  # foreign dtype objects
        pass
    return "other"


def _operand_kind(operand: Operand, dtypes: dict) -> str:
    if isinstance(operand, Column):
        return _dtype_kind(dtypes[operand.name]) if operand.name in dtypes else "other"
    if isinstance(operand, String):
        return "string"
    if isinstance(operand, Boolean):
        return "bool"
    return "number"


_INCOMPATIBLE = {
    frozenset({"number", "string"}),
    frozenset({"bool", "string"}),
    frozenset({"datetime", "number"}),
    frozenset({"datetime", "bool"}),
}


def _describe_operand(operand: Operand, dtypes: dict) -> str:
    if isinstance(operand, Column):
        dtype = dtypes.get(operand.name)
        return f"column {operand.name!r}" + (f" ({dtype})" if dtype is not None else "")
    kind = {String: "string", Boolean: "boolean", Number: "number"}[type(operand)]
    return f"{kind} {operand}"


def _shortened(literal: str) -> str:
    return literal if len(literal) <= 24 else f"{literal[:10]}...{literal[-10:]} ({len(literal)} characters)"


def _literal_value(operand: Operand) -> Any:
    value = operand.value
    # Python ints beyond int64 can trip some backends; a float compares the
    # same way at that magnitude.
    if isinstance(operand, Number) and isinstance(value, int) and abs(value) > _INT64_MAX:
        return float(value)
    return value


def _compare_pair(df, left: Operand, op: str, right: Operand, filt: "Filter"):
    if not isinstance(left, Column):  # keep the column on the left
        left, op, right = right, _FLIPPED[op], left
    series = df[left.name]
    other = df[right.name] if isinstance(right, Column) else _literal_value(right)
    try:
        if op == "<":
            result = series < other
        elif op == "<=":
            result = series <= other
        elif op == ">":
            result = series > other
        elif op == ">=":
            result = series >= other
        elif op == "==":
            result = series == other
        else:
            result = series != other
        result.dtype  # noqa: B018 -- makes lazy (Dask) backends check types now
    except (TypeError, ValueError) as exc:  # ValueError: e.g. arrays held in an object column
        raise FilterSyntaxError(
            f"cannot compare column {left.name!r} ({series.dtype}) with {right}: {exc}",
            filt.text,
            left.pos,
        ) from None
    # A comparison involving a missing value is False (also for "!=").
    result = result & ~series.isna()
    if isinstance(right, Column):
        result = result & ~other.isna()
    return result.fillna(False).astype(bool)


def _evaluate(node: Any, df, filt: "Filter"):
    if isinstance(node, Compare):
        result = None
        for left, op, right in zip(node.operands, node.ops, node.operands[1:]):
            part = _compare_pair(df, left, op, right, filt)
            result = part if result is None else (result & part)
        return result
    if isinstance(node, IsNull):
        series = df[node.column.name]
        result = series.isna().astype(bool)
        return ~result if node.negated else result
    if isinstance(node, Not):
        return ~_evaluate(node.operand, df, filt)
    if isinstance(node, (And, Or)):
        result = _evaluate(node.operands[0], df, filt)
        for operand in node.operands[1:]:
            part = _evaluate(operand, df, filt)
            result = (result & part) if isinstance(node, And) else (result | part)
        return result
    raise TypeError(f"unexpected filter node {node!r}")  # pragma: no cover


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------
class Filter:
    """A parsed, immutable row filter.

    Create one with :func:`parse_filter` (or ``Filter(text)``, which is the
    same).  Filters compare equal when their syntax trees are equal, i.e. when
    they have the same canonical text (``str(filter)``).

    Parameters
    ----------
    text : str
        The filter expression; see the module documentation for the grammar.

    Attributes
    ----------
    text : str
        The expression exactly as given.
    columns : frozenset of str
        Names of all columns the expression refers to.
    node
        Root of the syntax tree (:class:`Compare`, :class:`IsNull`,
        :class:`Not`, :class:`And` or :class:`Or`).

    Raises
    ------
    FilterSyntaxError
        If `text` is not a valid filter expression.
    TypeError
        If `text` is not a ``str``.

    Examples
    --------
    >>> f = parse_filter("aesthetic_score >= 5 AND nsfw_score<0.5")
    >>> str(f)
    'aesthetic_score >= 5 and nsfw_score < 0.5'
    >>> sorted(f.columns)
    ['aesthetic_score', 'nsfw_score']
    """

    # _parts: for a filter made by parse_filters, the filters it ANDs (else empty); each
    # validates and evaluates against its own text, so errors quote what the user typed.
    __slots__ = ("_text", "_node", "_columns", "_parts")

    def __init__(self, text: str):
        self._init(text, check_length=True)

    def _init(self, text: str, check_length: bool) -> None:
        if not isinstance(text, str):
            raise TypeError(f"filter expression must be a str, not {type(text).__name__}")
        if check_length and len(text) > MAX_FILTER_LENGTH:
            raise FilterSyntaxError(
                f"filter expression is too long ({len(text)} characters; "
                f"the limit is {MAX_FILTER_LENGTH})",
                text,
            )
        node = _Parser(text).parse()
        object.__setattr__(self, "_text", text)
        object.__setattr__(self, "_node", node)
        object.__setattr__(
            self,
            "_columns",
            frozenset(n.name for n in _walk(node) if isinstance(n, Column)),
        )
        object.__setattr__(self, "_parts", ())

    @classmethod
    def _conjunction(cls, parts: list) -> "Filter":
        """The AND of already parsed filters (see :func:`parse_filters`)."""
        self = cls.__new__(cls)
        node = _make_nary(And, [p.node for p in parts], parts[0].node)
        object.__setattr__(self, "_text", " and ".join(f"({p.text})" for p in parts))
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_columns", frozenset().union(*(p.columns for p in parts)))
        object.__setattr__(self, "_parts", tuple(parts))
        return self

    def __setattr__(self, name, value):
        raise AttributeError("Filter objects are immutable")

    def __delattr__(self, name):
        raise AttributeError("Filter objects are immutable")

    def __reduce__(self):
        if self._parts:
            return (parse_filters, ([p.text for p in self._parts],))
        return (Filter, (self._text,))

    def __dask_tokenize__(self):
        return ("dask_imgcurator.Filter", str(self))

    @property
    def text(self) -> str:
        """The expression exactly as given (from :func:`parse_filters`: each in parentheses, joined by ``and``)."""
        return self._text

    @property
    def node(self) -> Node:
        """Root of the immutable syntax tree."""
        return self._node

    @property
    def columns(self) -> frozenset:
        """Names of all columns the expression refers to."""
        return self._columns

    def __str__(self) -> str:
        return str(self._node)

    def __repr__(self) -> str:
        return f"Filter({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Filter):
            return NotImplemented
        return self._node == other._node

    def __hash__(self) -> int:
        return hash(self._node)

    def validate(self, columns) -> "Filter":
        """Check that every referenced column exists (and fits its type).

        Parameters
        ----------
        columns : iterable of str, mapping of str to dtype, or DataFrame
            The available columns.  When dtypes are known (a mapping such as
            ``df.dtypes`` or a pandas / Dask / cuDF DataFrame), comparisons
            that can never make sense -- e.g. a numeric column against a
            string literal -- are rejected too.

        Returns
        -------
        Filter
            `self`, to allow chaining.

        Raises
        ------
        FilterSyntaxError
            Naming the first unknown column (with a caret at its position)
            and listing the available ones, or describing a type mismatch
            (including any comparison on a list or struct column such as
            ``embedding``).
        """
        if self._parts:
            for part in self._parts:
                part.validate(columns)
            return self
        dtypes: dict = {}
        if hasattr(columns, "dtypes") and hasattr(columns, "columns"):
            dtypes = dict(columns.dtypes.items())
            names = list(columns.columns)
        elif hasattr(columns, "items") and hasattr(columns, "keys"):
            dtypes = dict(columns.items())
            names = list(dtypes)
        else:
            names = list(columns)
        available = set(names)
        for n in sorted(
            (n for n in _walk(self._node) if isinstance(n, Column)), key=lambda c: c.pos
        ):
            if n.name in available:
                continue
            str_names = [str(c) for c in names]
            listing = ", ".join(str_names[:50]) + (", ..." if len(str_names) > 50 else "")
            reason = f"unknown column {n.name!r}"
            close = difflib.get_close_matches(n.name, str_names, n=1, cutoff=0.5)
            if close:
                reason += f" (did you mean {close[0]!r}?)"
            reason += f"; available columns: {listing or '(none)'}"
            raise FilterSyntaxError(reason, self._text, n.pos)
        if dtypes:
            for n in _walk(self._node):
                if not isinstance(n, Compare):
                    continue
                for left, op, right in zip(n.operands, n.ops, n.operands[1:]):
                    for operand in (left, right):
                        if _operand_kind(operand, dtypes) == "nested":
                            raise FilterSyntaxError(
                                f"cannot compare {_describe_operand(operand, dtypes)}: it holds "
                                "a list or struct per row, not one value "
                                "(only 'is null' / 'is not null' apply to it)",
                                self._text,
                                operand.pos,
                            )
                    kinds = frozenset(
                        {_operand_kind(left, dtypes), _operand_kind(right, dtypes)}
                    )
                    if kinds in _INCOMPATIBLE:
                        raise FilterSyntaxError(
                            f"cannot compare {_describe_operand(left, dtypes)} "
                            f"with {_describe_operand(right, dtypes)}",
                            self._text,
                            left.pos,
                        )
        return self

    def mask(self, df):
        """Evaluate the filter to a boolean row mask.

        Only operations shared by pandas, Dask and cuDF are used
        (comparisons, ``&``, ``|``, ``~``, ``isna``, ``fillna``,
        ``astype``), so the result is lazy for Dask frames.

        Parameters
        ----------
        df : pandas.DataFrame, dask.dataframe.DataFrame or cudf.DataFrame
            Frame holding (at least) the referenced columns.

        Returns
        -------
        Series of bool
            Same index / partitions as `df`; ``True`` for rows that pass.
            A comparison with a missing value is ``False``.

        Raises
        ------
        FilterSyntaxError
            If a referenced column is missing or a comparison does not fit the
            column's dtype.
        """
        self.validate(df)
        result = None
        for part in self._parts or (self,):
            part_mask = _evaluate(part._node, df, part)
            result = part_mask if result is None else (result & part_mask)
        return result

    def conditions(self) -> list:
        """Split the filter into its top-level AND-ed conditions.

        Returns
        -------
        list of (str, Filter)
            One ``(canonical_text, filter)`` pair per top-level condition, in
            the order written.  A filter whose top level is not an ``and`` is a
            single condition.  A chained comparison such as ``4 <= x < 8`` is
            one condition.

        Examples
        --------
        >>> [t for t, _ in parse_filter("a > 1 and (b < 2 or c is null)").conditions()]
        ['a > 1', 'b < 2 or c is null']
        """
        parts = self._node.operands if isinstance(self._node, And) else (self._node,)
        out = []
        for part in parts:
            text = str(part)
            # Re-parse the canonical text so positions in the sub-filter refer
            # to its own text; it may legitimately be longer than the original.
            sub = Filter.__new__(Filter)
            sub._init(text, check_length=False)
            out.append((text, sub))
        return out


def parse_filter(text: str) -> Filter:
    """Parse a filter expression such as ``"aesthetic_score >= 5 and nsfw_score < 0.5"``.

    Parameters
    ----------
    text : str
        The expression (at most :data:`MAX_FILTER_LENGTH` characters, nested
        at most :data:`MAX_FILTER_DEPTH` levels).  See the module docstring
        for the grammar.

    Returns
    -------
    Filter
        The parsed filter.  Column existence is not checked here; use
        :meth:`Filter.validate` or :meth:`Filter.mask`.

    Raises
    ------
    FilterSyntaxError
        If the expression is malformed, too long or too deeply nested.  The
        message shows the expression with a caret at the offending position.
    TypeError
        If `text` is not a ``str``.
    """
    return Filter(text)


def parse_filters(exprs: Sequence[str]) -> Filter:
    """Parse several filter expressions, each on its own, into one filter that is their AND.

    This is what repeated ``--filter`` options mean.  Each expression must be
    complete by itself, so one cannot reach into another (``"a > 1) or (b > 2"``
    is an error, not a way to turn the AND into an OR).

    Parameters
    ----------
    exprs : sequence of str
        One or more expressions, each as accepted by :func:`parse_filter`.

    Returns
    -------
    Filter
        A row passes when it passes every expression.  Its top-level
        conditions (:meth:`Filter.conditions`, hence :func:`drop_reason`) are
        those of the expressions, in order.  Errors from
        :meth:`Filter.validate` and :meth:`Filter.mask` quote the expression
        they concern.

    Raises
    ------
    FilterSyntaxError
        If an expression is malformed (the message quotes that expression).
    ValueError
        If `exprs` is empty.
    TypeError
        If `exprs` is a single ``str`` or holds something other than ``str``.

    Examples
    --------
    >>> f = parse_filters(["aesthetic_score >= 5", "nsfw_score < 0.5 or nsfw_score is null"])
    >>> [t for t, _ in f.conditions()]
    ['aesthetic_score >= 5', 'nsfw_score < 0.5 or nsfw_score is null']
    >>> parse_filters(["aesthetic_score < 5) or (aesthetic_score > 6"])
    Traceback (most recent call last):
    ...
    dask_imgcurator.stages.filters.FilterSyntaxError: invalid filter: unmatched ')'
      aesthetic_score < 5) or (aesthetic_score > 6
                         ^
    """
    if isinstance(exprs, str):
        raise TypeError("parse_filters takes a sequence of expressions; use parse_filter for one")
    parts = [parse_filter(text) for text in exprs]
    if not parts:
        raise ValueError("parse_filters needs at least one expression")
    return parts[0] if len(parts) == 1 else Filter._conjunction(parts)


def _drop_reason_pandas(df: pd.DataFrame, filt: Filter) -> pd.Series:
    reasons = np.full(len(df), None, dtype=object)
    decided = np.zeros(len(df), dtype=bool)
    for text, cond in filt.conditions():
        passed = np.asarray(cond.mask(df), dtype=bool)
        failed = ~passed & ~decided
        reasons[failed] = text
        decided |= failed
    return pd.Series(reasons, index=df.index, dtype="string", name="drop_reason")


def drop_reason(df, filt: Filter):
    """Explain, per row, which condition of `filt` removes it.

    Parameters
    ----------
    df : pandas.DataFrame or dask.dataframe.DataFrame
        The frame the filter is applied to.
    filt : Filter or str
        The filter (a string is parsed with :func:`parse_filter`).

    Returns
    -------
    Series of string
        Named ``"drop_reason"``, nullable ``string`` dtype.  For a row that
        ``filt.mask(df)`` rejects: the canonical text of the *first* top-level
        condition (see :meth:`Filter.conditions`) the row fails, e.g.
        ``"aesthetic_score >= 5"``; missing (``<NA>``) for rows that pass.
        Lazy for Dask input.

    Raises
    ------
    FilterSyntaxError
        As :meth:`Filter.mask`.
    """
    if isinstance(filt, str):
        filt = parse_filter(filt)
    filt.validate(df)
    if isinstance(df, pd.DataFrame):
        return _drop_reason_pandas(df, filt)
    if hasattr(df, "map_partitions"):
        meta = pd.Series([], dtype="string", name="drop_reason")
        return df.map_partitions(_drop_reason_pandas, filt, meta=meta)
    raise TypeError(
        f"drop_reason supports pandas and Dask DataFrames, not {type(df).__name__}"
    )
