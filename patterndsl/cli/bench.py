"""`patc bench`: time a compiled pattern on the GPU against FlexAttention and dense SDPA, in one run.

For every N: median time (ours and each peer timed in five interleaved rounds of `triton.testing.do_bench`
medians, the median round), effective TFLOP/s (4 * allowed pairs * D * H * B per
forward; 2.5x that with --backward), tile efficiency (allowed pairs / pairs of the visited tiles) and the
ratio of each peer's time to ours. JSON with --json, a time-vs-N plot with --plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from typing import Any

from ..source import PatternError
from .common import add_file_options, heads_given, load_program, parse_defines, positive_int, select_pattern
from .output import PICTURE, add_force_option, claim, picture_format, save_figure

PEERS = ("flex", "sdpa")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="time the compiled kernel on the GPU against FlexAttention and dense SDPA",
        description="Compile one pattern, run it on the GPU at each N and print median time, effective "
        "TFLOP/s, tile efficiency and the speed ratio to each peer (FlexAttention with the same pattern's "
        "block mask, dense SDPA), all measured in one run.",
    )
    add_file_options(p)
    p.add_argument(
        "-N", dest="n", type=positive_int, nargs="+", default=[16384], help="sequence lengths (default 16384)"
    )
    p.add_argument("--head-dim", type=positive_int, default=128, help="head dimension D (default 128)")
    p.add_argument("--heads", type=positive_int, help="query heads (default: the heads block's count, else 16)")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size B (default 1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="input dtype (default bf16)")
    p.add_argument("--backward", action="store_true", help="time forward + backward instead of forward")
    p.add_argument("--vs", default="flex,sdpa", metavar="PEERS", help="comma-separated peers: flex, sdpa, or none")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--plot", metavar="OUT.png", help="write a plot of time vs N (matplotlib)")
    add_force_option(p)
    p.set_defaults(run=run)


def _peers(text: str) -> list[str]:
    names = [x.strip().lower() for x in text.split(",") if x.strip()]
    if names == ["none"]:
        return []
    bad = [x for x in names if x not in PEERS]
    if bad:
        raise PatternError(f"--vs {text}: unknown peer '{bad[0]}' (choose from {', '.join(PEERS)}, or none)")
    return list(dict.fromkeys(names))


def run(args: argparse.Namespace) -> int:
    peers = _peers(args.vs)
    if args.plot:
        claim(args.plot, "--plot", PICTURE, [args.file], args.force)
        picture_format(args.plot, "--plot")
    from .. import ir
    from ..check import kernel_limits, validate
    from ..compile import compile as compile_module
    from ..compile import compile_source

    # user errors first, in the words every command uses, before any GPU work
    item = select_pattern(load_program(args), args.pattern, "bench")
    kernel_limits(item)
    if isinstance(item, ir.PatternDef) and item.permute is not None:
        raise PatternError(f"'{item.name}' takes a permutation with each call; patc bench times patterns without one",
                           item.span, "bench its body as a pattern of its own: the kernels are the same")
    heads = heads_given(item, args.heads) or 16
    pats = ir.body_patterns(item.body)
    for n in args.n:
        for p in pats:
            validate(p, n)
    defines = parse_defines(args.defines)
    try:
        compile_source(args.file, args.pattern, defines)
    except ValueError as e:
        if isinstance(e, PatternError):
            raise
        raise PatternError(str(e)) from None
    module = compile_module(args.file, args.pattern, defines)
    for n in args.n:
        try:
            module.check_n(n)
        except ValueError as e:
            raise PatternError(f"-N {n}: {e}") from None
    import torch

    if not torch.cuda.is_available():
        raise PatternError(
            "patc bench needs a CUDA GPU and none is visible here (torch.cuda.is_available() is False)",
            hint="run it on a machine with an NVIDIA GPU; 'patc analyze' estimates the cost without one",
        )
    results = _measure(module, pats, args, heads, peers)
    if args.plot:
        _plot(results, args.plot)
    if args.json:
        sys.stdout.write(json.dumps(results, indent=1) + "\n")
    else:
        _table(results)
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


def _pairs(module: Any, pats: tuple[Any, ...], n: int, heads: int) -> int:
    """Allowed pairs summed over heads, counted exactly (no N x N mask)."""
    from ..analysis.count import count_pairs

    head_pattern = module.spec.head_pattern
    if head_pattern is None:
        return count_pairs(pats[0], n) * heads
    return sum(count_pairs(pats[head_pattern[h]], n) for h in range(heads))


def _tiles(module: Any, q: Any, k: Any, v: Any, heads: int) -> tuple[int, int, tuple[int, ...]]:
    """(visited tiles summed over the heads, tile area, the config a call with these inputs launches)."""
    from ..runtime import tables

    n = q.shape[2]
    cfg = module.config(q, k, v)
    head_pattern = module.spec.head_pattern
    total = 0
    for pat in range(module.spec.patterns):
        f_off, _, p_off, _ = tables.block_tables(module.spec, n, cfg[0], cfg[1], q.device, pat)
        uses = heads if head_pattern is None else sum(1 for x in head_pattern if x == pat)
        total += (int(f_off[-1]) + int(p_off[-1])) * uses
    return total, cfg[0] * cfg[1], cfg


def _flex_mask(module: Any, n: int) -> Any:
    import torch

    from ..runtime.evaluate import evaluate

    preds = [p.expr for p in module.spec.predicates[: module.spec.patterns]]
    if module.spec.head_pattern is None:
        return lambda b, h, q, k: evaluate(preds[0], q, k, n)
    which = torch.tensor(module.spec.head_pattern, device="cuda")

    def mask(b: Any, h: Any, q: Any, k: Any) -> Any:
        out = evaluate(preds[0], q, k, n)
        for p in range(1, len(preds)):
            out = torch.where(which[h] == p, evaluate(preds[p], q, k, n), out)
        return out

    return mask


def interleaved(fns: dict[str, Callable[[], Any]], time_one: Callable[[Callable[[], Any]], float],
                rounds: int = 5) -> dict[str, list[float]]:  # fmt: skip
    """Each of `fns` timed by `time_one` once per round, rounds alternating in order. A GPU's clock drifts
    within seconds (the H100's rounds spread 10-20%, 2026-11-26): peers timed one after the other carry that
    drift into their ratio; interleaved, each sees the same moments. Every round is returned."""
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else reversed(names):
            out[n].append(time_one(fns[n]))
    return out


def _step(fn: Any, q: Any, k: Any, v: Any, grad: Any) -> Callable[[], None]:
    """fn(q, k, v), and its backward when grad is given."""

    def step() -> None:
        out = fn(q, k, v)
        if grad is not None:
            out.backward(grad)

    return step


def _do_bench(step: Callable[[], Any]) -> float:
    import triton

    return float(triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median"))


def _measure(module: Any, pats: tuple[Any, ...], args: argparse.Namespace, heads: int, peers: list[str]) -> dict[str, Any]:
    import torch
    import triton
    from rich.progress import Progress

    dtype = getattr(torch, DTYPES[args.dtype])
    d, b = args.head_dim, args.batch
    rows = []
    steps = len(args.n) * (1 + len(peers))
    with Progress(transient=True, disable=args.json or not sys.stderr.isatty()) as bar:
        task = bar.add_task("benchmarking", total=steps)
        for n in args.n:
            q, k, v = (
                torch.randn(b, heads, n, d, device="cuda", dtype=dtype, requires_grad=args.backward) for _ in range(3)
            )
            grad = torch.randn(b, heads, n, d, device="cuda", dtype=dtype) if args.backward else None

            row: dict[str, Any] = {"N": n}
            bar.update(task, description=f"N = {n}: compiling")
            steps_by_who: dict[str, Callable[[], None]] = {"ours": _step(module.attention, q, k, v, grad)}
            for peer in peers:
                try:
                    if peer == "flex":
                        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

                        bm = create_block_mask(_flex_mask(module, n), None, None, n, n, device="cuda")
                        flex = torch.compile(flex_attention, dynamic=False)
                        fn = lambda q, k, v, bm=bm, flex=flex: flex(q, k, v, block_mask=bm)  # noqa: E731
                    else:
                        fn = torch.nn.functional.scaled_dot_product_attention
                    steps_by_who[peer] = _step(fn, q, k, v, grad)
                except Exception as e:  # noqa: BLE001 (a peer that cannot run this pattern is reported)
                    row[f"{peer}_ms"] = f"failed: {type(e).__name__}"
            with torch.enable_grad() if args.backward else torch.no_grad():
                for who, step in list(steps_by_who.items()):  # compile, tune, build tables: untimed
                    try:
                        step()
                    except Exception as e:  # noqa: BLE001 (a peer that cannot run this pattern is reported)
                        if who == "ours":
                            if args.backward and isinstance(e, RuntimeError) and "grad" in str(e):
                                raise PatternError("--backward: this compiled module has no backward pass yet") from None
                            raise
                        del steps_by_who[who]
                        if isinstance(e, torch.OutOfMemoryError):
                            row[f"{who}_ms"] = "out of memory"
                            torch.cuda.empty_cache()
                        else:
                            row[f"{who}_ms"] = f"failed: {type(e).__name__}"
                bar.update(task, description=f"N = {n}: timing {', '.join(steps_by_who)} in interleaved rounds")
                rounds = interleaved(steps_by_who, _do_bench)
            bar.advance(task, 1 + len(peers))
            times = {who: statistics.median(ts) for who, ts in rounds.items()}
            row["ours_ms"] = times["ours"]
            row["rounds_ms"] = rounds
            pairs = _pairs(module, pats, n, heads)
            tiles, area, cfg = _tiles(module, q.detach(), k.detach(), v.detach(), heads)
            flops = 4 * pairs * d * b * (2.5 if args.backward else 1.0)
            row.update(
                allowed_pairs=pairs * b,
                density=pairs / heads / n / n,
                tile_efficiency=pairs / (tiles * area) if tiles else 0.0,
                config=list(cfg),
                ours_tflops=flops / row["ours_ms"] / 1e9,
            )
            for peer in peers:
                if peer not in times:
                    continue
                t = times[peer]
                dense = 4 * heads * n * n * d * b * (2.5 if args.backward else 1.0) if peer == "sdpa" else flops
                row[f"{peer}_ms"] = t
                row[f"{peer}_tflops"] = dense / t / 1e9
                row[f"{peer}_over_ours"] = t / row["ours_ms"]
            rows.append(row)
            del q, k, v, grad
            torch.cuda.empty_cache()
    return {
        "file": args.file,
        "pattern": module.name,
        "machine": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "batch": b,
        "heads": heads,
        "head_dim": d,
        "dtype": DTYPES[args.dtype],
        "pass": "forward+backward" if args.backward else "forward",
        "peers": peers,
        "rows": rows,
    }


def _fmt(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _table(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"{res['pattern']} ({res['pass']}), B={res['batch']} H={res['heads']} D={res['head_dim']} "
        f"{res['dtype']}, {res['machine']}"
    )
    cols = ["N", "ours ms", "ours TFLOP/s", "tile eff."]
    for p in res["peers"]:
        cols += [f"{p} ms", f"{p} / ours"]
    for c in cols:
        t.add_column(c, justify="right")
    for r in res["rows"]:
        cells = [str(r["N"]), _fmt(r["ours_ms"]), _fmt(r["ours_tflops"], 1), _fmt(r["tile_efficiency"], 3)]
        for p in res["peers"]:
            cells += [_fmt(r.get(f"{p}_ms")), _fmt(r.get(f"{p}_over_ours", "-"), 2)]
        t.add_row(*cells)
    Console().print(t)
    print("ratio > 1: ours is faster; sdpa is dense (every pair), its TFLOP/s counts all N x N pairs")


def _plot(res: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ns = [r["N"] for r in res["rows"]]
    for name in ["ours", *res["peers"]]:
        pts = [
            (n, r[f"{name}_ms"]) for n, r in zip(ns, res["rows"], strict=True) if isinstance(r.get(f"{name}_ms"), float)
        ]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N")
    ax.set_ylabel("median ms")
    ax.set_title(f"{res['pattern']} {res['pass']} ({res['dtype']}, D={res['head_dim']})")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, picture_format(path, "--plot"), dpi=120)
