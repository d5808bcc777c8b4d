"""Autotuning: the first call per (pattern, head_dim, dtype, GPU, triton, N up to a power of two) times the
candidate tiles and keeps the fastest, in memory and on disk (`~/.cache/patterndsl/autotune.json`, moved by
PATTERNDSL_CACHE_DIR), so a second process starts tuned. The disk key holds the pattern's key and the
runtime's (a hash of these modules), so a new kernel never reuses an old timing. PATTERNDSL_AUTOTUNE=0, the
`autotune=False` option or fixed tiles launch the configured tiles instead.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import triton

from .common import _by_width

if TYPE_CHECKING:
    from .spec import PatternSpec


def _runtime_id() -> str:
    """A hash of the runtime's own sources: the kernels a timing was measured with."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


RUNTIME_ID = _runtime_id()


@dataclass(frozen=True)
class TuningRecord:
    """One tuning run: its cache key, the pick, and each candidate's batch time (ms) per timed round."""

    key: str
    choice: tuple[int, ...]
    rounds: dict[tuple[int, ...], tuple[float, ...]]


_TUNED: dict[tuple[Any, ...], tuple[int, ...]] = {}
_RECORDS: list[TuningRecord] = []


def records() -> tuple[TuningRecord, ...]:
    """The tuning runs of this process, oldest first (at most the last 64): what a report shows of the
    tuner's choices. Choices read from the disk cache make no record."""
    return tuple(_RECORDS)


def _cache_path() -> str:
    root = os.environ.get("PATTERNDSL_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "patterndsl")
    return os.path.join(root, "autotune.json")


def _read_cache() -> dict[str, Any]:
    try:
        with open(_cache_path(), encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, cfg: Sequence[int]) -> None:
    path = _cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = _read_cache()
        data[key] = list(cfg)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: tuned again next process


def _time_ms(fn: Callable[[], object], reps: int) -> float:
    """One batch of `reps` back-to-back launches, per launch: the GPU queue stays full, so the host's launch
    cost (descriptors, argument packing) is hidden as it is in a model's forward pass."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps  # type: ignore[no-any-return]  # (torch leaves it unannotated)


def _fastest(runs: dict[tuple[int, ...], Callable[[], object]], batch_ms: float = 10.0,
             rounds: int = 6) -> tuple[tuple[int, ...], dict[tuple[int, ...], list[float]]]:
    """The key of `runs` (candidate -> launch) with the lowest total over `rounds` timed rounds. Rounds
    interleave the candidates, alternately forwards and backwards, because a GPU's clock drifts while
    tuning: with an even number of rounds in
    alternating order a drift linear in time adds the same to every candidate's total. The best round, the
    statistic once used, favoured whichever candidate ran at a fast moment, such as the first one timed after
    the idle compile (docs/decisions.md). A first round, untimed, brings the GPU
    to the clock it holds under load; one launch each before it sizes the batches at about `batch_ms` (at
    most 5 launches), so tuning a long sequence does not take minutes. Returns the pick and every timed
    round per candidate."""
    order = list(runs)
    once = [_time_ms(fn, 1) for fn in runs.values()]
    reps = max(1, min(5, round(batch_ms / max(min(once), 1e-3))))
    times: dict[tuple[int, ...], list[float]] = {cfg: [] for cfg in order}
    for r in range(rounds + 1):
        for cfg in order if r % 2 == 0 else reversed(order):
            t = _time_ms(runs[cfg], reps)
            if r:
                times[cfg].append(t)
    return min(order, key=lambda cfg: sum(times[cfg])), times


def _tune_candidates(spec: PatternSpec, d_pad: int, tma: int, itemsize: int = 2,
                     first: tuple[int, ...] | None = None) -> list[tuple[int, ...]]:
    """Candidate (BLOCK_M, BLOCK_N, warps, stages, tma, one_loop, maxnreg) for the fast kernel at this head_dim;
    TMA only where allowed. `first`: a config timed before the tuning rows (a token layout's configured tiles,
    those its layout was chosen for)."""
    out: list[tuple[int, ...]] = [] if first is None else [tuple(first)]
    for c in _by_width(spec.tune_configs, d_pad, itemsize):
        cand = (*c[:4], tma if c[4] else 0, c[5] if len(c) > 5 else 0, c[6] if len(c) > 6 else 0)
        if cand not in out:
            out.append(cand)
    return out


def _layout_candidates(spec: PatternSpec, d_pad: int, itemsize: int,
                       default: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Candidates for patterns with a token layout read in place (`layout_gather=False`; `_attn_fwd`: pointer
    loads, FULL and PARTIAL blocks apart, no register cap): the configured tiles, then the tuning candidates'
    distinct tiles, warps and stages."""
    tiles = [default[:4], *(tuple(c[:4]) for c in _by_width(spec.tune_configs, d_pad, itemsize))]
    return [(*t, default[4], 0, 0) for t in dict.fromkeys(tiles)]


def _tuned(spec: PatternSpec, fields: tuple[Any, ...], candidates: Callable[[], Iterable[tuple[int, ...]]],
           run: Callable[[tuple[int, ...]], object], fallback: tuple[int, ...]) -> tuple[int, ...]:
    """The fastest of `candidates()` (tuples of ints) for `run(candidate)`, remembered in memory under `fields`
    (hashable, cheap: looked up on every call; the candidates are listed only on a miss) and on disk under a
    text key that adds what makes a timing valid elsewhere (this module's kernels, the GPU's name, triton's
    version). A candidate this GPU cannot launch (shared memory, registers) is skipped."""
    mem = (spec.key, fields)
    hit = _TUNED.get(mem)
    if hit is not None:
        return hit
    kind, d_pad, dtype, tma, device, n_pow2, rest = fields
    key = "|".join(str(x) for x in (
        spec.name, spec.key, RUNTIME_ID, *([] if kind == "fwd" else [kind]), d_pad, str(dtype).replace("torch.", ""),
        f"tma{tma}", torch.cuda.get_device_name(device), triton.__version__, n_pow2, rest))
    stored = _read_cache().get(key)
    if isinstance(stored, list) and len(stored) == len(fallback) and all(isinstance(x, int) for x in stored):
        _TUNED[mem] = tuple(stored)
        return _TUNED[mem]
    runs: dict[tuple[int, ...], Callable[[], object]] = {}
    for cfg in candidates():
        try:
            run(cfg)  # compiles
        except triton.runtime.errors.OutOfResources:
            continue
        runs[cfg] = functools.partial(run, cfg)
    cfg, times = _fastest(runs) if runs else (fallback, {})
    _TUNED[mem] = cfg
    _RECORDS.append(TuningRecord(key, cfg, {c: tuple(t) for c, t in times.items()}))
    del _RECORDS[:-64]
    _write_cache(key, cfg)
    return cfg
