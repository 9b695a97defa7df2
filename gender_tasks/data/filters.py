"""Row filters over a labels.csv (external evaluation sets, `folder?<filter>`): a small grammar of
their own, tokenised, parsed into a tiny syntax tree and turned into a boolean mask. Never evaluated.

A filter is user input (a DAG param, a CLI flag). It used to go to `DataFrame.query`, whose `@name`
reaches the caller's module globals: `@pd.io.common.os.system('id') == 0` ran a shell command.
Here no part of the text ever reaches Python's evaluator: the only things a filter can do are the
comparisons below, over columns that exist.

Grammar (keywords in any case; `&` and `|` are aliases of `and` and `or`):

    filter      := or_expr
    or_expr     := and_expr ( "or" and_expr )*
    and_expr    := not_expr ( "and" not_expr )*
    not_expr    := "not" not_expr | "(" or_expr ")" | comparison
    comparison  := COLUMN OP VALUE                      OP: == != < <= > >=
    COLUMN      := a name: letters, digits and _, not starting with a digit (a column of labels.csv)
    VALUE       := NUMBER | 'quoted' | "quoted" | bare word

A NUMBER (16, -3, 2.5, 1e3) compares numerically: the column's text is read as numbers and rows
whose text is not a number never match, not even `!=`. A quoted string (a backslash escapes a quote
or a backslash) or a bare word (a name, as COLUMN) compares as text: == and != exactly, < <= > >=
in code-point order. Bare words that are also column names are refused (comparing two columns is not
supported; quote the word to mean the text). Refused: anything else (function calls, attribute
access, `@`, backticks, arithmetic, unbalanced parentheses), filters over MAX_CHARS characters and
nesting (parentheses and `not`) deeper than MAX_DEPTH.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd

from ..errors import PermanentError

MAX_CHARS = 1000
MAX_DEPTH = 20
OPERATORS = ("==", "!=", "<", "<=", ">", ">=")
KEYWORDS = {"and": "and", "&": "and", "or": "or", "|": "or", "not": "not"}

ALLOWED = (
    "a filter is `column OP value` (OP one of == != < <= > >=; value a number, a 'quoted' or \"quoted\" "
    "string, or a bare word), combined with and, or, not and parentheses, e.g. "
    "\"age >= 16 and (race == 0 or gender != 'female')\""
)


class ExternalSetError(PermanentError):
    """An external evaluation set is refused (its folder, its files or its filter): the message names it."""


class FilterError(ExternalSetError):
    """A filter is refused: the message names the filter, the position and what is allowed."""


def _shown(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _refuse(text: str, pos: int, why: str) -> FilterError:
    near = text[pos : pos + 20]
    where = f"at character {pos + 1} ({near!r})" if near else f"at character {pos + 1} (the end)"
    return FilterError(f"filter {_shown(text)!r} refused {where}: {why}; {ALLOWED}")


# --- tokens ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    kind: str  # op, lparen, rparen, keyword, number, string, word, end
    text: str  # the source text (for keywords: "and", "or" or "not"; for strings: the unquoted value)
    pos: int


_TOKEN = re.compile(
    r"""(?P<space>\s+)
      | (?P<op>==|!=|<=|>=|<|>)
      | (?P<lparen>\() | (?P<rparen>\))
      | (?P<amp>&(?!&)) | (?P<pipe>\|(?!\|))
      | (?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)(?![\w.])
      | (?P<word>[^\W\d]\w*)
      | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
    """,
    re.VERBOSE | re.DOTALL,
)

_WHY = {
    "@": "'@' (a reference to a Python variable) is not allowed",
    "`": "backticks are not allowed: a column is a plain name",
    ".": "attribute access ('.') is not allowed",
    "=": "'=' alone is not a comparison: use ==",
    "!": "'!' alone is not allowed: use != or not",
    "&": "'&&' is not allowed: use and (or &)",
    "|": "'||' is not allowed: use or (or |)",
    "'": "the quote is never closed",
    '"': "the quote is never closed",
}


def _unknown_char(text: str, pos: int) -> str:
    char = text[pos]
    if char in _WHY:
        return _WHY[char]
    if char in "+-*/%^~":
        return f"{char!r}: arithmetic and bitwise operators are not allowed"
    if char.isdigit():
        word = re.match(r"[\w.]+", text[pos:]).group()
        return f"{word!r} is neither a number nor a name: quote it to compare with the text"
    return f"{char!r} is not allowed"


def tokenize(text: str) -> Iterator[Token]:
    """The tokens of `text`, ending with an "end" token; lazily, so the first problem in reading order is named."""
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise _refuse(text, pos, _unknown_char(text, pos))
        kind, value = m.lastgroup, m.group()
        if kind == "string":
            value = re.sub(r"\\(.)", r"\1", value[1:-1], flags=re.DOTALL)
        elif kind in ("amp", "pipe") or (kind == "word" and value.lower() in KEYWORDS):
            kind, value = "keyword", KEYWORDS[value.lower()]
        if kind != "space":
            yield Token(kind, value, pos)
        pos = m.end()
    yield Token("end", "", len(text))


# --- syntax tree -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Compare:
    column: str
    op: str
    value: float | str
    numeric: bool  # the value was a number literal: compare as numbers
    bare: bool  # the value was a bare word (not quoted)
    pos: int  # where the comparison starts in the filter


@dataclass(frozen=True)
class Not:
    operand: Node


@dataclass(frozen=True)
class BoolOp:
    op: str  # "and" or "or"
    operands: tuple[Node, ...]


Node = Compare | Not | BoolOp


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = tokenize(text)
        self.tok = next(self.tokens)  # the next token, not yet taken

    def take(self) -> Token:
        tok = self.tok
        if tok.kind != "end":
            self.tok = next(self.tokens)
        return tok

    def is_keyword(self, word: str) -> bool:
        return self.tok.kind == "keyword" and self.tok.text == word

    def parse(self) -> Node:
        node = self.or_expr(0)
        if self.tok.kind == "rparen":
            raise _refuse(self.text, self.tok.pos, "')' closes no '('")
        if self.tok.kind != "end":
            raise _refuse(self.text, self.tok.pos, "expected and, or, or the end of the filter")
        return node

    def or_expr(self, depth: int) -> Node:
        return self.chain("or", self.and_expr, depth)

    def and_expr(self, depth: int) -> Node:
        return self.chain("and", self.not_expr, depth)

    def chain(self, word: str, operand, depth: int) -> Node:
        items = [operand(depth)]
        while self.is_keyword(word):
            self.take()
            items.append(operand(depth))
        return items[0] if len(items) == 1 else BoolOp(word, tuple(items))

    def not_expr(self, depth: int) -> Node:
        opened = self.tok
        if not (self.is_keyword("not") or opened.kind == "lparen"):
            return self.comparison()
        if depth >= MAX_DEPTH:
            raise _refuse(self.text, opened.pos, f"nested deeper than {MAX_DEPTH} levels (parentheses and not)")
        self.take()
        if opened.kind == "keyword":
            return Not(self.not_expr(depth + 1))
        node = self.or_expr(depth + 1)
        if self.tok.kind == "end":
            raise _refuse(self.text, opened.pos, "the '(' here is never closed")
        if self.tok.kind != "rparen":
            raise _refuse(self.text, self.tok.pos, "expected and, or or ')'")
        self.take()
        return node

    def comparison(self) -> Compare:
        start = self.tok
        if start.kind != "word":
            what = {"end": "the filter ends where a comparison should start", "rparen": "')' closes an empty group"}
            raise _refuse(self.text, start.pos, what.get(start.kind, "expected a column name"))
        self.take()
        if self.tok.kind == "lparen":
            raise _refuse(self.text, self.tok.pos, f"function calls ({start.text}(…)) are not allowed")
        if self.tok.kind == "number" and self.tok.text[0] in "+-":
            raise _refuse(self.text, self.tok.pos, "arithmetic is not allowed")
        if self.tok.kind != "op":
            raise _refuse(self.text, self.tok.pos, f"expected one of {' '.join(OPERATORS)} after column {start.text!r}")
        op = self.take().text
        value = self.take()
        if value.kind not in ("number", "string", "word"):
            raise _refuse(self.text, value.pos, f"expected a value after {start.text} {op}")
        if self.tok.kind == "op":
            raise _refuse(self.text, self.tok.pos, "chained comparisons are not allowed: join two with and")
        if self.tok.kind == "lparen":
            raise _refuse(self.text, self.tok.pos, f"function calls ({value.text}(…)) are not allowed")
        numeric = value.kind == "number"
        return Compare(start.text, op, float(value.text) if numeric else value.text, numeric,
                       value.kind == "word", start.pos)  # fmt: skip


# --- the filter --------------------------------------------------------------------------------------


_COMPARE = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt,
            ">=": operator.ge}  # fmt: skip


def _comparisons(node: Node) -> list[Compare]:
    if isinstance(node, Compare):
        return [node]
    if isinstance(node, Not):
        return _comparisons(node.operand)
    return [c for operand in node.operands for c in _comparisons(operand)]


def _mask(node: Node, table: pd.DataFrame) -> pd.Series:
    if isinstance(node, Compare):
        column = table[node.column]
        if node.numeric:
            numbers = pd.to_numeric(column, errors="coerce")
            return _COMPARE[node.op](numbers, node.value) & numbers.notna()
        return _COMPARE[node.op](column.astype(str), node.value)
    if isinstance(node, Not):
        return ~_mask(node.operand, table)
    masks = [_mask(operand, table) for operand in node.operands]
    out = masks[0]
    for m in masks[1:]:
        out = (out & m) if node.op == "and" else (out | m)
    return out


@dataclass(frozen=True)
class Filter:
    text: str
    root: Node

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys(c.column for c in _comparisons(self.root)))

    def mask(self, table: pd.DataFrame, *, where: str) -> pd.Series:
        """The rows of `table` the filter keeps (a boolean Series); `where` names the table in errors.

        Columns are compared as the table holds them: read the CSV as text (dtype=str) for the
        documented semantics.
        """
        columns = [str(c) for c in table.columns]
        for c in _comparisons(self.root):
            if c.column not in columns:
                raise _refuse(self.text, c.pos, f"unknown column {c.column!r}: {where} has columns {columns}")
            if c.bare and c.value in columns:
                raise _refuse(self.text, c.pos, f"{c.value!r} is a column: comparing two columns is not "
                                                f"supported; write '{c.value}' in quotes to mean the text")  # fmt: skip
        return _mask(self.root, table).astype(bool)


def parse_filter(text: str) -> Filter:
    """The filter `text`, parsed (FilterError, naming the position and what is allowed, if it is not one)."""
    if len(text) > MAX_CHARS:
        raise _refuse(text, MAX_CHARS, f"longer than {MAX_CHARS} characters ({len(text)})")
    if not text.strip():
        raise _refuse(text, 0, "the filter is empty")
    return Filter(text, _Parser(text).parse())


def split_spec(spec: str) -> tuple[str, Filter | None]:
    """An external set `folder` or `folder?<filter>` as (folder, parsed filter or None); reads nothing."""
    folder, mark, text = spec.partition("?")
    if not mark or not text.strip():
        return folder, None
    return folder, parse_filter(text.strip())
