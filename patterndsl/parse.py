"""Text -> syntax tree, through the lark grammar in `grammar/`, with errors in the project's format."""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections.abc import Iterable
from typing import Any

import lark
from lark import Token, Transformer_NonRecursive, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from . import resources
from . import tree as T
from .source import MAX_SOURCE_BYTES, PatternError, Source, Span

# Deeper expressions are refused with a message: every stage after the parser recurses over the tree.
MAX_NESTING = 200

_TOKEN_NAMES = {
    "NAME": "a name",
    "INT": "an integer",
    "FLOAT": "a number",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "COMMA": "','",
    "EQUAL": "'='",
    "COLON": "':'",
    "COMP_OP": "a comparison",
    "PLUS": "'+'",
    "MINUS": "'-'",
    "STAR": "'*'",
    "DSLASH": "'//'",
    "PERCENT": "'%'",
    "DSTAR": "'**'",
    "TILDE": "'~'",
    "VBAR": "'|'",
    "AMPERSAND": "'&'",
    "$END": "end of file",
}


@functools.cache
def _parser() -> lark.Lark:
    return lark.Lark(
        resources.grammar_text(),
        parser="lalr",
        propagate_positions=True,
        maybe_placeholders=True,
    )


def parse(text: str, path: str = "<input>") -> T.Module:
    """Parse a whole `.pat` file; raises PatternError, never a lark or Python exception."""
    text = text.removeprefix("\ufeff")  # a byte order mark some editors write: not part of the text
    source = Source(path, text)
    if len(text.encode("utf-8", "surrogatepass")) > MAX_SOURCE_BYTES:
        raise PatternError(f"file is larger than {MAX_SOURCE_BYTES} bytes", None)
    bad = next((k for k, ch in enumerate(text) if _invisible(ch)), None)
    if bad is not None:
        line = text.count("\n", 0, bad) + 1
        col = bad - (text.rfind("\n", 0, bad) + 1) + 1
        raise PatternError(
            f"invisible control character U+{ord(text[bad]):04X}",
            Span(source, line, col),
            "remove it: it can make the text look different from what patc reads",
        )
    comments: list[Token] = []
    parser = _parser()
    try:
        raw = _parse_collecting(parser, text, comments)
        _fold_parens(raw)
        _check_nesting(raw, source)
        module = _Build(source).transform(raw)
    except UnexpectedInput as e:
        raise _syntax_error(e, source) from None
    except VisitError as e:
        if isinstance(e.orig_exc, PatternError):
            raise e.orig_exc from None
        raise
    return T.Module(module.statements, tuple(_comment(c, text) for c in comments))


# Bidirectional formatting characters: in a comment they can reorder how the rest of a line is displayed, so
# that code looks commented out (or the reverse). Refused with control characters, everywhere.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _invisible(ch: str) -> bool:
    """Characters a reader cannot see: control characters other than tab and newlines, and bidi controls.
    Any other character is allowed in a comment; outside comments the grammar takes ASCII only."""
    return ch in _BIDI or (unicodedata.category(ch) == "Cc" and ch not in "\t\r\n")


def _parse_collecting(parser: lark.Lark, text: str, comments: list[Token]) -> Any:
    # Comments are ignored by the grammar; a second lexer pass collects them for the formatter.
    result = parser.parse(text)
    for tok in parser.lex(text, dont_ignore=True):
        if tok.type == "COMMENT":
            comments.append(tok)
    return result


# Chains of one associative operator (`a | b | c`): the checker walks them without recursion and builds a
# balanced tree, so a flat chain of any length costs no depth. Arithmetic is left nested as written.
_FLAT_CHAINS = frozenset({"union_op", "inter_op", "and_op", "or_op"})
_ARITH_GROUPS = ({"+", "-"}, {"*", "//", "%"})


def _arith_group(node: lark.Tree[Token]) -> int | None:
    """Which run of left-associative arithmetic operators `node` belongs to (None: not such a node)."""
    if node.data != "binary":
        return None
    op = str(node.children[1])
    return next((k for k, group in enumerate(_ARITH_GROUPS) if op in group), None)


def _fold_parens(raw: lark.Tree[Token]) -> None:
    """Nested parentheses `((x))` become one `paren` tree holding x and their count (walked without
    recursion), so redundant parentheses cost no depth."""
    stack = [raw]
    while stack:
        node = stack.pop()
        for k, child in enumerate(node.children):
            if isinstance(child, lark.Tree) and child.data == "paren" and len(child.children) == 1:
                inner, count = child.children[0], 1
                while isinstance(inner, lark.Tree) and inner.data == "paren":
                    inner, count = inner.children[0], count + 1
                node.children[k] = child = lark.Tree("paren", [inner, count], child.meta)  # type: ignore[list-item]
            if isinstance(child, lark.Tree):
                stack.append(child)


def _check_nesting(raw: lark.Tree[Token], source: Source) -> None:
    """Refuse expressions deeper than MAX_NESTING (walked without recursion), in the terms the user wrote:
    levels of nesting, or operators chained in a row (`1 + 1 + ...` nests as deep as it is long)."""
    # (node, depth, chain): chain holds the operators of the runs of arithmetic on the way down to the node
    stack: list[tuple[lark.Tree[Token], int, tuple[str, ...]]] = [(raw, 0, ())]
    while stack:
        node, depth, chain = stack.pop()
        if depth > MAX_NESTING:
            span = _span_of(source, node.meta)
            if 2 * len(chain) > MAX_NESTING:
                ops = ", ".join(f"'{op}'" for op in sorted(set(chain)))
                raise PatternError(
                    f"more than {MAX_NESTING} operations chained with {ops}", span,
                    "compute it in fewer steps; a param or a let can hold a part",
                )  # fmt: skip
            raise PatternError(f"expression nested more than {MAX_NESTING} levels deep", span, "name parts of it with 'let'")
        group = _arith_group(node)
        for k, child in enumerate(node.children):
            if not isinstance(child, lark.Tree):
                continue
            if node.data == "paren":  # parentheses are what the user wrote, not nesting
                stack.append((child, depth, chain))
            elif k == 0 and child.data == node.data and node.data in _FLAT_CHAINS:
                stack.append((child, depth, chain))
            elif k == 0 and group is not None and _arith_group(child) == group:
                stack.append((child, depth + 1, (*chain, str(node.children[1]))))
            else:
                stack.append((child, depth + 1, chain))


def _comment(tok: Token, text: str) -> T.Comment:
    start = text.rfind("\n", 0, tok.start_pos) + 1
    own_line = text[start : tok.start_pos].strip() == ""
    return T.Comment(tok.line or 0, str(tok).rstrip(), own_line)


def _describe(token: Token | None) -> str:
    if token is None or token.type == "$END":
        return "end of file"
    return f"'{token}'"


def _token_word(name: str) -> str:
    """How a terminal reads in a message: its text for keywords and anonymous ones like '=>'."""
    if name in _TOKEN_NAMES:
        return _TOKEN_NAMES[name]
    try:
        pattern = _parser().get_terminal(name).pattern
    except KeyError:
        return name.lower()
    return f"'{pattern.value}'" if pattern.type == "str" else name.lower()


def _expected(names: Iterable[Any]) -> str:
    words = sorted({_token_word(str(n)) for n in names})
    if len(words) > 6:
        words = words[:6] + ["..."]
    return ", ".join(words)


def _syntax_error(e: UnexpectedInput, source: Source) -> PatternError:
    line = getattr(e, "line", None) or 1
    column = getattr(e, "column", None) or 1
    if line < 1:
        line, column = max(1, source.text.count("\n") + 1), len(source.line(source.text.count("\n") + 1)) + 1
    span = Span(source, line, column)
    match e:
        case UnexpectedCharacters():
            pos = e.pos_in_stream or 0
            ch = source.text[pos] if pos < len(source.text) else ""
            return PatternError(f"unexpected character {ch!r}", span, _char_hint(ch))
        case UnexpectedEOF():
            return PatternError("unexpected end of file", _end_of_code(source), f"expected {_expected(e.expected)}")
        case UnexpectedToken():
            tok = e.token
            if tok.type == "$END":
                span = _end_of_code(source)
            else:
                span = Span(source, tok.line or line, tok.column or column, max(1, len(str(tok))))
            return PatternError(
                f"unexpected {_describe(tok)}",
                span,
                f"expected {_expected(e.expected)}" + _token_hint(tok),
            )
    return PatternError("syntax error", span)


def _end_of_code(source: Source) -> Span:
    """Just after the last character of code: trailing comments and blank lines are not where it ended."""
    code = re.sub(r"#[^\n]*", "", source.text).rstrip()  # '#' always starts a comment: there are no strings
    start_of_line = code.rfind("\n") + 1
    return Span(source, code.count("\n") + 1, len(code) - start_of_line + 1)


def _char_hint(ch: str) -> str | None:
    if ch.isspace():
        return "a space other than the plain one (U+0020) or a tab; retype it"
    if not ch.isascii():
        return "names are ASCII letters, digits and '_'; other characters may appear only in comments"
    return {
        "!": "negation is 'not' in where(...) and '~' for patterns",
        "&": None,
        "/": "integer division is '//'",
        '"': "there are no strings in patterns",
        "'": "there are no strings in patterns",
        "=": None,
        ";": "statements need no separator; start each one on a new line",
    }.get(ch)


def _token_hint(tok: Token) -> str:
    if tok.type == "COMP_OP" and str(tok) == "=":
        return "; comparison is '=='"
    if tok.type == "COLON":
        return "; a token set like 0:16 is written as an argument, e.g. global(0:16)"
    return ""


def _span_of(source: Source, meta: Any) -> Span:
    if getattr(meta, "empty", True):
        return Span(source, 1, 1)
    length = (
        meta.end_pos - meta.start_pos if meta.line == meta.end_line else len(source.line(meta.line)) - meta.column + 1
    )
    return Span(source, meta.line, meta.column, max(1, length))


def _end_line(meta: Any) -> int:
    return 0 if getattr(meta, "empty", True) else int(meta.end_line)


def _token_span(source: Source, tok: Token) -> Span:
    return Span(source, tok.line or 1, tok.column or 1, max(1, len(str(tok))))


def _int(text: str, span: Span) -> int:
    digits = text.replace("_", "").lstrip("0") or "0"
    # 2**62 has 19 digits; a longer literal is refused before int() (Python refuses 4300 digits and more)
    value = int(digits) if len(digits) <= 19 else 1 << 62
    if value >= 1 << 62:
        raise PatternError("integer literal is too large", span, "values must be below 2**62")
    return value


@v_args(meta=True)
class _Build(Transformer_NonRecursive[Token, Any]):
    """lark tree -> `tree` nodes, attaching a Span to each; without recursion, for long flat chains."""

    def __init__(self, source: Source) -> None:
        super().__init__()
        self.src = source

    def _s(self, meta: Any) -> Span:
        return _span_of(self.src, meta)

    def start(self, meta: Any, items: list[Any]) -> T.Module:
        return T.Module(tuple(items))

    def param_stmt(self, meta: Any, items: list[Any]) -> T.ParamStmt:
        return T.ParamStmt(str(items[0]), items[1], self._s(meta))

    def let_stmt(self, meta: Any, items: list[Any]) -> T.LetStmt:
        return T.LetStmt(str(items[0]), items[1], self._s(meta))

    def layout_stmt(self, meta: Any, items: list[Any]) -> T.LayoutStmt:
        return T.LayoutStmt(str(items[0]), items[1], self._s(meta))

    def pattern_stmt(self, meta: Any, items: list[Any]) -> T.PatternStmt:
        return T.PatternStmt(str(items[0]), items[1], self._s(meta))

    def model_stmt(self, meta: Any, items: list[Any]) -> T.ModelStmt:
        return T.ModelStmt(str(items[0]), items[1], tuple(items[2:]), self._s(meta), _end_line(meta))

    def heads(self, meta: Any, items: list[Any]) -> T.HeadsBlock:
        return T.HeadsBlock(tuple(items), self._s(meta), _end_line(meta))

    def head_entry(self, meta: Any, items: list[Any]) -> T.HeadEntry:
        return T.HeadEntry(items[0], items[1], self._s(meta))

    def every_entry(self, meta: Any, items: list[Any]) -> T.ModelEntry:
        return T.ModelEntry("every", items[0], items[1], self._s(meta))

    def range_entry(self, meta: Any, items: list[Any]) -> T.ModelEntry:
        return T.ModelEntry("range", items[0], items[1], self._s(meta))

    def else_entry(self, meta: Any, items: list[Any]) -> T.ModelEntry:
        return T.ModelEntry("else", None, items[0], self._s(meta))

    def or_op(self, meta: Any, items: list[Any]) -> T.Binary:
        return T.Binary("or", items[0], items[1], self._s(meta))

    def and_op(self, meta: Any, items: list[Any]) -> T.Binary:
        return T.Binary("and", items[0], items[1], self._s(meta))

    def not_op(self, meta: Any, items: list[Any]) -> T.Unary:
        return T.Unary("not", items[0], self._s(meta))

    def compare(self, meta: Any, items: list[Any]) -> T.Compare:
        return T.Compare(tuple(items[0::2]), tuple(str(t) for t in items[1::2]), self._s(meta))

    def union_op(self, meta: Any, items: list[Any]) -> T.Binary:
        return T.Binary("|", items[0], items[1], self._s(meta))

    def inter_op(self, meta: Any, items: list[Any]) -> T.Binary:
        return T.Binary("&", items[0], items[1], self._s(meta))

    def binary(self, meta: Any, items: list[Any]) -> T.Binary:
        return T.Binary(str(items[1]), items[0], items[2], self._s(meta))

    def unary(self, meta: Any, items: list[Any]) -> T.Unary:
        return T.Unary(str(items[0]), items[1], self._s(meta))

    def call(self, meta: Any, items: list[Any]) -> T.Call:
        name, arguments = items[0], items[1] or []
        args: list[T.Node] = []
        keywords: list[T.Keyword] = []
        for a in arguments:
            if isinstance(a, T.Keyword):
                if any(k.name == a.name for k in keywords):
                    raise PatternError(f"argument '{a.name}' given twice", a.span)
                keywords.append(a)
            elif keywords:
                raise PatternError(
                    "positional argument after a keyword argument",
                    a.span,
                    "put positional arguments first",
                )
            else:
                args.append(a)
        return T.Call(str(name), tuple(args), tuple(keywords), self._s(meta))

    def attribute(self, meta: Any, items: list[Any]) -> T.Attribute:
        return T.Attribute(str(items[0]), str(items[1]), self._s(meta))

    def arguments(self, meta: Any, items: list[Any]) -> list[Any]:
        return [x for x in items if x is not None]

    def keyword(self, meta: Any, items: list[Any]) -> T.Keyword:
        return T.Keyword(str(items[0]), items[1], self._s(meta))

    def slice(self, meta: Any, items: list[Any]) -> T.Slice:
        # items: start, COLON, stop, COLON|None, step
        start, _, stop, _, step = (items + [None] * 5)[:5]
        return T.Slice(start, stop, step, self._s(meta))

    def paren(self, meta: Any, items: list[Any]) -> T.Node:
        node, count = items  # see _fold_parens
        for _ in range(count):
            node = T.parenthesized(node)
        return node  # type: ignore[no-any-return]

    def tuple_lit(self, meta: Any, items: list[Any]) -> T.TupleLit:
        return T.TupleLit(tuple(x for x in items if x is not None), self._s(meta))

    def list_lit(self, meta: Any, items: list[Any]) -> T.ListLit:
        return T.ListLit(tuple(x for x in items if x is not None), self._s(meta))

    def name(self, meta: Any, items: list[Any]) -> T.Name:
        return T.Name(str(items[0]), _token_span(self.src, items[0]))

    def int(self, meta: Any, items: list[Any]) -> T.Int:
        span = _token_span(self.src, items[0])
        return T.Int(_int(str(items[0]), span), span)

    def float(self, meta: Any, items: list[Any]) -> T.Float:
        span = _token_span(self.src, items[0])
        value = float(str(items[0]).replace("_", ""))
        if not math.isfinite(value):
            raise PatternError("number literal is too large", span, "numbers must be finite")
        return T.Float(value, span)
