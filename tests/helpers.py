"""Code shared by the test modules (no test module imports another; shared code lives here, in
`strategies.py` (hypothesis strategies), `reference.py` and `reference_varlen.py` (brute-force readings of the
language), and in conftest.py's fixtures).

- paths: the repository, its pattern library, the spec's example files the tests carry;
- float64 references: dense masked softmax (`attention_reference`), its gradients (`reference_grads`), row
  counts and spans of a mask (`reference_rows`);
- poisoning: results written into NaN-filled `out=`/`lse=` and `dq=`/`dk=`/`dv=` buffers, so an element a
  kernel never writes shows (`poisoned`, `poisoned_grads`), and the checks built on them (`check_attention`,
  `check_grads`, `assert_tables_match_mask`);
- the library's patterns as pytest cases (`library_cases`) and what decides where they run (`has_selector`,
  `layout_n`);
- a spy on a runtime kernel (`spy_launches`), and a recorder of everything a call launches (`record_launches`).

torch is imported if present: the language tests, which import this module for its paths, run without it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import patterndsl as P
from patterndsl import ir

try:
    import torch
except ImportError:  # the kernels extra is not installed: the modules that need torch skip themselves
    torch = None

ROOT = Path(__file__).resolve().parent.parent  # the repository
LIBRARY = ROOT / "patterns"  # the pattern library
EXAMPLES = ROOT / "tests" / "examples"  # the spec's example files


# --- the library's patterns as test cases ------------------------------------------------------------------


def library_cases(slow: tuple[str, ...] = ()) -> list[Any]:
    """One pytest case (path, pattern name) per pattern of `patterns/` and of the spec's examples, with ids
    such as `patterns/longformer:longformer`; the ids in `slow` are marked `slow` (left out of the fast tier)."""
    cases = []
    files = sorted(LIBRARY.glob("*.pat")) + sorted(EXAMPLES.glob("*.pat"))
    for f in files:
        program = P.load(f)
        for pdef in program.patterns:
            label = f"{f.parent.name}/{f.stem}:{pdef.name}"
            marks = [pytest.mark.slow] if label in slow else []
            cases.append(pytest.param(f, pdef.name, id=label, marks=marks))
    unknown = set(slow) - {c.id for c in cases}
    assert not unknown, f"no library pattern has the id {sorted(unknown)}"
    return cases


def has_selector(body: ir.Body) -> bool:
    """Whether a pattern (or one of its heads) has a dynamic selector (`topk`, `threshold`, ...): those run
    against the literal reference of `reference.dynamic_mask`, not a static dense mask."""
    return any(ir.is_dynamic(p) for p in ir.body_patterns(body))


def layout_n(body: ir.Body) -> int | None:
    """N fixed by the pattern's token layout (a neighborhood's or a where's grid), if it has one."""
    for p in ir.body_patterns(body):
        for x in ir.walk(p):
            match x:
                case ir.Neighborhood(layout) | ir.Where(_, layout) if layout is not None:
                    return layout.size
    return None


MODEL = """\
model m = layers(5) {
    every 2 => causal & window(6)
    3:4 => heads {
        0:1 => causal
        1:2 => window(3) | sink(2)
    }
    else => causal & sink(3)
}
"""  # a model: a pattern per layer, a heads { } layer among them


# --- forward: float64 reference and poisoned outputs -------------------------------------------------------


def attention_reference(q: Any, k: Any, v: Any, mask: np.ndarray, scale: float) -> tuple[Any, Any]:
    """float64 masked softmax; heads share the mask ([N, N]) or not ([H, N, N]); empty rows -> 0, -inf."""
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, 1)
    vv = v.double().repeat_interleave(group, 1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    m = torch.from_numpy(np.ascontiguousarray(mask))
    s = s.masked_fill(~m, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(torch.isinf(lse)[..., None], torch.zeros_like(s), torch.exp(s - lse[..., None]))
    return p @ vv, lse


def poisoned(attn: Any, q: Any, k: Any, v: Any, **kwargs: Any) -> tuple[Any, Any]:
    """(out, lse) of a no-grad call that writes into NaN-filled `out=` and `lse=`: an element the kernel
    never writes stays NaN."""
    out = torch.full_like(q, float("nan"))
    lse = torch.full(tuple(q.shape[:3]), float("nan"), dtype=torch.float32)
    with torch.no_grad():
        got, got_lse = attn(q, k, v, out=out, lse=lse, return_lse=True, **kwargs)
    assert got is out and got_lse is lse, "the results must be written into out= and lse="
    return got, got_lse


def _random_qkv(b: int, h: int, hkv: int, n: int, d: int, dtype: Any, seed: int) -> tuple[Any, ...]:
    """(generator, q, k, v): standard normal inputs drawn in that order from `seed`, so a check's further
    draws (dO, dlse) continue the same stream."""
    g = torch.Generator().manual_seed(seed)
    return (g, *(torch.randn(b, heads, n, d, generator=g).to(dtype) for heads in (h, hkv, hkv)))


def check_attention(attn: Any, mask: np.ndarray, b: int = 1, h: int = 2, hkv: int | None = None, d: int = 32,
                    dtype: Any = None, scale: float | None = None, seed: int = 0) -> None:  # fmt: skip
    """A poisoned forward of random q, k, v against `attention_reference` (dtype: float32 by default)."""
    dtype = dtype or torch.float32
    n = mask.shape[-1]
    _, q, k, v = _random_qkv(b, h, hkv or h, n, d, dtype, seed)
    out, lse = poisoned(attn, q, k, v, scale=scale)
    want, want_lse = attention_reference(q, k, v, mask, d**-0.5 if scale is None else scale)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (b, h, n)
    assert not torch.isnan(out).any(), "output has unwritten (NaN) elements"
    assert not torch.isnan(lse).any(), "lse has unwritten (NaN) elements"
    tol = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    err = (out.double() - want).abs().max().item()
    assert err < tol * max(1.0, want.abs().max().item()), f"max |out - ref| = {err}"
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite), "rows with no key must have lse = -inf, others finite"
    assert (lse.double()[finite] - want_lse[finite]).abs().max().item() < 1e-3 if finite.any() else True


# --- backward: float64 autograd reference and poisoned gradients -------------------------------------------


def reference_grads(
    q: Any, k: Any, v: Any, mask: np.ndarray, scale: float, do: Any, dlse: Any = None
) -> tuple[Any, ...]:
    """(out, lse, dq, dk, dv) in float64; heads share the mask ([N, N]) or not ([H, N, N]). Softmax over
    allowed keys (masked logits at the most negative float64, exact zeros after exp), rows with no allowed
    key multiplied by zero, so its gradients there are exactly zero."""
    group = q.shape[1] // k.shape[1]
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    m = torch.from_numpy(np.ascontiguousarray(mask))
    s = (qd @ kd.repeat_interleave(group, 1).transpose(-1, -2) * scale).masked_fill(~m, torch.finfo(torch.float64).min)
    some = m.any(-1)
    p = torch.softmax(s, -1) * some[..., None]
    out = p @ vd.repeat_interleave(group, 1)
    lse = torch.logsumexp(s, -1)
    loss = (out * do.double()).sum()
    if dlse is not None:
        loss = loss + torch.where(some, lse * dlse.double(), 0.0).sum()
    grads = torch.autograd.grad(loss, (qd, kd, vd))
    return (out.detach(), torch.where(some, lse, float("-inf")).detach(), *grads)


def grad_tolerance(dtype: Any) -> float:
    """Relative error |dx - ref| / |ref| allowed per dtype (float64: the log-sum-exp is float32 by contract,
    p is recomputed from it)."""
    return {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2}[dtype]


def nan_like(t: Any) -> Any:
    return torch.full(tuple(t.shape), float("nan"), dtype=t.dtype)


def poisoned_grads(attn: Any, do: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, **kwargs: Any) -> tuple[Any, ...]:
    """attn.backward(...) into NaN-filled dq, dk, dv: an element the kernels never write stays NaN."""
    bufs = tuple(nan_like(t) for t in (q, k, v))
    got = attn.backward(do, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), dq=bufs[0], dk=bufs[1],
                        dv=bufs[2], **kwargs)  # fmt: skip
    assert all(a is b for a, b in zip(got, bufs, strict=True)), "the gradients must be written into dq=, dk=, dv="
    return got


def check_grads(attn: Any, mask: np.ndarray, b: int = 1, h: int = 2, hkv: int | None = None, d: int = 16,
                dtype: Any = None, scale: float | None = None, with_lse: bool = False,
                seed: int = 0, layer: int | None = None, autograd: bool = False) -> tuple[Any, ...]:  # fmt: skip
    """The gradients of a forward into poisoned `out=`/`lse=` and `attn.backward` into poisoned dq, dk, dv,
    against the float64 reference (dtype: float32 by default); with `autograd`, also autograd's through the
    custom op, which must be the same tensors bit for bit (the same kernels; checked once per kind of path,
    not on every case)."""
    dtype = dtype or torch.float32
    n = mask.shape[-1]
    g, q, k, v = _random_qkv(b, h, hkv or h, n, d, dtype, seed)
    do = torch.randn(b, h, n, d, generator=g).to(dtype)
    dlse = torch.randn(b, h, n, generator=g) if with_lse else None
    want = reference_grads(q, k, v, mask, d**-0.5 if scale is None else scale, do, dlse)
    p_out, p_lse = poisoned(attn, q, k, v, scale=scale, layer=layer)
    assert not torch.isnan(p_out).any() and not torch.isnan(p_lse).any(), "forward left NaN (unwritten)"
    dl = None if dlse is None else torch.where(torch.isfinite(p_lse), dlse, 0.0)  # what autograd hands lse
    got = poisoned_grads(attn, do, q, k, v, p_out, p_lse, dlse=dl, scale=scale, layer=layer)
    for name, x, ref in zip(("dq", "dk", "dv"), got, want[2:], strict=True):
        assert x.dtype == dtype and x.shape == ref.shape, name
        assert not torch.isnan(x).any(), f"{name} has NaN (unwritten or 0 * inf)"
        err = ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        assert err < grad_tolerance(dtype), f"|{name} - ref| / |ref| = {err}"
    if autograd:
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        out, lse = attn.attention_lse(qg, kg, vg, scale=scale, layer=layer)
        assert torch.equal(out.detach(), p_out) and torch.equal(lse.detach(), p_lse)
        loss = (out.float() * do.float()).sum()
        if with_lse:
            loss = loss + torch.where(torch.isfinite(lse), lse * dlse, 0.0).sum()
        for name, x, y in zip(("dq", "dk", "dv"), torch.autograd.grad(loss, (qg, kg, vg)), got, strict=True):
            assert torch.equal(x, y), f"{name}: autograd differs from attn.backward"
    return got


# --- packed documents ---------------------------------------------------------------------------------------

# N-free predicates take the shared-table path; the others classify every tile at its own N
VARLEN_PATTERNS = {
    "swa_sink": "causal & (window(5) | sink(2))",
    "power": "causal & blockwise(4, hops(2) | window(1))",
    "longformer": "window(3) | global(0:2)",
    "quarter": "window(N // 4) | global(-1:)",
    "bigbird": "blockwise(4, window(1) | global(0:1) | random(2, seed=3))",  # draws depend on each document's N
    "dilated": "causal & window(4, dilation=3)",  # has a token layout (residue classes); varlen keeps token order
}
_compiled: dict[tuple[str, str], Any] = {}


def compiled(src: str, **config: Any) -> Any:
    """The compiled pattern `pattern p = src` (an `Attention`, cached per source and tiles; 16 x 16 tiles
    unless `config` says otherwise)."""
    config = config or dict(block_m=16, block_n=16)
    key = (src, repr(sorted(config.items())))
    if key not in _compiled:
        _compiled[key] = P.compile(f"pattern p = {src}\n", **config)
    return _compiled[key]


def cu_of(lengths: list[int]) -> Any:
    """cu_seqlens (int32) of documents of these lengths."""
    return torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)


def segment_permutation(shape: tuple[int, ...], n: int, segment: int, seed: int, starts: tuple[int, ...] = (0,)) -> Any:
    """int64 [*shape, n]: independent random permutations of every segment of `segment` tokens, counted from
    each of `starts` (the documents' first tokens)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty((*shape, n), dtype=torch.int64)
    ends = [*starts[1:], n]
    for idx in np.ndindex(*shape):
        for s0, e0 in zip(starts, ends, strict=True):
            for a in range(s0, e0, segment):
                b = min(a + segment, e0)
                out[idx][a:b] = a + torch.randperm(b - a, generator=g)
    return out


# --- block tables and masks ---------------------------------------------------------------------------------


def _tiles(t: Any, transposed: bool = False) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    full, part = (t.full_t, t.partial_t) if transposed else (t.full, t.partial)
    rows = t.k_blocks if transposed else t.q_blocks
    out: list[set[tuple[int, int]]] = []
    for lst in (full, part):
        s: set[tuple[int, int]] = set()
        for r in range(rows):
            row = lst.row(r)
            assert row == sorted(row) and len(set(row)) == len(row), "entries ascending, no duplicates"
            s |= {((c, r) if transposed else (r, c)) for c in row}
        out.append(s)
    return out[0], out[1]


def assert_tables_match_mask(mask: np.ndarray, t: Any) -> None:
    """`t` (`patterndsl.blocks.BlockTables`) lists exactly the tiles of `mask` holding an allowed pair, FULL
    exactly where every pair of the tile is allowed; its transposed tables list the same tiles."""
    n, bq, bk = t.n, t.block_q, t.block_k
    full, part = _tiles(t)
    assert not (full & part), "a tile is listed both FULL and PARTIAL"
    for qb in range(t.q_blocks):
        for kb in range(t.k_blocks):
            tile = mask[qb * bq : min(n, (qb + 1) * bq), kb * bk : min(n, (kb + 1) * bk)]
            if (qb, kb) in full:
                assert tile.all(), f"FULL tile ({qb}, {kb}) has a disallowed pair"
            elif (qb, kb) in part:
                assert tile.any(), f"PARTIAL tile ({qb}, {kb}) is empty"
            else:
                assert not tile.any(), f"tile ({qb}, {kb}) holds allowed pairs but is not listed"
    assert _tiles(t, transposed=True) == (full, part)
    for lst in (t.full, t.partial, t.full_t, t.partial_t):
        assert lst.offsets.dtype == torch.int32 and lst.indices.dtype == torch.int32


def reference_rows(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of a dense mask: the number of allowed keys, the first (N if none) and the last (-1 if none)."""
    n = m.shape[1]
    cnt = m.sum(axis=1)
    first = np.where(cnt > 0, m.argmax(axis=1), n)
    last = np.where(cnt > 0, n - 1 - m[:, ::-1].argmax(axis=1), -1)
    return cnt, first, last


# --- spies --------------------------------------------------------------------------------------------------


def spy_launches(
    monkeypatch: Any, module: Any, name: str, log: list[Any], record: Callable[[dict[str, Any]], Any]
) -> None:
    """Kernel `name` of runtime module `module` (e.g. `patterndsl.runtime.forward`, which launches
    `_attn_fwd_fast`) launched as before, each launch first appending `record(its keyword arguments)` to
    `log`; undone with the test's monkeypatch. The runtime modules are shared by every compiled pattern, so a
    spied-on kernel left in place would leak into every later test. (Kernel options need no helper:
    `with attn.options(...)` sets them for one block and restores them on exit.)"""
    kernel = getattr(module, name)

    class Spy:
        def __getitem__(self, grid: Any) -> Any:
            def launch(*args: Any, **kwargs: Any) -> Any:
                log.append(record(kwargs))
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, name, Spy())


# Torch ops that launch no kernel: allocation without a fill, and views.
_NO_LAUNCH = {"empty", "empty_strided", "view", "_unsafe_view", "alias", "permute", "expand", "unsqueeze", "squeeze",
              "slice", "select", "as_strided", "t", "transpose", "detach", "lift_fresh", "_reshape_alias"}


def record_launches(monkeypatch: Any, kernel: Any, call: Callable[[], Any]) -> list[tuple[str, Any]]:
    """What `call()` launches, in order: ("triton", (kernel name, grid)) per Triton kernel (every kernel of
    `kernel`'s type: compiled or interpreted) and ("torch", (op, output shapes)) per PyTorch op that runs a
    kernel (allocations without a fill and views are left out; the ops inside an interpreted kernel too).
    Shapes show a step's allocations: two calls whose records are equal did the same host work."""
    from torch.utils._python_dispatch import TorchDispatchMode

    log: list[tuple[str, Any]] = []
    inside = [False]
    cls = type(kernel)
    run = cls.run

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        log.append(("triton", (self.fn.__name__ if hasattr(self, "fn") else self.__name__, kwargs.get("grid"))))
        inside[0] = True
        try:
            return run(self, *args, **kwargs)
        finally:
            inside[0] = False

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if not inside[0] and name not in _NO_LAUNCH:
                outs = out if isinstance(out, tuple | list) else (out,)
                log.append(("torch", (name, [tuple(o.shape) for o in outs if torch.is_tensor(o)])))
            return out

    monkeypatch.setattr(cls, "run", spy)
    with Ops():
        call()
    monkeypatch.setattr(cls, "run", run)
    return log


# --- context parallelism: every rank's share computed in one process ------------------------------------------


def emulate_ranks(attn: Any, q: Any, k: Any, v: Any, do: Any, placement: Any, block: int, docs: Any = None) -> tuple[Any, ...]:
    """(out, lse, dq, dk, dv) over the whole sequence, assembled from what each rank of `placement` computes:
    its rows against its own keys and against the keys the plan sends it (`Spans`: the kernels on a GPU),
    merged by log-sum-exp, and the gradients of both key sets (what `attn.context_parallel` runs, without
    the transfers)."""
    from patterndsl.distributed import Terms, plan
    from patterndsl.runtime.positions import Spans, attention_at, attention_at_backward, merge

    n, dev = q.shape[2], q.device
    docs = None if docs is None else tuple(int(x) for x in docs)
    pieces = plan(Terms.of_spec(attn.spec), placement, block, docs)
    out, dq = torch.zeros_like(q), torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    lse = torch.zeros(q.shape[:3], dtype=torch.float32, device=dev)
    for r in range(placement.world):
        mine = placement.runs[r]
        rows = placement.positions(r, dev)
        got = tuple((int(a), int(b)) for row in pieces.recv[r] for a, b in row.tolist())
        key_sets = [mine] + ([got] if got else [])
        spans = [(torch.cat([torch.arange(a, b, device=dev) for a, b in ks]), Spans(mine, ks, n, docs))
                 for ks in key_sets]
        parts = [attention_at(attn.spec, q[:, :, rows], k[:, :, j], v[:, :, j], at) for j, at in spans]
        out[:, :, rows], lse[:, :, rows] = merge(parts)
        for j, at in spans:
            g = attention_at_backward(attn.spec, do[:, :, rows], q[:, :, rows], k[:, :, j], v[:, :, j],
                                      out[:, :, rows], lse[:, :, rows], at)
            dq[:, :, rows] += g[0]
            dk[:, :, j] += g[1]
            dv[:, :, j] += g[2]
    return out, lse, dq, dk, dv


def cuda_graph(step: Callable[[], Any], warmups: int = 1) -> tuple[Any, Any]:
    """(the graph, its output): `patterndsl.runtime.capture` (warm-ups on a side stream, outside the capture)."""
    from patterndsl.runtime import capture

    return capture(step, warmups)
