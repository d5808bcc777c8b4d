"""Syntax tree -> checked IR: names, types, argument lists and value ranges.

Every mistake is reported here, once, at the place it was made. Values that depend on N (`window(N//8)`)
are checked again by `validate(pattern, n)` when N is known, with the same messages and positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from . import expr as E
from . import ir
from . import tree as T
from .expr import Expr
from .source import PatternError, Span, did_you_mean

KEYWORDS = frozenset(
    {"param", "let", "layout", "pattern", "model", "layers", "heads", "every", "else", "and", "or", "not"}
)
PRIMITIVES = frozenset(
    {
        "full", "none", "causal", "window", "stride", "sink", "global", "rows", "cols", "hops",
        "blockwise", "where", "random", "neighborhood", "grid", "topk", "threshold",
        "vertical", "slash",
        "min", "max", "abs", "log2", "true", "false", "given", "N",
    }
)  # fmt: skip
STATEMENT_FORMS = frozenset({"permute"})  # whole right sides of `pattern NAME =`, never values
RESERVED = KEYWORDS | PRIMITIVES | STATEMENT_FORMS
MAX_INT = 1 << 62  # every integer a pattern folds to stays below this, so backends never overflow int64
MAX_GRID_AXES = 16  # a tile-major 3-D order takes 6 axes; the cap keeps layout search and messages small
SCORE_RULES = ("mean", "max", "quest", "compressed")  # topk's score=... (runtime/selection.py: _rule_scores)
SELECTOR_BLOCK = 16  # a selector's block is a whole number of the kernel's smallest tile


# --- values the checker computes -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IntV:
    expr: Expr  # over N (and i, j inside where)


@dataclass(frozen=True, slots=True)
class FloatV:
    value: float


@dataclass(frozen=True, slots=True)
class BoolV:
    expr: Expr  # a constant outside where, a predicate inside


@dataclass(frozen=True, slots=True)
class PatV:
    pattern: ir.Pattern


@dataclass(frozen=True, slots=True)
class SetV:
    tokens: ir.TokenSet


@dataclass(frozen=True, slots=True)
class LayoutV:
    grid: ir.Grid


@dataclass(frozen=True, slots=True)
class TupleV:
    items: tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class GivenV:
    pass


Value: TypeAlias = IntV | FloatV | BoolV | PatV | SetV | LayoutV | TupleV | GivenV

_KIND = {
    IntV: "an integer",
    FloatV: "a number",
    BoolV: "a boolean",
    PatV: "a pattern",
    SetV: "a token set",
    LayoutV: "a layout",
    TupleV: "a tuple",
    GivenV: "'given'",
}


def kind(v: Value) -> str:
    return _KIND[type(v)]


def index_role(name: str) -> str | None:
    """What where(...) reads `name` as: the indices q and k, the coordinates qcD and kcD, or None.

    These names are reserved everywhere: a param or let of that name would mean one thing inside where()
    and another outside it (`param k = 3` then `where(q - k <= k) | window(k)`)."""
    if name in ("q", "k"):
        return "the query index" if name == "q" else "the key index"
    if len(name) >= 3 and name[:2] in ("qc", "kc") and name[2:].isdigit():
        return "a query coordinate" if name[0] == "q" else "a key coordinate"
    return None


@dataclass(frozen=True, slots=True)
class WhereScope:
    """Inside where(...): q and k exist, and coordinates when a layout is named."""

    layout: ir.Grid | None


# --- the checker ----------------------------------------------------------------------------------


def check(module: T.Module, path: str = "<input>", defines: Mapping[str, str] | None = None) -> ir.Program:
    """Check a parsed file and build its IR; `defines` are the `-D name=value` overrides."""
    try:
        return _Checker(module, path, dict(defines or {})).run()
    except RecursionError:
        raise PatternError(f"{path}: definitions are nested too deeply", None, "flatten chains of 'let'") from None


class _Checker:
    def __init__(self, module: T.Module, path: str, defines: dict[str, str]) -> None:
        self.module = module
        self.path = path
        self.defines = defines
        self.defined: dict[str, T.Statement] = {}
        self.values: dict[str, Value] = {}
        self.later = {s.name: s for s in module.statements}
        self.bodies: dict[str, ir.Heads] = {}
        self.permuted: set[str] = set()  # patterns written as permute(...): compiled only on their own

    # statements

    def run(self) -> ir.Program:
        self._check_let_cycles()
        params: list[tuple[str, int | float]] = []
        layouts: list[ir.Grid] = []
        patterns: list[ir.PatternDef] = []
        models: list[ir.Model] = []
        for stmt in self.module.statements:
            self._declare(stmt)
            match stmt:
                case T.ParamStmt(name, value):
                    v = self._param(name, value)
                    params.append((name, v))
                case T.LetStmt(name, value):
                    self.values[name] = self.value(value, None)
                case T.LayoutStmt(name, value):
                    grid = self._layout(name, value)
                    layouts.append(grid)
                    self.values[name] = LayoutV(grid)
                case T.PatternStmt(name, T.Call("permute") as call):
                    inner, perm = _permute_body(self, call)
                    self.permuted.add(name)
                    patterns.append(ir.PatternDef(name, inner, stmt.span, perm))
                case T.PatternStmt(name, body):
                    b = self._body(body, f"the right side of 'pattern {name} ='")
                    if isinstance(b, ir.Heads):
                        self.bodies[name] = b
                    else:
                        self.values[name] = PatV(b)
                    patterns.append(ir.PatternDef(name, b, stmt.span))
                case T.ModelStmt(name, layers, entries):
                    models.append(self._model(name, layers, entries, stmt.span))
        unknown = sorted(set(self.defines) - {n for n, _ in params})
        if unknown:
            hint = did_you_mean(unknown[0], [n for n, _ in params])
            have = ", ".join(n for n, _ in params) or "none"
            raise PatternError(
                f"-D {unknown[0]}: {self.path} has no param '{unknown[0]}' (its params: {have})", None, hint
            )
        return ir.Program(self.path, tuple(params), tuple(layouts), tuple(patterns), tuple(models))

    def _declare(self, stmt: T.Statement) -> None:
        if stmt.name in RESERVED:
            what = "a keyword" if stmt.name in KEYWORDS else "a built-in name"
            raise PatternError(f"'{stmt.name}' is {what} and cannot be redefined", stmt.span, "choose another name")
        role = index_role(stmt.name)
        if role is not None:
            raise PatternError(
                f"'{stmt.name}' is {role} inside where(...) and cannot be redefined", stmt.span,
                f"choose another name: inside where(...) '{stmt.name}' would still mean {role}",
            )  # fmt: skip
        if stmt.name in self.defined:
            first = self.defined[stmt.name].span
            raise PatternError(f"'{stmt.name}' is defined twice (first at line {first.line})", stmt.span)
        self.defined[stmt.name] = stmt

    def _check_let_cycles(self) -> None:
        lets = {s.name: s for s in self.module.statements if isinstance(s, T.LetStmt | T.PatternStmt)}
        graph = {name: [n for n in _names_in(s.body if isinstance(s, T.PatternStmt) else s.value) if n in lets]
                 for name, s in lets.items()}  # fmt: skip

        state: dict[str, int] = {}

        def visit(name: str, path: list[str]) -> None:
            state[name] = 1
            for nxt in graph[name]:
                if state.get(nxt) == 1:
                    cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [name, nxt]
                    raise PatternError(
                        f"cycle in definitions: {' -> '.join(cycle)}",
                        lets[nxt].span,
                        "a name cannot be defined in terms of itself",
                    )
                if state.get(nxt) is None:
                    visit(nxt, path + [nxt])
            state[name] = 2

        for name in graph:
            if name not in state:
                visit(name, [name])

    def _param(self, name: str, node: T.Node) -> int | float:
        if name in self.defines:
            text = self.defines[name]
            value = _parse_define(name, text)
        else:
            v = self.value(node, None)
            match v:
                case IntV(e) if not E.free_vars(e):
                    value = int(E.evaluate_int(e))
                case IntV():
                    raise PatternError(
                        f"param '{name}' depends on N; a param must be a constant", node.span,
                        "use N directly in the pattern, e.g. window(N // 8)",
                    )  # fmt: skip
                case FloatV(f):
                    value = f
                case _:
                    raise PatternError(f"param '{name}' must be a number, not {kind(v)}", node.span)
        self.values[name] = IntV(E.const(value)) if isinstance(value, int) else FloatV(value)
        return value

    def _layout(self, name: str, node: T.Node) -> ir.Grid:
        if not (isinstance(node, T.Call) and node.func == "grid"):
            raise PatternError("a layout must be grid(n1, ..., nk)", node.span, "e.g. layout image = grid(64, 64)")
        extra = {"prefix": 0, "suffix": 0}
        for kw in node.keywords:
            if kw.name not in extra:
                raise PatternError(f"grid has no argument '{kw.name}'", kw.span,
                                   "extra tokens before or after the grid: grid(16, 32, 32, prefix=226)")  # fmt: skip
            extra[kw.name] = self._const_int(kw.value, None, f"grid's {kw.name}", minimum=0)
        if not 1 <= len(node.args) <= MAX_GRID_AXES:
            raise PatternError(f"grid takes 1 to {MAX_GRID_AXES} axis lengths, not {len(node.args)}", node.span)
        dims = tuple(self._const_int(a, None, "a grid axis length", minimum=1) for a in node.args)
        return ir.Grid(name, dims, node.span, extra["prefix"], extra["suffix"])

    def _body(self, node: T.Node | T.HeadsBlock, what: str) -> ir.Body:
        if isinstance(node, T.HeadsBlock):
            return self._heads(node)
        if isinstance(node, T.Name) and node.id in self.bodies:
            return self.bodies[node.id]  # a heads pattern by name, alone: a model layer or an alias
        return self.pattern(node, None, what)

    def _heads(self, node: T.HeadsBlock) -> ir.Heads:
        if not node.entries:
            raise PatternError("heads { } needs at least one entry", node.span, "e.g. heads { 0:8 => causal }")
        ranges = []
        for entry in node.entries:
            start, stop = self._const_range(entry.heads, "head")
            ranges.append((start, stop, entry, self.pattern(entry.body, None, "a head's pattern")))
        ranges.sort(key=lambda r: (r[0], r[1]))
        expect = 0
        for start, stop, entry, _ in ranges:
            if start > expect:
                raise PatternError(
                    f"heads {expect}:{start} have no pattern (a gap before this range)", entry.heads.span,
                    "head ranges must cover 0..H exactly once",
                )  # fmt: skip
            if start < expect:
                raise PatternError(
                    f"head range {start}:{stop} overlaps heads {start}:{min(stop, expect)} of another range",
                    entry.heads.span,
                    "head ranges must cover 0..H exactly once",
                )
            expect = stop
        return ir.Heads(tuple(ir.HeadRange(s, e, p) for s, e, _, p in ranges))

    def _const_range(self, s: T.Slice, what: str) -> tuple[int, int]:
        if s.start is None or s.stop is None or s.step is not None:
            raise PatternError(f"a {what} range is start:stop with both bounds", s.span, "e.g. 0:4")
        start = self._const_int(s.start, None, f"a {what} index", minimum=0)
        stop = self._const_int(s.stop, None, f"a {what} index", minimum=0)
        if stop <= start:
            raise PatternError(f"empty {what} range {start}:{stop}", s.span, "the stop must exceed the start")
        return start, stop

    def _model(self, name: str, layers_node: T.Node, entries: tuple[T.ModelEntry, ...], span: Span) -> ir.Model:
        layers = self._const_int(layers_node, None, "the layer count", minimum=1)
        if layers > 100_000:
            raise PatternError(f"{layers} layers is more than the 100000 supported", layers_node.span)
        schedule: list[ir.Body | None] = [None] * layers
        heads: tuple[int, Span] | None = None  # the first heads block's count, and where it is
        for k, entry in enumerate(entries):
            body = self._body(entry.body, f"a layer's pattern in model '{name}'")
            match entry.kind:
                case "every":
                    assert entry.key is not None
                    n = self._const_int(entry.key, None, "'every'", minimum=1)
                    chosen = range(0, layers, n)
                case "range":
                    assert isinstance(entry.key, T.Slice)
                    start, stop = self._const_range(entry.key, "layer")
                    if stop > layers:
                        raise PatternError(
                            f"layer range {start}:{stop} goes past the model's {layers} layers", entry.key.span
                        )
                    chosen = range(start, stop)
                case _:
                    if k != len(entries) - 1:
                        raise PatternError("'else' must be the last entry", entry.span)
                    chosen = range(layers)
            used = False
            for layer in chosen:
                if schedule[layer] is None:
                    schedule[layer] = body
                    used = True
            if used and isinstance(body, ir.Heads):
                if heads is None:
                    heads = (body.count, entry.body.span)
                elif heads[0] != body.count:
                    raise PatternError(
                        f"model '{name}' has heads blocks of {heads[0]} and {body.count} heads; its layers must agree",
                        entry.body.span,
                        f"every layer of a model runs with the same head count (the first is at line {heads[1].line})",
                    )
        missing = [layer for layer, b in enumerate(schedule) if b is None]
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
            raise PatternError(f"model '{name}' gives no pattern to layers {shown}", span, "add an entry 'else => ...'")
        return ir.Model(name, tuple(b for b in schedule if b is not None), span)

    # expressions

    def pattern(self, node: T.Node, scope: WhereScope | None, what: str) -> ir.Pattern:
        v = self.value(node, scope)
        if not isinstance(v, PatV):
            hint = "compare inside where(...), e.g. where(q - k < 8)" if isinstance(v, BoolV) else None
            raise PatternError(f"{what} must be a pattern, not {kind(v)}", node.span, hint)
        return v.pattern

    def integer(self, node: T.Node, scope: WhereScope | None, what: str) -> Expr:
        v = self.value(node, scope)
        if not isinstance(v, IntV):
            raise PatternError(f"{what} must be an integer, not {kind(v)}", node.span)
        return v.expr

    def _const_int(self, node: T.Node, scope: WhereScope | None, what: str, minimum: int | None = None) -> int:
        e = self.integer(node, scope, what)
        if E.free_vars(e):
            raise PatternError(f"{what} must be a constant (it may not depend on N)", node.span)
        value = E.evaluate_int(e)
        if minimum is not None and value < minimum:
            raise PatternError(f"{what} must be at least {minimum}, got {value}", node.span)
        return value

    def value(self, node: T.Node, scope: WhereScope | None) -> Value:
        match node:
            case T.Int(v):
                return IntV(E.const(v))
            case T.Float(v):
                return FloatV(v)
            case T.Name(name):
                return self._name(name, node.span, scope)
            case T.Unary(op, operand):
                return self._unary(op, operand, node.span, scope)
            case T.Binary(op) if op in _ASSOCIATIVE:
                return self._chain(node, scope)
            case T.Binary(op, left, right):
                return self._binary(op, left, right, node.span, scope)
            case T.Compare(operands, ops):
                return self._compare(operands, ops, node.span, scope)
            case T.Call():
                return self._call(node, scope)
            case T.Attribute(value, attr):
                return self._layout_part(value, attr, node.span, scope)
            case T.TupleLit(items):
                return TupleV(tuple(self.value(x, scope) for x in items))
            case T.ListLit(items):
                return SetV(ir.TokenList(tuple(self.integer(x, None, "a token index") for x in items), node.span))
            case T.Slice():
                return SetV(self._slice(node))
        raise PatternError("unsupported expression", getattr(node, "span", None))

    def _layout_part(self, name: str, attr: str, span: Span, scope: WhereScope | None) -> Value:
        """`L.prefix` / `L.suffix`: the extra tokens of a layout, as the token slice they occupy."""
        lv = self._name(name, span, scope)
        if not isinstance(lv, LayoutV):
            raise PatternError(f"'{name}.{attr}': '{name}' is {kind(lv)}, not a layout", span)
        g = lv.grid
        parts = {"prefix": (0, g.prefix), "suffix": (g.prefix + g.cells, g.size)}
        if attr not in parts:
            raise PatternError(f"a layout has no part '{attr}'", span, f"{name}.prefix or {name}.suffix")
        start, stop = parts[attr]
        return SetV(ir.TokenSlice(E.const(start), E.const(stop), E.const(1), span))

    def _slice(self, node: T.Slice) -> ir.TokenSlice:
        start = None if node.start is None else self.integer(node.start, None, "a slice bound")
        stop = None if node.stop is None else self.integer(node.stop, None, "a slice bound")
        step = E.const(1) if node.step is None else self.integer(node.step, None, "a slice step")
        tokens = ir.TokenSlice(start, stop, step, node.span)
        validate(ir.Rows(tokens), None)
        return tokens

    def _name(self, name: str, span: Span, scope: WhereScope | None) -> Value:
        builtin = _BUILTIN_NAMES.get(name)
        if builtin is not None:
            return builtin
        if name in _CALL_ONLY:
            raise PatternError(f"'{name}' needs arguments", span, f"e.g. {_CALL_ONLY[name]}")
        if name in KEYWORDS:
            raise PatternError(f"'{name}' is a keyword, not a value", span, _KEYWORD_HINTS.get(name))
        if name == "given":
            return GivenV()
        if index_role(name) is not None:
            if scope is None:
                raise PatternError(f"'{name}' exists only inside where(...)", span, f"e.g. where({name} % 64 == 0)")
            if name in ("q", "k"):
                return IntV(E.I if name == "q" else E.J)
            return IntV(self._coordinate(name, span, scope))
        if name in self.values:
            return self.values[name]
        if name in self.bodies:
            raise PatternError(f"'{name}' is a heads pattern and cannot be combined with others", span)
        if name in self.permuted:
            raise PatternError(
                f"'{name}' is a permuted pattern and cannot be used in another pattern or a model", span,
                "its permutation comes with each call: compile it on its own, or name its body with a let",
            )  # fmt: skip
        if name in self.later:
            raise PatternError(
                f"'{name}' is used before it is defined (line {self.later[name].span.line})",
                span,
                f"move the definition of '{name}' above this line",
            )
        known = set(self.values) | set(_BUILTIN_NAMES) | set(_CALL_ONLY) | ({"q", "k"} if scope is not None else set())
        raise PatternError(f"unknown name '{name}'", span, did_you_mean(name, known))

    def _coordinate(self, name: str, span: Span, scope: WhereScope) -> Expr:
        from .semantics import coordinate

        if scope.layout is None:
            raise PatternError(
                f"'{name}' needs a layout", span, "name one first: where(my_grid, ...) with layout my_grid = grid(...)"
            )
        axis = int(name[2:])
        if axis >= len(scope.layout.dims):
            raise PatternError(
                f"'{name}': layout '{scope.layout.name}' has {len(scope.layout.dims)} axes (0..{len(scope.layout.dims) - 1})",
                span,
            )
        return coordinate(E.I if name[0] == "q" else E.J, scope.layout, axis)

    def _unary(self, op: str, operand: T.Node, span: Span, scope: WhereScope | None) -> Value:
        v = self.value(operand, scope)
        match op, v:
            case "-", IntV(e):
                return IntV(E.sub(E.const(0), e))
            case "-", FloatV(f):
                return FloatV(-f)
            case "+", IntV() | FloatV():
                return v
            case "~", PatV(p):
                return PatV(ir.Complement(p))
            case "not", BoolV(e):
                return BoolV(E.negate(e))
            case "~", BoolV():
                raise PatternError("'~' complements a pattern; negate a condition with 'not'", span)
            case "not", PatV():
                raise PatternError("'not' negates a condition; complement a pattern with '~'", span)
        raise PatternError(f"'{op}' cannot be applied to {kind(v)}", span)

    def _chain(self, node: T.Binary, scope: WhereScope | None) -> Value:
        """`a | b | c | ...` (and likewise '&', 'and', 'or'): the parser nests a chain to the left, as deep as
        it is long. Its operands are collected without recursion and checked pair by pair from the left (the
        first mismatch is reported where it was before), then combined into a balanced tree: the stages after
        the checker, which recurse, see a depth of log2(terms) whatever the chain's length."""
        links: list[T.Binary] = []
        first: T.Node = node
        while isinstance(first, T.Binary) and first.op == node.op:
            links.append(first)
            first = first.left
        values = [self.value(first, scope)]
        for link in reversed(links):  # innermost first: each combines everything to its left with its right
            v = self.value(link.right, scope)
            if not (isinstance(values[0], PatV) and isinstance(v, PatV) and node.op in ("|", "&")
                    or isinstance(values[0], BoolV) and isinstance(v, BoolV) and node.op in ("and", "or")):  # fmt: skip
                raise _mismatch(node.op, values[0], v, link.span)
            values.append(v)
        match node.op:
            case "|":
                return PatV(_balanced([v.pattern for v in values if isinstance(v, PatV)], ir.Union))
            case "&":
                return PatV(_balanced([v.pattern for v in values if isinstance(v, PatV)], ir.Inter))
            case "and":
                return BoolV(E.conj(*(v.expr for v in values if isinstance(v, BoolV))))
        return BoolV(E.disj(*(v.expr for v in values if isinstance(v, BoolV))))

    def _binary(self, op: str, left: T.Node, right: T.Node, span: Span, scope: WhereScope | None) -> Value:
        a, b = self.value(left, scope), self.value(right, scope)
        match op, a, b:
            case "-", PatV(x), PatV(y):
                return PatV(ir.Inter(x, ir.Complement(y)))
            case "+" | "-" | "*" | "//" | "%" | "**", IntV(x), IntV(y):
                return IntV(self._arith(op, x, y, right.span, span))
            case "+" | "-" | "*", IntV() | FloatV(), IntV() | FloatV() if not (
                isinstance(a, IntV) and E.free_vars(a.expr) or isinstance(b, IntV) and E.free_vars(b.expr)
            ):
                fa, fb = _as_float(a), _as_float(b)
                return FloatV(fa + fb if op == "+" else fa - fb if op == "-" else fa * fb)
        raise _mismatch(op, a, b, span)

    def _arith(self, op: str, x: Expr, y: Expr, rspan: Span, span: Span) -> Expr:
        if op in ("//", "%"):
            if E.free_vars(y) & {"i", "j"}:
                raise PatternError(
                    f"the right side of '{op}' may not depend on q or k", rspan,
                    "divisors must be constants, params or expressions of N",
                )  # fmt: skip
            if isinstance(y, E.Const) and int(y.value) <= 0:
                raise PatternError(f"the right side of '{op}' must be positive, got {y.value}", rspan)
        if op == "**":
            if not isinstance(y, E.Const) or int(y.value) < 0:
                raise PatternError("an exponent must be a non-negative constant", rspan)
            if int(y.value) > 64:
                raise PatternError("an exponent above 64 is not supported", rspan)
            if (
                isinstance(x, E.Const)
                and abs(int(x.value)) >= 2
                and (abs(int(x.value)).bit_length() - 1) * int(y.value) >= 62
            ):
                raise PatternError(f"{x.value} ** {y.value} is too large", span, "integers must stay below 2**62")
        out = E.arith(op, x, y)  # type: ignore[arg-type]
        if isinstance(out, E.Const) and abs(int(out.value)) >= MAX_INT:
            raise PatternError(f"the value {out.value} is too large", span, "integers must stay below 2**62")
        return out

    def _compare(
        self, operands: tuple[T.Node, ...], ops: tuple[str, ...], span: Span, scope: WhereScope | None
    ) -> Value:
        if scope is None:
            raise PatternError("comparisons belong inside where(...)", span, "e.g. where(k % 128 >= 120)")
        values = [self.integer(x, scope, "a compared value") for x in operands]
        parts = [E.cmp(op, values[k], values[k + 1]) for k, op in enumerate(ops)]  # type: ignore[arg-type]
        return BoolV(E.conj(*parts))

    def _call(self, node: T.Call, scope: WhereScope | None) -> Value:
        name = node.func
        if name in _BUILTIN_NAMES or name == "given":
            raise PatternError(f"'{name}' takes no arguments", node.span, f"write it bare: {name}")
        handler = _CALLS.get(name)
        if handler is None:
            if name in self.values or name in self.later:
                raise PatternError(f"'{name}' is not a function", node.span)
            raise PatternError(f"unknown function '{name}'", node.span, did_you_mean(name, set(_CALLS)))
        return handler(self, node, scope)


# --- argument binding ----------------------------------------------------------------------------


def _bind(
    node: T.Call, positional: tuple[str, ...], required: int, keywords: tuple[str, ...] = ()
) -> dict[str, T.Node]:
    """Match a call's arguments to a signature, with messages that name the function."""
    names = positional + tuple(k for k in keywords if k not in positional)
    if len(node.args) > len(positional):
        raise PatternError(
            f"{node.func} takes at most {len(positional)} positional argument{'s' if len(positional) != 1 else ''}, "
            f"got {len(node.args)}",
            node.args[len(positional)].span,
            f"signature: {_signature(node.func, positional, required, keywords)}",
        )
    bound: dict[str, T.Node] = dict(zip(positional, node.args, strict=False))
    for kw in node.keywords:
        if kw.name not in names:
            raise PatternError(
                f"{node.func} has no argument '{kw.name}'",
                kw.span,
                did_you_mean(kw.name, names) or f"signature: {_signature(node.func, positional, required, keywords)}",
            )
        if kw.name in bound:
            raise PatternError(f"{node.func}: argument '{kw.name}' given twice", kw.span)
        bound[kw.name] = kw.value
    missing = [n for n in positional[:required] if n not in bound]
    if missing:
        raise PatternError(
            f"{node.func} is missing its argument '{missing[0]}'",
            node.span,
            f"signature: {_signature(node.func, positional, required, keywords)}",
        )
    return bound


def _signature(func: str, positional: tuple[str, ...], required: int, keywords: tuple[str, ...]) -> str:
    parts = list(positional[:required]) + [f"{p}=..." for p in positional[required:]]
    parts += [f"{k}=..." for k in keywords if k not in positional]
    return f"{func}({', '.join(parts)})"


def _checked(p: ir.Pattern) -> PatV:
    validate(p, None)
    return PatV(p)


def _token_set(c: _Checker, node: T.Node, func: str) -> ir.TokenSet:
    v = c.value(node, None)
    match v:
        case SetV(tokens):
            return tokens
        case IntV(e):
            return ir.TokenList((e,), node.span)
    raise PatternError(f"{func} takes a token set, not {kind(v)}", node.span, "e.g. 0:16, -16:, 0:N:64 or [0, 5, 9]")


def _call_window(c: _Checker, node: T.Call, scope: WhereScope | None) -> Value:
    if len(node.args) == 3 and not node.keywords:
        # LANGUAGE.md names it: window(a, b, dilation=d). A third number in a row reads as a third size.
        from .fmt import format_expr

        a, b, d = (format_expr(x) for x in node.args)
        raise PatternError("window's dilation is given by name", node.args[2].span, f"write window({a}, {b}, dilation={d})")
    args = _bind(node, ("before", "after"), 0, ("dilation",))
    if "before" not in args:
        raise PatternError("window needs a size", node.span, "window(r), window(a, b) or window(before=a, after=b)")
    before = c.integer(args["before"], None, "window's size")
    if "after" in args:
        after = c.integer(args["after"], None, "window's 'after'")
    elif any(k.name == "before" for k in node.keywords):
        raise PatternError("window(before=...) needs after=... too", node.span, "or write window(r) for both sides")
    else:
        after = before
    dilation = c.integer(args["dilation"], None, "window's dilation") if "dilation" in args else E.const(1)
    return _checked(ir.Window(before, after, dilation, node.span))


def _call_one_int(cls: Callable[..., ir.Pattern], arg: str) -> Callable[[_Checker, T.Call, WhereScope | None], Value]:
    def handler(c: _Checker, node: T.Call, scope: WhereScope | None) -> Value:
        args = _bind(node, (arg,), 1)
        return _checked(cls(c.integer(args[arg], None, f"{node.func}'s {arg}"), node.span))

    return handler


def _call_tokens(cls: Callable[[ir.TokenSet], ir.Pattern]) -> Callable[[_Checker, T.Call, WhereScope | None], Value]:
    def handler(c: _Checker, node: T.Call, scope: WhereScope | None) -> Value:
        args = _bind(node, ("tokens",), 1)
        return PatV(cls(_token_set(c, args["tokens"], node.func)))

    return handler


def _call_hops(c: _Checker, node: T.Call, scope: WhereScope | None) -> Value:
    args = _bind(node, ("base",), 0)
    base = c._const_int(args["base"], None, "hops' base", minimum=2) if "base" in args else 2
    return PatV(ir.Hops(base))


def _call_blockwise(c: _Checker, node: T.Call, scope: WhereScope | None) -> Value:
    args = _bind(node, ("block", "pattern"), 2)
    block = c.integer(args["block"], None, "blockwise's block size")
    inner = c.pattern(args["pattern"], None, "blockwise's second argument")
    for sub in ir.walk(inner):
        if isinstance(sub, ir.TopK | ir.Threshold | ir.Vertical | ir.Slash):
            raise PatternError(f"{type(sub).__name__.lower()} cannot be used inside blockwise", sub.span,
                               "selectors already work on blocks: give them block=...")  # fmt: skip
        if isinstance(sub, ir.Neighborhood) or isinstance(sub, ir.Where) and sub.layout is not None:
            raise PatternError("a layout pattern cannot be used inside blockwise", node.span)
    return _checked(ir.Blockwise(block, inner, node.span))


def _call_where(c: _Checker, node: T.Call, scope: WhereScope | None) -> Value:
    if scope is not None:
        raise PatternError("where(...) cannot be nested", node.span)
    if node.keywords:
        raise PatternError("where takes no keyword arguments", node.keywords[0].span,
                           "to compare, write '==': where(q == k)")  # fmt: skip
    if len(node.args) not in (1, 2):
        raise PatternError(f"where takes a condition (and optionally a layout first), got {len(node.args)} arguments",
                           node.span, "where(q - k < 8) or where(image, abs(qc0 - kc0) <= 1)")  # fmt: skip
    layout = None
    if len(node.args) == 2:
        if (
            isinstance(node.args[0], T.Compare)
            or isinstance(node.args[0], T.Binary | T.Unary)
            and node.args[0].op in ("and", "or", "not")
        ):
            raise PatternError("where takes one condition; with two arguments the first is a layout",
                               node.args[0].span, "combine conditions with 'and' / 'or': where(a and b)")  # fmt: skip
        lv = c.value(node.args[0], None)
        if not isinstance(lv, LayoutV):
            raise PatternError(f"where's first argument must be a layout, not {kind(lv)}", node.args[0].span)
        layout = lv.grid
    cond = c.value(node.args[-1], WhereScope(layout))
    if not isinstance(cond, BoolV):
        raise PatternError(f"where needs a condition, not {kind(cond)}", node.args[-1].span,
                           "e.g. where(k % 128 >= 120)")  # fmt: skip
    return _checked(ir.Where(cond.expr, layout, node.span))


def _call_random(c: _Checker, node: T.Call, scope: WhereScope | None) -> Value:
    args = _bind(node, ("count", "seed"), 1)
    count = c.integer(args["count"], None, "random's count")
    seed = c._const_int(args["seed"], None, "random's seed", minimum=0) if "seed" in args else 0
    return _checked(ir.Random(count, seed, node.span))


def _per_axis(c: _Checker, node: T.Node | None, ndim: int, default: Any, what: str, want_bool: bool) -> tuple[Any, ...]:
    if node is None:
        return (default,) * ndim
    v = c.value(node, None)
    items = v.items if isinstance(v, TupleV) else (v,) * ndim
    if len(items) != ndim:
        raise PatternError(f"{what} has {len(items)} values but the layout has {ndim} axes", node.span)
    out: list[Any] = []
    for item in items:
        if want_bool:
            if not (isinstance(item, BoolV) and isinstance(item.expr, E.Const)):
                raise PatternError(f"{what} must be true or false (one per axis, or one for all)", node.span)
            out.append(bool(item.expr.value))
        else:
            if not (isinstance(item, IntV) and isinstance(item.expr, E.Const)):
                raise PatternError(f"{what} must be a constant integer (one per axis, or one for all)", node.span)
            out.append(int(item.expr.value))
    return tuple(out)


def _call_neighborhood(c: _Checker, node: T.Call, scope: WhereScope | None) -> Value:
    args = _bind(node, ("layout", "kernel", "dilation", "stride", "causal"), 2)
    lv = c.value(args["layout"], None)
    if not isinstance(lv, LayoutV):
        raise PatternError(f"neighborhood's first argument must be a layout, not {kind(lv)}", args["layout"].span,
                           "declare one: layout image = grid(64, 64)")  # fmt: skip
    grid = lv.grid
    nd = len(grid.dims)
    kernel = _per_axis(c, args["kernel"], nd, None, "kernel", False)
    dilation = _per_axis(c, args.get("dilation"), nd, 1, "dilation", False)
    stride = _per_axis(c, args.get("stride"), nd, 1, "stride", False)
    causal = _per_axis(c, args.get("causal"), nd, False, "causal", True)
    for a in range(nd):
        n, k, d, s = grid.dims[a], kernel[a], dilation[a], stride[a]
        where_k = args["kernel"].span
        if k < 1:
            raise PatternError(f"kernel must be at least 1, got {k} on axis {a}", where_k)
        if d < 1:
            raise PatternError(f"dilation must be at least 1, got {d} on axis {a}", args["dilation"].span)
        if s < 1:
            raise PatternError(f"stride must be at least 1, got {s} on axis {a}", args["stride"].span)
        if d > n:
            raise PatternError(f"dilation {d} is larger than axis {a} (length {n})", args["dilation"].span)
        positions = n // d
        if not causal[a] and k > positions:
            if d > 1:
                msg = (f"kernel {k} does not fit axis {a}: length {n} with dilation {d} leaves "
                       f"{positions} position{'s' if positions != 1 else ''} per dilation group")  # fmt: skip
            else:
                msg = f"kernel {k} is larger than axis {a} (length {n})"
            raise PatternError(msg, where_k, "a non-causal neighborhood needs at least kernel positions on every axis")
    return PatV(ir.Neighborhood(grid, kernel, dilation, stride, causal))


def _selector_blocks(c: _Checker, node: T.Node, func: str) -> tuple[int, int | None]:
    """`block=b` (square blocks) or `block=(bq, bk)`: query blocks of bq tokens, key blocks of bk (HiP)."""
    if isinstance(node, T.TupleLit):
        if len(node.items) != 2:
            raise PatternError(f"{func}'s block is b or (query block, key block), got {len(node.items)} sizes", node.span)
        bq, bk = (_selector_block(c, x, func) for x in node.items)
        return bq, (bk if bk != bq else None)
    return _selector_block(c, node, func), None


def _selector_block(c: _Checker, node: T.Node, func: str) -> int:
    block = c._const_int(node, None, f"{func}'s block", minimum=1)
    if block % SELECTOR_BLOCK:
        raise PatternError(
            f"a selector's block must be a multiple of {SELECTOR_BLOCK} to compile (the kernel's smallest tile), "
            f"got {block}", node.span,
            f"e.g. block={max(SELECTOR_BLOCK, block // SELECTOR_BLOCK * SELECTOR_BLOCK)}",
        )  # fmt: skip
    return block


def _call_topk(c: _Checker, node: T.Call, scope: WhereScope | None) -> Value:
    args = _bind(node, ("count", "block", "score", "share"), 1, ("block", "score", "share"))
    count: int | E.Expr = 0
    fraction = None
    cv = c.value(args["count"], None)
    if isinstance(cv, FloatV):  # a budget as a share of the candidates (SparseD: the top 30%)
        fraction = _as_float(cv)
        if not 0.0 < fraction <= 1.0:
            raise PatternError(
                f"topk's fraction must be in (0, 1], got {fraction}", args["count"].span,
                "a count is a whole number (topk(16, ...)); a fraction of the candidates a number below 1",
            )  # fmt: skip
    elif isinstance(cv, IntV) and E.free_vars(cv.expr):
        count = cv.expr  # a count that grows with N, checked at each N (`_constraints`)
    else:
        count = c._const_int(args["count"], None, "topk's count", minimum=1)
    if "block" not in args:
        raise PatternError("topk needs block=...", node.span, "e.g. topk(16, block=64)")
    block, key_block = _selector_blocks(c, args["block"], "topk")
    given, score, share = False, "mean", False
    if "score" in args:
        match args["score"]:
            case T.Name(name) if name in SCORE_RULES:
                score = name
            case T.Name(name) if name != "given":
                raise PatternError(
                    f"topk has no scoring rule '{name}': " + ", ".join(SCORE_RULES) + " or given", args["score"].span,
                )  # fmt: skip
            case other if isinstance(c.value(other, None), GivenV):
                given = True
            case other:
                raise PatternError(
                    "topk's score is a rule: " + ", ".join(SCORE_RULES) + " or given (scores supplied at run time)",
                    other.span,
                )  # fmt: skip
    if "share" in args:
        if not (isinstance(args["share"], T.Name) and args["share"].id == "kv"):
            raise PatternError("topk's share can only be 'kv' (one selection per KV head)", args["share"].span)
        share = True
    return PatV(ir.TopK(count, block, given, node.span, fraction, score, share, key_block))


def _call_threshold(c: _Checker, node: T.Call, scope: WhereScope | None) -> Value:
    args = _bind(node, ("mass", "block"), 1, ("block",))
    mv = c.value(args["mass"], None)
    mass = (
        _as_float(mv) if isinstance(mv, FloatV | IntV) and not (isinstance(mv, IntV) and E.free_vars(mv.expr)) else None
    )
    if mass is None:
        if isinstance(mv, IntV):
            raise PatternError("threshold's mass must be a constant (it may not depend on N)", args["mass"].span)
        raise PatternError(f"threshold's mass must be a number, not {kind(mv)}", args["mass"].span)
    if not 0.0 < mass <= 1.0:
        raise PatternError(f"threshold's mass must be in (0, 1], got {mass}", args["mass"].span)
    if "block" not in args:
        raise PatternError("threshold needs block=...", node.span, "e.g. threshold(0.9, block=128)")
    block, key_block = _selector_blocks(c, args["block"], "threshold")
    return PatV(ir.Threshold(mass, block, node.span, key_block))


LAST_ROWS = 64  # vertical's and slash's default: MInference scores from the last 64 queries


def _call_token_selector(c: _Checker, node: T.Call, scope: WhereScope | None) -> Value:
    """`vertical(n, last=r)` / `slash(n, last=r)`: n key columns / diagonals scored from the last r queries."""
    args = _bind(node, ("count", "last"), 1, ("last",))
    what = node.func
    cv = c.value(args["count"], None)
    if isinstance(cv, IntV) and E.free_vars(cv.expr):
        raise PatternError(f"{what}'s count must be a number once params are set, not a function of N",
                           args["count"].span, f"e.g. {what}(1000)")  # fmt: skip
    if isinstance(cv, FloatV):
        raise PatternError(f"{what}'s count is a whole number of {'columns' if what == 'vertical' else 'diagonals'}, "
                           f"got {_as_float(cv)}", args["count"].span, f"e.g. {what}(1000)")  # fmt: skip
    count = c._const_int(args["count"], None, f"{what}'s count", minimum=1)
    last = c._const_int(args["last"], None, f"{what}'s last", minimum=1) if "last" in args else LAST_ROWS
    cls = ir.Vertical if what == "vertical" else ir.Slash
    return PatV(cls(count, last, node.span))


def _call_minmax(c: _Checker, node: T.Call, scope: WhereScope | None) -> Value:
    if node.keywords:
        raise PatternError(f"{node.func} takes no keyword arguments", node.keywords[0].span)
    if len(node.args) < 2:
        raise PatternError(f"{node.func} needs at least two arguments", node.span)
    values = [c.integer(a, scope, f"{node.func}'s argument") for a in node.args]
    out = values[0]
    for v in values[1:]:
        out = E.minimum(out, v) if node.func == "min" else E.maximum(out, v)
    return IntV(out)


def _call_abs(c: _Checker, node: T.Call, scope: WhereScope | None) -> Value:
    args = _bind(node, ("x",), 1)
    return IntV(E.absolute(c.integer(args["x"], scope, "abs's argument")))


def _call_log2(c: _Checker, node: T.Call, scope: WhereScope | None) -> Value:
    args = _bind(node, ("x",), 1)
    return IntV(E.log2(c.integer(args["x"], scope, "log2's argument")))


def _call_grid(c: _Checker, node: T.Call, scope: WhereScope | None) -> Value:
    raise PatternError("grid(...) defines a layout", node.span, "write: layout name = grid(...)")


def _call_permute(c: _Checker, node: T.Call, scope: WhereScope | None) -> Value:
    raise PatternError(
        "permute(...) must be the whole right side of a pattern", node.span,
        "write: pattern name = permute(P, segment=256, by=given)",
    )  # fmt: skip


def _permute_body(c: _Checker, node: T.Call) -> tuple[ir.Pattern, ir.Permute]:
    """`permute(P, segment=s, by=given)`: the body P and its segment (a constant of at least 1)."""
    args = _bind(node, ("pattern",), 1, ("segment", "by"))
    for needed in ("segment", "by"):
        if needed not in args:
            raise PatternError(f"permute needs {needed}=...", node.span, "e.g. permute(P, segment=256, by=given)")
    if not isinstance(c.value(args["by"], None), GivenV):
        raise PatternError(
            "permute's by can only be 'given' (the caller passes the permutation at run time)", args["by"].span,
            "write by=given and call attn(q, k, v, permutation=perm)",
        )  # fmt: skip
    segment = c._const_int(args["segment"], None, "permute's segment", minimum=1)
    inner = c.pattern(args["pattern"], None, "permute's first argument")
    return inner, ir.Permute(segment, node.span)


_CALLS: dict[str, Callable[[_Checker, T.Call, WhereScope | None], Value]] = {
    "window": _call_window,
    "stride": _call_one_int(ir.Stride, "step"),
    "sink": _call_one_int(ir.Sink, "count"),
    "global": _call_tokens(ir.Global),
    "rows": _call_tokens(ir.Rows),
    "cols": _call_tokens(ir.Cols),
    "hops": _call_hops,
    "blockwise": _call_blockwise,
    "where": _call_where,
    "random": _call_random,
    "neighborhood": _call_neighborhood,
    "topk": _call_topk,
    "threshold": _call_threshold,
    "vertical": _call_token_selector,
    "slash": _call_token_selector,
    "min": _call_minmax,
    "max": _call_minmax,
    "abs": _call_abs,
    "log2": _call_log2,
    "grid": _call_grid,
    "permute": _call_permute,
}

_KEYWORD_HINTS = {
    "layers": "a model starts with it: model m = layers(24) { every 4 => causal  else => window(127) }",
    "every": "'every n => ...' is an entry of a model's { }",
    "else": "'else => ...' is the last entry of a model's { }",
    "heads": "pattern p = heads { 0:4 => causal  4:8 => full }",
}

_BUILTIN_NAMES: dict[str, Value] = {
    "full": PatV(ir.Full()),
    "none": PatV(ir.Empty()),
    "causal": PatV(ir.Causal()),
    "true": BoolV(E.TRUE),
    "false": BoolV(E.FALSE),
    "N": IntV(E.N),
}

_CALL_ONLY = {
    "window": "window(256)",
    "stride": "stride(128)",
    "sink": "sink(4)",
    "global": "global(0:16)",
    "rows": "rows(0:16)",
    "cols": "cols(0:16)",
    "hops": "hops(2)",
    "blockwise": "blockwise(64, window(1))",
    "where": "where(k % 128 >= 120)",
    "random": "random(3, seed=0)",
    "neighborhood": "neighborhood(image, kernel=7)",
    "topk": "topk(16, block=64)",
    "threshold": "threshold(0.9, block=128)",
    "vertical": "vertical(1000, last=64)",
    "slash": "slash(1000, last=64)",
    "min": "min(a, b)",
    "max": "max(a, b)",
    "abs": "abs(q - k)",
    "log2": "log2(abs(q - k))",
    "grid": "layout image = grid(64, 64)",
    "permute": "pattern p = permute(causal, segment=256, by=given)",
}


def _as_float(v: Value) -> float:
    match v:
        case FloatV(f):
            return f
        case IntV(e):
            return float(E.evaluate_int(e))
    raise TypeError(v)


def _parse_define(name: str, text: str) -> int | float:
    t = text.strip().replace("_", "")
    try:
        value = int(t)
    except ValueError:
        pass
    else:
        if abs(value) >= MAX_INT:
            raise PatternError(f"-D {name}={text}: the value is too large", None, "integers must stay below 2**62")
        return value
    try:
        f = float(t)
    except ValueError:
        raise PatternError(f"-D {name}={text}: the value must be a number", None, f"e.g. -D {name}=256") from None
    if not math.isfinite(f):
        raise PatternError(f"-D {name}={text}: the value must be a finite number", None)
    return f


def _names_in(root: T.Node | T.HeadsBlock | None) -> Iterator[str]:
    """Every name used in `root`, left to right (walked without recursion: chains may be long)."""
    stack: list[T.Node | T.HeadsBlock | None] = [root]
    while stack:
        node = stack.pop()
        parts: tuple[T.Node | T.HeadsBlock | None, ...] = ()
        match node:
            case T.Name(name) | T.Attribute(name):
                yield name
            case T.Unary(_, x):
                parts = (x,)
            case T.Binary(_, a, b):
                parts = (a, b)
            case T.Compare(operands) | T.TupleLit(operands) | T.ListLit(operands):
                parts = operands
            case T.Call(_, args, keywords):
                parts = args + tuple(k.value for k in keywords)
            case T.Slice(start, stop, step):
                parts = (start, stop, step)
            case T.HeadsBlock(entries):
                parts = tuple(e.body for e in entries)
        stack.extend(reversed(parts))


_ASSOCIATIVE = frozenset({"|", "&", "and", "or"})


def _mismatch(op: str, a: Value, b: Value, span: Span) -> PatternError:
    """The error for operands `op` cannot combine, with the likely mix-up of '|' / 'or' and '&' / 'and'."""
    if op in ("|", "&") and isinstance(a, BoolV | IntV) and isinstance(b, BoolV | IntV):
        word = "or" if op == "|" else "and"
        return PatternError(
            f"'{op}' combines patterns; combine conditions with '{word}'", span,
            f"write where(a {word} b); mind that '{op}' binds tighter than comparisons",
        )  # fmt: skip
    if op in ("and", "or") and isinstance(a, PatV) and isinstance(b, PatV):
        sym = "|" if op == "or" else "&"
        return PatternError(f"'{op}' combines conditions; combine patterns with '{sym}'", span)
    return PatternError(f"'{op}' cannot combine {kind(a)} and {kind(b)}", span)


def _balanced(items: list[ir.Pattern], make: Callable[[ir.Pattern, ir.Pattern], ir.Pattern]) -> ir.Pattern:
    """Items combined by an associative `make` as a balanced tree; up to three, as the left-nested chain."""
    if len(items) == 1:
        return items[0]
    mid = (len(items) + 1) // 2
    return make(_balanced(items[:mid], make), _balanced(items[mid:], make))


# --- what a kernel cannot do ----------------------------------------------------------------------

INT64_MAX = (1 << 63) - 1


def kernel_limits(item: ir.PatternDef | ir.Model) -> None:
    """Refuse what `compile` cannot build though the language allows it. `patc check` applies this to every
    pattern and model of a file, so that a file it passes compiles; `patc compile` to the one it compiles.
    Masks and the analysis have none of these limits (`random(N // 4)` has a mask) and do not apply them."""
    bodies = item.distinct() if isinstance(item, ir.Model) else (item.body,)
    for p in dict.fromkeys(p for body in bodies for p in ir.body_patterns(body)):
        _kernel_limits(p, item.span)


def _kernel_limits(p: ir.Pattern, where: Span | None) -> None:
    from .codegen import RANDOM_UNROLL_MAX
    from .mask import magnitude_bound
    from .selectors import split, token_split
    from .semantics import predicate

    for node in ir.walk(p):
        if not isinstance(node, ir.Random):
            continue
        if not isinstance(node.count, E.Const):
            raise PatternError(
                "random(r, ...) compiles only when r is a number once params are set, not a function of N",
                node.span, "masks and 'patc analyze' take it; a kernel needs a fixed count, e.g. random(3)",
            )  # fmt: skip
        if int(node.count.value) > RANDOM_UNROLL_MAX:
            raise PatternError(
                f"random({node.count.value}, ...) draws more than {RANDOM_UNROLL_MAX} keys per row; "
                "the kernel unrolls the draw", node.span,
                f"at most {RANDOM_UNROLL_MAX}; inside blockwise each key is a whole block of keys",
            )  # fmt: skip

    _selector_limits(p)
    _token_selector_limits(p)

    def too_wide(x: ir.Pattern) -> bool:
        if ir.token_selectors(x):
            return any(too_wide(part) for part in (*token_split(x).cases, *token_split(x).contexts))
        if ir.is_dynamic(x):
            sp = split(x)
            return any(too_wide(part) for part in (sp.static, *sp.variants, *sp.contexts))
        return magnitude_bound(predicate(x), 1) > INT64_MAX

    if too_wide(p):
        # point at the smallest part that overflows on its own (a where(), a window's bounds)
        parts = [x for x in ir.walk(p) if getattr(x, "span", None) is not None and not ir.is_dynamic(x)]
        culprit = next((x for x in reversed(parts) if too_wide(x)), None)
        raise PatternError(
            "the pattern's integer arithmetic does not fit 64 bits even at N = 1",
            getattr(culprit, "span", None) or where, "use smaller constants",
        )  # fmt: skip


def _selector_limits(p: ir.Pattern) -> None:
    """A pattern's selectors share one block size (a kernel tile lies in one block of each) and are at
    most MAX_SELECTORS (each subset of them that picks a block is a predicate of the module)."""
    from .selectors import MAX_SELECTORS

    sels = list(dict.fromkeys(n for n in ir.walk(p) if isinstance(n, ir.TopK | ir.Threshold)))
    def size(s: ir.TopK | ir.Threshold) -> str:
        return f"{s.block}" if s.key_block is None else f"({s.block}, {s.key_block})"

    for s in sels[1:]:
        if size(s) != size(sels[0]):
            raise PatternError(
                f"the selectors of one pattern share one block size to compile: block={size(s)} here, "
                f"block={size(sels[0])} in the first", s.span, f"write block={size(sels[0])}",
            )  # fmt: skip
    if len(sels) > MAX_SELECTORS:
        raise PatternError(
            f"a compiled pattern holds at most {MAX_SELECTORS} selectors, this one {len(sels)}",
            sels[MAX_SELECTORS].span, "give different heads different selectors with heads { ... }",
        )  # fmt: skip


def _token_selector_limits(p: ir.Pattern) -> None:
    """vertical and slash compile alone: one of each per pattern (the kernel holds one column set and one
    offset set per head), beside no block selector (their tiles are blocks, these are tokens)."""
    toks = ir.token_selectors(p)
    if not toks:
        return
    block = next((n for n in ir.walk(p) if isinstance(n, ir.TopK | ir.Threshold)), None)
    if block is not None:
        raise PatternError(
            f"{type(block).__name__.lower()} and {type(toks[0]).__name__.lower()} cannot share a pattern to compile",
            block.span, "give them different heads with heads { ... }",
        )  # fmt: skip
    for kind in (ir.Vertical, ir.Slash):
        same = [t for t in toks if isinstance(t, kind)]
        if len(same) > 1:
            name = kind.__name__.lower()
            raise PatternError(
                f"a compiled pattern holds at most one {name}(...) (one selection per head), this one {len(same)}",
                same[1].span, f"name one with let and use it wherever it applies: let v = {name}({same[0].count})",
            )  # fmt: skip


# --- checks that need N ---------------------------------------------------------------------------


def _constraints(p: ir.Pattern) -> Iterator[tuple[Expr, int, str, Span | None]]:
    """(value, minimum, what, where) for every ranged argument of one node."""
    match p:
        case ir.Window(before, after, dilation, span):
            yield before, 0, "window's size (before)", span
            yield after, 0, "window's size (after)", span
            yield dilation, 1, "window's dilation", span
        case ir.Stride(step, span):
            yield step, 1, "stride", span
        case ir.Sink(count, span):
            yield count, 0, "sink's count", span
        case ir.Random(count, _, span):
            yield count, 0, "random's count", span
        case ir.Blockwise(block, _, span):
            yield block, 1, "blockwise's block size", span
        case ir.TopK(count, _, _, span) if not isinstance(count, int):
            yield count, 1, "topk's count", span
        case ir.Global(t) | ir.Rows(t) | ir.Cols(t):
            if isinstance(t, ir.TokenSlice):
                yield t.step, 1, "a slice step", t.span
        case ir.Where(cond, _, span):
            for d in _divisors(cond):
                yield d, 1, "a divisor in where(...)", span


def _divisors(e: Expr) -> Iterator[Expr]:
    match e:
        case E.Arith(op, a, b):
            if op in ("//", "%"):
                yield b
            yield from _divisors(a)
            yield from _divisors(b)
        case E.Cmp(_, a, b):
            yield from _divisors(a)
            yield from _divisors(b)
        case E.Abs(a) | E.Log2(a) | E.Not(a) | E.IsPow(a, _):
            yield from _divisors(a)
        case E.And(args) | E.Or(args):
            for a in args:
                yield from _divisors(a)
        case E.IfElse(c, t, o):
            for a in (c, t, o):
                yield from _divisors(a)


def validate(p: ir.Pattern, n: int | None) -> None:
    """Check every ranged argument that can be evaluated (all of them once N is known).

    Raises the same PatternError, with the same position, whether the value was a literal caught by the
    checker or an expression of N caught when a mask or kernel is built.
    """
    for value, minimum, what, span in _constraints(p):
        if n is None and E.free_vars(value):
            continue
        try:
            v = E.evaluate_int(value, n)
        except (ValueError, ZeroDivisionError):
            raise PatternError(f"{what} cannot be evaluated at N = {n} (division by zero)", span) from None
        if v < minimum:
            at = f" at N = {n}" if n is not None and E.free_vars(value) else ""
            raise PatternError(f"{what} must be at least {minimum}, got {v}{at}", span)
    if n is not None:
        match p:
            case ir.Neighborhood(layout) | ir.Where(_, layout) if layout is not None and layout.size != n:
                raise PatternError(
                    f"layout '{layout.name}' = {layout.describe()} holds {layout.size} tokens but N = {n}",
                    layout.span,
                    f"use N = {layout.size}, or change the grid",
                )
            case ir.Blockwise(block, inner):
                b = E.evaluate_int(block, n)
                validate(inner, -(-n // b))
                return
    for child in ir.children(p):
        if not isinstance(p, ir.Blockwise):
            validate(child, n)
