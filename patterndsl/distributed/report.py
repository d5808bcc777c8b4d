"""`patc analyze --ranks R`: per-rank work and traffic of a context-parallel run, ours beside a ring.

Ours: the placement `Placement.best` chooses and the exchange `plan.plan` derives (key rows each rank
sends, at tile granularity). The ring: torch's `context_parallel` (ring attention over SDPA), whose
load balancer gives rank r chunks r and 2R - 1 - r and which passes every rank's K and V around the whole
ring, so each rank sends its shard R - 1 times. Bytes count K and V rows: 2 * kv heads * head_dim *
element size * batch per row.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from .. import ir
from ..analysis.analyze import _head_count, _uses
from ..selectors import static_part
from ..semantics import predicate
from ..source import PatternError
from .placement import Placement
from .plan import Terms, doc_bounds, imbalance, plan, rank_costs, row_costs


def terms_of(item: ir.PatternDef | ir.Model, heads: int | None) -> Terms:
    """The terms of a pattern or model (a model: every layer's heads, one placement for all layers)."""
    uses = _uses(item, _head_count(item, heads))
    dynamic = any(ir.is_dynamic(u.pattern) for u in uses)
    preds = tuple((predicate(static_part(u.pattern)),
                   u.heads) for u in uses)
    return Terms(preds, dynamic)


def random_docs(n: int, count: int, seed: int) -> tuple[int, ...]:
    """cu_seqlens of `count` documents of random lengths (distinct random cut points) filling n tokens."""
    if not 1 <= count <= n:
        raise PatternError(f"--docs {count}: between 1 and N = {n} documents")
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, n), count - 1, replace=False)) if count > 1 else np.zeros(0, np.int64)
    return (0, *(int(c) for c in cuts), n)


def parse_docs(text: str, n: int, seed: int) -> tuple[int, ...]:
    """`--docs`: a count of random documents, or their lengths separated by commas (adding up to N)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise PatternError(f"--docs {text}: expected a document count or comma-separated lengths", None,
                           "e.g. --docs 64 or --docs 1000,3000,500") from None
    if len(values) == 1:
        return random_docs(n, values[0], seed)
    if any(v < 1 for v in values) or sum(values) != n:
        raise PatternError(f"--docs {text}: lengths must be positive and add up to N = {n}, they add up to "
                           f"{sum(values)}")
    return (0, *np.cumsum(values).tolist())


def _side(placement: Placement, cost: np.ndarray, sent_tokens: np.ndarray, row_bytes: int) -> dict[str, Any]:
    pairs = rank_costs(placement, cost)
    sent = sent_tokens * row_bytes
    return {
        "placement": placement.strategy,
        "pairs": pairs.tolist(),
        "imbalance": imbalance(pairs),
        "bytes_sent": sent.tolist(),
        "max_bytes_sent": int(sent.max()),
    }


def ranks_report(terms: Terms, n: int, ranks: int, docs: tuple[int, ...] | None, block: int, kv_heads: int,
                 head_dim: int, batch: int, element_bytes: int = 2) -> dict[str, Any]:
    """Every figure of `--ranks`, as a JSON-able dict."""
    if ranks < 2 or ranks > n:
        raise PatternError(f"--ranks {ranks}: between 2 and N = {n}")
    row_bytes = 2 * kv_heads * head_dim * element_bytes * batch
    cost = row_costs(terms, n, docs)
    ours = Placement.best(terms, n, ranks, docs, block)
    mine = plan(terms, ours, block, docs)
    ring = Placement.head_tail(n, ranks, 1)
    ring_sent = np.array([(ranks - 1) * ring.length(r) for r in range(ranks)], dtype=np.int64)
    a = _side(ours, cost, mine.tokens_sent(), row_bytes)
    b = _side(ring, cost, ring_sent, row_bytes)
    b["placement"] = "head-tail ring (torch context_parallel)"
    return {
        "ranks": ranks,
        "n": n,
        "documents": None if docs is None else len(doc_bounds(n, docs)),
        "block": block,
        "bytes_per_row": row_bytes,
        "dynamic": terms.dynamic,
        "ours": a,
        "ring": b,
        "bytes_ratio": b["max_bytes_sent"] / max(1, a["max_bytes_sent"]),
    }


def _si(x: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.3g}"


def render_ranks(r: dict[str, Any], console: Console | None = None) -> None:
    """The per-rank table: pairs and bytes sent, ours and the ring's, then imbalance and the ratio."""
    console = console or Console()
    docs = f", {r['documents']} documents" if r["documents"] else ""
    table = Table(title=f"context parallelism over {r['ranks']} ranks (N = {r['n']:,}{docs}, tiles of {r['block']})")
    for col in ("rank", "pairs (ours)", "bytes sent (ours)", "pairs (ring)", "bytes sent (ring)"):
        table.add_column(col, justify="right")
    ours, ring = r["ours"], r["ring"]
    for k in range(r["ranks"]):
        table.add_row(str(k), _si(ours["pairs"][k]), _si(ours["bytes_sent"][k]) + "B", _si(ring["pairs"][k]),
                      _si(ring["bytes_sent"][k]) + "B")
    console.print(table)
    console.print(f"placement: ours {ours['placement']}, ring {ring['placement']}")
    console.print(f"imbalance (max / mean - 1 of pairs): ours {ours['imbalance']:.2%}, ring {ring['imbalance']:.2%}")
    console.print(f"bytes sent by the busiest rank: ours {_si(ours['max_bytes_sent'])}B, ring "
                  f"{_si(ring['max_bytes_sent'])}B (the ring sends {r['bytes_ratio']:.1f}x ours)")
    if r["dynamic"]:
        console.print("a selector picks blocks from the data: every rank gathers every key (ours counts that)")
