"""Canonical text of a syntax tree: `patc fmt`.

Printing from the tree (not the IR) keeps what the user wrote: lets, params, names, comments and
parentheses. Every pair the user wrote is printed (the tree counts them), even where precedence makes
it redundant: it was written for a reader. None is added where the user wrote none, except where
precedence needs one in a tree built by a program rather than parsed. So `parse(fmt(x))` has the same
IR as `parse(x)` and `fmt(fmt(x)) == fmt(x)`.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import tree as T

# Binding strength, loosest first (Python's order).
_PREC = {"or": 1, "and": 2, "not": 3, "cmp": 4, "|": 5, "&": 6, "+": 7, "-": 7, "*": 8, "//": 8, "%": 8}
_UNARY = 9
_POW = 10
_ATOM = 11

INDENT = "    "


def format_module(module: T.Module) -> str:
    """The canonical text of a whole file, comments kept in place."""
    lines: list[tuple[int, str]] = []  # (source line the text came from, text)
    source = module.statements[0].span.source if module.statements else None
    for stmt in module.statements:
        lines.extend(_statement(stmt, stmt.span.line))
    return _merge_comments(lines, module.comments, source.text if source else "")


def format_expr(node: T.Node) -> str:
    return _wrap(node, 0)


def _statement(stmt: T.Statement, line: int) -> list[tuple[int, str]]:
    match stmt:
        case T.ParamStmt(name, value):
            return [(line, f"param {name} = {format_expr(value)}")]
        case T.LetStmt(name, value):
            return [(line, f"let {name} = {format_expr(value)}")]
        case T.LayoutStmt(name, value):
            return [(line, f"layout {name} = {format_expr(value)}")]
        case T.PatternStmt(name, T.HeadsBlock() as heads):
            rows: list[tuple[int, str, T.Node | T.HeadsBlock]] = [
                (e.span.line, f"{_slice(e.heads)} => ", e.body) for e in heads.entries
            ]
            return _block(f"pattern {name} = heads {{", line, rows, 1, heads.end_line)
        case T.PatternStmt(name, body):
            assert not isinstance(body, T.HeadsBlock)
            return [(line, f"pattern {name} = {format_expr(body)}")]
        case T.ModelStmt(name, layers, entries):
            rows = [(e.span.line, _entry_key(e), e.body) for e in entries]
            return _block(f"model {name} = layers({format_expr(layers)}) {{", line, rows, 1, stmt.end_line)
    raise TypeError(stmt)


def _entry_key(e: T.ModelEntry) -> str:
    match e.kind:
        case "every":
            assert e.key is not None
            return f"every {format_expr(e.key)} => "
        case "range":
            assert isinstance(e.key, T.Slice)
            return f"{_slice(e.key)} => "
    return "else => "


def _block(
    head: str, line: int, rows: Sequence[tuple[int, str, T.Node | T.HeadsBlock]], depth: int, end_line: int
) -> list[tuple[int, str]]:
    out = [(line, head)]
    last = line
    for row_line, key, body in rows:
        pad = INDENT * depth
        if isinstance(body, T.HeadsBlock):
            inner = [(e.span.line, f"{_slice(e.heads)} => ", e.body) for e in body.entries]
            nested = _block(f"{key}heads {{", row_line, inner, depth + 1, body.end_line)
            out.extend((ln, (pad + text) if k == 0 else text) for k, (ln, text) in enumerate(nested))
        else:
            out.append((row_line, pad + key + format_expr(body)))
        last = row_line
    # The '}' keeps its own source line, so a comment just above it stays inside the block.
    out.append((max(last, end_line), INDENT * (depth - 1) + "}"))
    return out


def _merge_comments(lines: list[tuple[int, str]], comments: tuple[T.Comment, ...], text: str) -> str:
    src = text.splitlines()
    blank_before = {k + 1 for k in range(1, len(src)) if src[k - 1].strip() == ""}
    out: list[str] = []
    pending = sorted(comments, key=lambda c: c.line)
    k = 0
    emitted_tags: list[int] = []
    for tag, line_text in lines:
        own: list[T.Comment] = []
        # Comments between the previous output line and this one, in source order: a trailing comment
        # of a line that has no output line of its own (a continued expression) joins the previous
        # output line, unless own-line comments came first (then it becomes one of them).
        while k < len(pending) and pending[k].line < tag:
            if pending[k].own_line or own or not out or "#" in out[-1]:  # '#' only ever starts a comment
                own.append(pending[k])
            else:
                out[-1] = f"{out[-1]}  {pending[k].text}"
            k += 1
        is_statement_start = not line_text.startswith((" ", "}"))
        first_line = own[0].line if own else tag
        if out and is_statement_start and first_line in blank_before:
            out.append("")
        indent = "" if is_statement_start else line_text[: len(line_text) - len(line_text.lstrip())]
        if line_text.lstrip().startswith("}"):
            indent += INDENT  # a comment just above a '}' belongs to the block's body
        for c in own:
            out.append(indent + c.text)
        trailing = ""
        while k < len(pending) and pending[k].line == tag and not pending[k].own_line and tag not in emitted_tags:
            trailing += f"  {pending[k].text}"
            k += 1
        out.append(line_text + trailing)
        emitted_tags.append(tag)
    for c in pending[k:]:
        if c.own_line:
            if out and c.line in blank_before:
                out.append("")
            out.append(c.text)
        elif out and "#" not in out[-1]:
            out[-1] = f"{out[-1]}  {c.text}"
        else:
            out.append(c.text)
    return "\n".join(out) + "\n" if out else ""


def _prec(node: T.Node) -> int:
    match node:
        case T.Binary(op):
            return _POW if op == "**" else _PREC[op]
        case T.Unary("not"):
            return _PREC["not"]
        case T.Unary():
            return _UNARY
        case T.Compare():
            return _PREC["cmp"]
    return _ATOM


def _wrap(node: T.Node, minimum: int) -> str:
    """The node's text inside the parentheses the user wrote, or the one pair precedence needs."""
    text = _expr(node)
    count = 0 if isinstance(node, T.Slice) else node.parens
    if count == 0 and _prec(node) < minimum:
        count = 1
    return "(" * count + text + ")" * count


def _expr(node: T.Node) -> str:
    match node:
        case T.Int(v):
            return str(v)
        case T.Float(v):
            return repr(v)
        case T.Name(name):
            return name
        case T.Unary("not", x):
            return f"not {_wrap(x, _PREC['not'])}"
        case T.Unary(op, x):
            return f"{op}{_wrap(x, _UNARY)}"
        case T.Binary("**", a, b):
            return f"{_wrap(a, _POW + 1)} ** {_wrap(b, _UNARY)}"
        case T.Binary(op, a, b):
            p = _PREC[op]  # left-associative: only the right operand needs the next level
            return f"{_wrap(a, p)} {op} {_wrap(b, p + 1)}"
        case T.Compare(operands, ops):
            parts = [_wrap(operands[0], _PREC["cmp"] + 1)]
            for op, x in zip(ops, operands[1:], strict=True):
                parts.append(f"{op} {_wrap(x, _PREC['cmp'] + 1)}")
            return " ".join(parts)
        case T.Call(func, args, keywords):
            items = [_arg(a) for a in args] + [f"{k.name}={_arg(k.value)}" for k in keywords]
            return f"{func}({', '.join(items)})"
        case T.Attribute(value, attr):
            return f"{value}.{attr}"
        case T.TupleLit(items):
            inner = ", ".join(_wrap(x, 0) for x in items)
            return f"({inner},)" if len(items) == 1 else f"({inner})"
        case T.ListLit(items):
            return "[" + ", ".join(_wrap(x, 0) for x in items) + "]"
        case T.Slice():
            return _slice(node)
    raise TypeError(node)


def _arg(node: T.Node) -> str:
    return _slice(node) if isinstance(node, T.Slice) else _wrap(node, 0)


def _slice(s: T.Slice) -> str:
    def part(x: T.Node | None) -> str:
        return "" if x is None else _wrap(x, _PREC["|"])

    text = f"{part(s.start)}:{part(s.stop)}"
    return text + (f":{part(s.step)}" if s.step is not None else "")
