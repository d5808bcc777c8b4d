"""The syntax tree: what the user wrote, with a position on every node.

The checker turns it into `ir`; the formatter prints it back. Types are not known here: `a - b` is a
`Binary` whether it subtracts integers or sets. Each expression node counts the parentheses the user
wrote around it (`parens`): they change no meaning, but the formatter keeps them, since a reader of
`(q // C) * C` should not have to know that `//` and `*` bind alike and group left to right.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TypeAlias

from .source import Span

_span = field(compare=False, repr=False)
_parens = field(default=0, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Name:
    id: str
    span: Span = _span
    parens: int = _parens


@dataclass(frozen=True, slots=True)
class Int:
    value: int
    span: Span = _span
    parens: int = _parens


@dataclass(frozen=True, slots=True)
class Float:
    value: float
    span: Span = _span
    parens: int = _parens


@dataclass(frozen=True, slots=True)
class Unary:
    op: str  # "-", "+", "~", "not"
    operand: Node
    span: Span = _span
    parens: int = _parens


@dataclass(frozen=True, slots=True)
class Binary:
    op: str  # "+", "-", "*", "//", "%", "**", "&", "|", "and", "or"
    left: Node
    right: Node
    span: Span = _span
    parens: int = _parens


@dataclass(frozen=True, slots=True)
class Compare:
    """`a < b <= c`: chained as in Python."""

    operands: tuple[Node, ...]
    ops: tuple[str, ...]
    span: Span = _span
    parens: int = _parens


@dataclass(frozen=True, slots=True)
class Keyword:
    name: str
    value: Node
    span: Span = _span


@dataclass(frozen=True, slots=True)
class Call:
    func: str
    args: tuple[Node, ...]
    keywords: tuple[Keyword, ...]
    span: Span = _span
    parens: int = _parens


@dataclass(frozen=True, slots=True)
class Attribute:
    """`layout.part`: a named part of a layout (its extra tokens, `v.prefix` and `v.suffix`)."""

    value: str
    attr: str
    span: Span = _span
    parens: int = _parens


@dataclass(frozen=True, slots=True)
class TupleLit:
    items: tuple[Node, ...]
    span: Span = _span
    parens: int = _parens


@dataclass(frozen=True, slots=True)
class ListLit:
    items: tuple[Node, ...]
    span: Span = _span
    parens: int = _parens


@dataclass(frozen=True, slots=True)
class Slice:
    start: Node | None
    stop: Node | None
    step: Node | None
    span: Span = _span


Node: TypeAlias = Name | Int | Float | Unary | Binary | Compare | Call | Attribute | TupleLit | ListLit | Slice


def parenthesized(node: Node) -> Node:
    """The node as written inside one more pair of parentheses (a slice is never written so)."""
    if isinstance(node, Slice):
        raise TypeError("a slice cannot be parenthesized")
    return replace(node, parens=node.parens + 1)


@dataclass(frozen=True, slots=True)
class HeadEntry:
    heads: Slice
    body: Node
    span: Span = _span


@dataclass(frozen=True, slots=True)
class HeadsBlock:
    entries: tuple[HeadEntry, ...]
    span: Span = _span
    end_line: int = field(default=0, compare=False, repr=False)  # the line of its '}', for comments


@dataclass(frozen=True, slots=True)
class ModelEntry:
    kind: str  # "every", "range", "else"
    key: Node | None  # the `every` count or the layer slice
    body: Node | HeadsBlock
    span: Span = _span


@dataclass(frozen=True, slots=True)
class ParamStmt:
    name: str
    value: Node
    span: Span = _span


@dataclass(frozen=True, slots=True)
class LetStmt:
    name: str
    value: Node
    span: Span = _span


@dataclass(frozen=True, slots=True)
class LayoutStmt:
    name: str
    value: Node
    span: Span = _span


@dataclass(frozen=True, slots=True)
class PatternStmt:
    name: str
    body: Node | HeadsBlock
    span: Span = _span


@dataclass(frozen=True, slots=True)
class ModelStmt:
    name: str
    layers: Node
    entries: tuple[ModelEntry, ...]
    span: Span = _span
    end_line: int = field(default=0, compare=False, repr=False)  # the line of its '}', for comments


Statement: TypeAlias = ParamStmt | LetStmt | LayoutStmt | PatternStmt | ModelStmt


@dataclass(frozen=True, slots=True)
class Comment:
    line: int
    text: str  # with the leading '#'
    own_line: bool  # nothing but white space before it on its line


@dataclass(frozen=True, slots=True)
class Module:
    statements: tuple[Statement, ...]
    comments: tuple[Comment, ...] = ()
