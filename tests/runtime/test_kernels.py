"""Generated kernels against a float64 dense masked-softmax reference, in Triton's CPU interpreter.

Every static pattern of `patterns/` and of the spec's examples, hypothesis-drawn patterns, every dtype,
head_dim 32..256, GQA/MQA, `scale=`, N not a multiple of the block, empty rows; outputs are poisoned (NaN)
before each run (`out=`, `lse=` filled with NaN) so an element the kernel never writes shows.
`TRITON_INTERPRET=1` is set by tests/conftest.py (on machines without a GPU) before triton is first imported.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    MODEL,
    attention_reference,
    check_attention,
    has_selector,
    layout_n,
    library_cases,
    poisoned,
    spy_launches,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from strategies import expressions

import patterndsl as P
from patterndsl import ir
from patterndsl.mask import dense_mask
from patterndsl.source import PatternError

pytestmark = pytest.mark.interpreter  # Triton's CPU interpreter: on where there is no GPU (conftest.py)

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

SMALL = dict(block_m=16, block_n=16)


# sparse_transformer:strided_heads takes about 8 s in the interpreter, longnet_heads and moa about 2 s (the
# other library patterns a second or less): slow tier; the other heads patterns (fixed_heads, ...) keep heads in
# the fast tier, and examples/model:moa is patterns/moa:moa
@pytest.mark.parametrize("path, name", library_cases(slow=("patterns/sparse_transformer:strided_heads",
                                                           "patterns/longnet:longnet_heads", "examples/model:moa")))
def test_library_pattern_matches_dense_reference(path: Path, name: str) -> None:
    body = P.load(path).get(name).body  # type: ignore[union-attr]
    if has_selector(body):
        pytest.skip("dynamic selectors run against the literal reference in tests/runtime/test_selectors.py")
    heads = body.count if isinstance(body, ir.Heads) else 2
    n = layout_n(body) or (64 if heads > 4 else 100)
    if n > 300:
        pytest.skip(
            f"N = {n} (fixed by its layout) is too large for the CPU interpreter (layouts up to N = 8192 run in tests/gpu/test_gpu_kernels.py)"
        )
    if heads > 16:
        pytest.skip(f"{heads} heads are too many for the CPU interpreter (heads patterns up to 16 heads run here)")
    attn = P.compile(path, name, **SMALL)
    check_attention(attn, dense_mask(body, n, heads if isinstance(body, ir.Heads) else None), h=heads)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(src=expressions(max_leaves=3), n=st.integers(1, 90), blocks=st.sampled_from([(16, 16), (16, 32), (32, 16)]))
def test_random_pattern_matches_dense_reference(src: str, n: int, blocks: tuple[int, int]) -> None:
    body = P.pattern(src)
    assume(not has_selector(body))
    try:
        mask = dense_mask(body, n)
    except PatternError:
        assume(False)
        return
    try:
        attn = P.compile(f"pattern p = {src}\n", block_m=blocks[0], block_n=blocks[1])
    except PatternError as e:  # the one documented refusal: random(r) with r depending on N
        assert "random(r, ...) compiles only when r is a number" in str(e)
        assume(False)
        return
    check_attention(attn, mask, h=1)


STREAM = "pattern p = causal & (window(20) | sink(4))\n"


INTERPRETER_BF16 = (
    "Triton 3.6's interpreter multiplies bf16 wrongly (tl.dot of 16x16 randn: error 2e10); on the GPU test"
)


@pytest.mark.parametrize(
    "dtype", ["float32", "float16", pytest.param("bfloat16", marks=pytest.mark.skip(reason=INTERPRETER_BF16))]
)
def test_every_dtype_matches_reference(dtype: str) -> None:
    attn = P.compile(STREAM, **SMALL)
    check_attention(attn, P.dense_mask("causal & (window(20) | sink(4))", 77), dtype=getattr(torch, dtype))


@pytest.mark.parametrize("d", [32, 64, 128, 256, 48])
def test_head_dims_match_reference(d: int) -> None:
    attn = P.compile(STREAM, **SMALL)
    check_attention(attn, P.dense_mask("causal & (window(20) | sink(4))", 40), d=d, h=1)


@pytest.mark.parametrize("h, hkv", [(4, 2), (4, 1)])
def test_gqa_and_mqa_match_reference(h: int, hkv: int) -> None:
    attn = P.compile(STREAM, **SMALL)
    check_attention(attn, P.dense_mask("causal & (window(20) | sink(4))", 50), h=h, hkv=hkv, b=2)


def test_scale_is_used() -> None:
    attn = P.compile(STREAM, **SMALL)
    check_attention(attn, P.dense_mask("causal & (window(20) | sink(4))", 50), scale=0.37)


def test_empty_rows_give_zeros_and_minus_inf() -> None:
    attn = P.compile("pattern p = where(q >= 21) & causal\n", **SMALL)
    mask = P.dense_mask("where(q >= 21) & causal", 60)
    check_attention(attn, mask)
    q = torch.randn(1, 1, 60, 32)
    out, lse = attn.attention_lse(q, q, q)
    assert torch.equal(out[0, 0, :21], torch.zeros(21, 32)) and torch.isinf(lse[0, 0, :21]).all()


def test_heads_pattern_uses_each_heads_predicate() -> None:
    text = "pattern m = heads {\n  0:1 => causal & window(5)\n  1:3 => sink(7) | window(0)\n}\n"
    body = P.loads(text).patterns[0].body
    check_attention(P.compile(text, **SMALL), dense_mask(body, 45, 3), h=3)


def test_cpu_path_matches_reference_and_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from patterndsl.runtime import cpu

    attn = P.compile(STREAM, **SMALL)
    mask = P.dense_mask("causal & (window(20) | sink(4))", 70)
    q, k, v = (torch.randn(2, 2, 70, 32, dtype=torch.float64) for _ in range(3))
    monkeypatch.setattr(cpu, "_warned_cpu", [])  # as in a fresh process
    with pytest.warns(UserWarning, match="not the fast"):
        out, lse = attn.attention_lse(q, k, v)  # float64 always takes the PyTorch path
    want, want_lse = attention_reference(q, k, v, mask, 32**-0.5)
    assert (out - want).abs().max().item() < 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: a second call does not warn again
        again, _ = attn.attention_lse(q, k, v)
    assert torch.equal(again, out)


def test_bad_calls_raise_one_clear_error() -> None:
    attn = P.compile(STREAM, **SMALL)
    q = torch.randn(1, 4, 32, 16)
    with pytest.raises(ValueError, match=r"q must be \[batch, heads, N, head_dim\]"):
        attn.attention(q[0], q, q)
    with pytest.raises(TypeError, match="share one dtype"):
        attn.attention(q, q.half(), q)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        attn.attention(q, q.numpy(), q)
    with pytest.raises(ValueError, match="kv heads"):
        attn.attention(q, q[:, :3], q[:, :3])
    with pytest.raises(ValueError, match=r"k, v must be .* with Nk >= Nq"):
        attn.attention(q, q[:, :, :16], q[:, :, :16])
    with pytest.raises(TypeError, match="dtype must be one of"):
        attn.attention(q.int(), q.int(), q.int())
    heads = P.compile("pattern m = heads {\n 0:2 => causal\n 2:4 => full\n}\n", **SMALL)
    with pytest.raises(ValueError, match="defines 4 heads, got 2"):
        heads.attention(q[:, :2], q[:, :2], q[:, :2])
    grid = P.compile("layout g = grid(4, 8)\npattern p = where(g, abs(qc0 - kc0) <= 1)\n", **SMALL)
    with pytest.raises(ValueError, match=r"holds 32 tokens but N = 31"):
        grid.attention(q[:, :, :31], q[:, :, :31], q[:, :, :31])
    win = P.compile("pattern p = window(N // 4 - 3)\n", **SMALL)
    with pytest.raises(ValueError, match="window's size .* at N = 8"):
        win.attention(q[:, :, :8], q[:, :, :8], q[:, :, :8])


RANDOM_CASES = [
    "random(3, seed=5)",
    "(causal & random(5, seed=1)) | window(2)",
    "blockwise(16, random(2, seed=9) | window(0))",
    "random(16, seed=2**40) - causal",
    "blockwise(8, random(1, seed=4)) & ~window(1)",
]


@pytest.mark.parametrize("src", RANDOM_CASES)
@pytest.mark.parametrize("n", [1, 7, 50, pytest.param(130, marks=pytest.mark.slow)])
def test_random_is_compiled_from_the_same_draw(src: str, n: int) -> None:
    """The kernel redraws each row's keys from the counter hash; the mask draws them in numpy."""
    mask = dense_mask(P.pattern(src), n)
    attn = P.compile(f"pattern p = {src}\n", block_m=16, block_n=32 if n % 2 else 16)
    check_attention(attn, mask, h=1)
    q, k, v = (torch.randn(1, 1, n, 16, dtype=torch.float64) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, _ = attn.attention_lse(q, k, v)  # float64: the PyTorch path, same draw in torch
    assert (out - attention_reference(q, k, v, mask, 16**-0.5)[0]).abs().max().item() < 1e-12


def test_random_with_too_many_keys_or_n_dependent_count_is_refused_clearly() -> None:
    with pytest.raises(PatternError, match="more than 16 keys"):
        P.compile("pattern p = random(17, seed=1)\n")
    with pytest.raises(PatternError, match="not a function of N"):
        P.compile("pattern p = random(N // 4)\n")


def test_model_module_applies_each_layers_pattern() -> None:
    program = P.loads(MODEL)
    model = program.get("m")
    attn = P.compile(MODEL, **SMALL)
    assert attn.spec.model_layers is not None and len(attn.spec.model_layers) == 5
    assert attn.spec.patterns == 4  # distinct patterns across the schedule, one predicate each
    for layer, body in enumerate(model.schedule):  # type: ignore[union-attr]
        mask = dense_mask(body, 37, 2 if isinstance(body, ir.Heads) else None)
        q, k, v = (torch.randn(1, 2, 37, 16, dtype=torch.float64) for _ in range(3))
        want = attention_reference(q, k, v, mask, 0.25)[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cpu = attn.attention(q, k, v, layer=layer)
        assert (cpu - want).abs().max().item() < 1e-12, layer
        got, _ = poisoned(attn, q.float(), k.float(), v.float(), layer=layer)  # the Triton kernel
        assert not torch.isnan(got).any(), layer
        assert (got.double() - want).abs().max().item() < 2e-5, layer


def test_model_module_needs_a_valid_layer_and_a_pattern_module_takes_none() -> None:
    attn = P.compile(MODEL, **SMALL)
    q = torch.randn(1, 2, 16, 16)
    for bad in (None, 5, -1, True, "0"):
        with pytest.raises(ValueError, match=r"has 5 layers: pass layer=0..4"):
            attn.attention(q, q, q, layer=bad)
    with pytest.raises(ValueError, match="this layer of the model defines 2 heads, got 4"):
        attn.attention(*(torch.randn(1, 4, 16, 16) for _ in range(3)), layer=3)
    with pytest.raises(TypeError, match="layer= is for modules compiled from a model"):
        P.compile(STREAM, **SMALL).attention(q, q, q, layer=0)


SWITCHES = [
    dict(tma_mode=0, fold=False, contig=False, split_tiles=0),
    dict(tma_mode=0, fold=True, contig=True, split_tiles=2),
    pytest.param(dict(tma_mode=1, fold=True, contig=True, split_tiles=3), marks=pytest.mark.slow),
    pytest.param(dict(tma_mode=2, fold=True, contig=False, split_tiles=None), marks=pytest.mark.slow),
    dict(tma_mode=0, fold=True, contig=True, split_tiles=2, one_loop=True),  # FULL and PARTIAL in one loop
    dict(tma_mode=1, fold=False, contig=False, split_tiles=0, one_loop=True),
]


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize(
    "src, n", [("window(9) | global(0:3)", 96), ("causal & window(40, dilation=4)", 77), ("where(q >= 21) & causal", 64)]
)
def test_kernel_switches_match_reference(switches: dict[str, Any], src: str, n: int) -> None:
    """Every kernel path (pointer or TMA loads, folded scale, contiguous runs, heavy blocks split into
    slices merged by the combine kernel) computes the same attention; outputs poisoned first."""
    attn = P.compile(f"pattern p = {src}\n", **SMALL)
    with attn.options(**switches):
        check_attention(attn, P.dense_mask(src, n), h=2, hkv=1, b=2)
        check_attention(attn, P.dense_mask(src, n), h=1, scale=-0.3)  # a negative scale cannot be folded


@pytest.mark.slow  # about 6 s
def test_a_tuned_candidates_loop_and_register_fields_reach_the_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tuner's sixth field switches the grid kernel to one loop over FULL and PARTIAL blocks (without the
    one_loop option), its seventh caps registers per thread (ptxas maxnreg; the maxnreg option when 0);
    0 keeps two loops and the compiler's registers. Every variant computes the reference."""
    from patterndsl.runtime import forward

    src = "(causal & window(40)) | global(0:3)"  # no token layout: the fast kernels serve it
    attn = P.compile(f"pattern p = {src}\n", **SMALL)
    launched: list[tuple[Any, ...]] = []
    spy_launches(monkeypatch, forward, "_attn_fwd_fast", launched,
                 lambda kw: (kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"], kw["TMA"],
                             kw["ONE_LOOP"], kw.get("maxnreg")))  # fmt: skip
    cases = [((16, 16, 4, 1, 0, 1, 0), 0, (True, None)), ((16, 16, 4, 1, 0, 0, 0), 0, (False, None)),
             ((16, 16, 4, 1, 0, 0, 128), 0, (False, 128)), ((16, 16, 4, 1, 0, 1, 0), 96, (True, 96)),
             ((16, 16, 4, 1, 0, 0, 128), 96, (False, 128))]  # fmt: skip
    q = torch.randn(2, 2, 77, 32)
    kv = torch.randn(2, 1, 77, 32)
    for cfg, switch, expected in cases:
        with attn.options(tiles=cfg, maxnreg=switch):  # a full seven-field config: what the tuner hands the launch
            assert attn.config(q, kv, kv) == cfg
            launched.clear()
            check_attention(attn, P.dense_mask(src, 77), h=2, hkv=1, b=2)
        assert launched == [(*cfg[:5], *expected)]


def test_tuning_candidates_have_seven_fields() -> None:
    """A register cap is offered for head_dims 64 and 128 (two 8-warp blocks per SM), TMA only where allowed."""
    from patterndsl.runtime.tuning import _tune_candidates

    spec = P.compile(STREAM).spec
    for d_pad in (64, 128):
        cands = _tune_candidates(spec, d_pad, 1)
        assert all(len(c) == 7 for c in cands) and len(set(cands)) == len(cands)
        assert any(c[6] == 128 and c[2] == 8 for c in cands)
        assert all(c[4] == 0 for c in _tune_candidates(spec, d_pad, 0))


@settings(max_examples=25, deadline=None)
@given(
    counts=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=1, max_size=12),
    chunk=st.sampled_from([None, 0, 1, 2, 5]),
    step=st.sampled_from([1, 2]),
)
def test_work_list_covers_every_tile_once(counts: list[tuple[int, int]], chunk: int | None, step: int) -> None:
    """The work items (whole query blocks or slices) visit each listed tile exactly once, slices of one
    block get consecutive workspace slots named by the split table, and heavier items come first."""
    from patterndsl.runtime import tables as T

    spec = P.compile(STREAM, **SMALL).spec
    nf = torch.tensor([c[0] for c in counts])
    npart = torch.tensor([c[1] for c in counts])
    f_off = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(nf, 0)])
    p_off = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(npart, 0)])
    f_idx = torch.cat([torch.arange(int(c)) * step + 3 * r for r, c in enumerate(nf)]).long()
    p_idx = torch.arange(int(npart.sum())).long()
    tables = tuple(t.to(torch.int32) for t in (f_off, f_idx, p_off, p_idx))
    with pytest.MonkeyPatch.context() as m:  # hypothesis: no function-scoped fixture
        m.setattr(T, "block_tables", lambda *a, **k: tables)
        m.setattr(T, "_WORK", {})  # the runtime's cache of work lists, empty and put back after
        work, splits, slots, contig = T.work_list(spec, 1, 16, 16, torch.device("cpu"), 0, chunk)
    w = work.long()
    seen_f = torch.zeros(int(nf.sum()), dtype=torch.int64)
    seen_p = torch.zeros(int(npart.sum()), dtype=torch.int64)
    for r, flo, fhi, kb0, plo, phi, _slot in w.tolist():
        assert f_off[r] <= flo <= fhi <= f_off[r + 1] and p_off[r] <= plo <= phi <= p_off[r + 1]
        seen_f[flo:fhi] += 1
        seen_p[plo:phi] += 1
        if flo < fhi:
            assert kb0 == f_idx[flo]
    assert (seen_f == 1).all() and (seen_p == 1).all()
    assert sorted(set(w[:, 0].tolist())) == list(range(len(counts)))  # empty blocks still write zeros
    sizes = (w[:, 2] - w[:, 1] + w[:, 5] - w[:, 4]).tolist()
    assert sizes == sorted(sizes, reverse=True)
    assert sorted(x for x in w[:, 6].tolist() if x >= 0) == list(range(slots))
    for r, lo, hi in splits.long().tolist():
        assert sorted(w[w[:, 0] == r, 6].tolist()) == list(range(lo, hi))
    assert contig == (step == 1 or int(nf.max()) <= 1)


def test_autotune_times_candidates_once_and_a_new_process_starts_tuned(tmp_path: Path, monkeypatch: Any) -> None:
    """The first call times every candidate and keeps the fastest; the choice is written to the on-disk
    cache, so another process (nothing tuned in memory) launches it without timing anything; a damaged cache
    file is ignored. The GPU is simulated: the launches and timings are recorded, not run."""
    from types import SimpleNamespace

    from patterndsl.runtime import forward, tuning

    monkeypatch.setenv("PATTERNDSL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("PATTERNDSL_AUTOTUNE", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Simulated GPU")
    monkeypatch.setattr(forward, "_INTERPRET", False)
    monkeypatch.setattr(tuning, "_TUNED", {})  # this process's tuned choices: this test's own, put back after
    fake = SimpleNamespace(
        device=SimpleNamespace(type="cuda", index=0), shape=(1, 2, 5000, 128), dtype=torch.bfloat16, element_size=lambda: 2
    )
    attn = P.compile(STREAM)  # autotuned: no explicit tiles
    spec = attn.spec
    cands = tuning._tune_candidates(spec, 128, 1)
    launched: list[Any] = []
    monkeypatch.setattr(forward, "_launch", lambda spec, q, k, v, out, lse, cfg, *rest: launched.append(cfg))
    speed = {c: 1.0 + i for i, c in enumerate(cands)}
    speed[cands[2]] = 0.5
    monkeypatch.setattr(tuning, "_time_ms", lambda fn, reps: (fn(), speed[launched[-1]])[1])

    def choose() -> Any:
        return forward._choose(spec, fake, fake, fake, None, None, 0.1, 1, 0, 1)

    assert spec.autotune and len(cands) >= 2
    cfg = choose()
    assert cfg == cands[2]
    assert set(launched) == set(cands)
    record = tuning.records()[-1]
    assert record.choice == cfg and set(record.rounds) == set(cands)
    n_launched = len(launched)
    assert choose() == cfg  # in memory
    assert len(launched) == n_launched  # ... so nothing was launched again
    tuning._TUNED.clear()  # a new process: nothing in memory, the cache file on disk
    launched.clear()
    assert choose() == cfg and launched == []
    # TMA not allowed for these tensors: a different key, candidates without TMA
    assert all(c[4] == 0 for c in tuning._tune_candidates(spec, 128, 0))
    (tmp_path / "autotune.json").write_text("{not json")
    tuning._TUNED.clear()
    assert choose() == cfg and launched  # tuned again
    assert P.compile(STREAM, block_m=16).spec.autotune is False  # explicit tiles are never tuned over


def test_host_sizes_match_triton_s_own() -> None:
    """The runtime's host-side power of two and padded head width (plain Python, off triton's
    constexpr-function wrapper) agree with triton.next_power_of_2 wherever a size can be."""
    import triton

    from patterndsl.runtime.common import _d_pad, _pow2

    for n in range(1, 5000):
        assert _pow2(n) == triton.next_power_of_2(n), n
        assert _d_pad(n) == max(16, triton.next_power_of_2(n)), n


def test_tuner_interleaves_its_rounds_and_picks_the_lowest_total(monkeypatch: Any) -> None:
    """Every candidate is timed once per round, rounds alternating in direction after an untimed one, and the
    pick is the lowest total: a clock drifting linearly while tuning (here faster than the candidates differ)
    cannot hand the pick to the candidate timed first or last, nor can one fast round. Batches are sized
    from one launch each; every timed round is kept for reports."""
    from patterndsl.runtime import tuning

    calls: list[tuple[str, int]] = []
    state = {"launch_ms": 2.0, "fast_round": None}
    base = {"a": 1.00, "b": 0.98, "c": 1.00}

    def timed(fn: Any, reps: int) -> float:
        fn()
        cand = calls[-1][0]
        calls[-1] = (cand, reps)
        timed_round = (sum(c == cand for c, _ in calls) - 3, cand)  # after its sizing launch and untimed round
        drift = 0.05 * len(calls) if state["fast_round"] is None else 0.0
        fast = 0.15 if timed_round == state["fast_round"] else 0.0
        return base[cand] * state["launch_ms"] + drift - fast

    monkeypatch.setattr(tuning, "_time_ms", timed)
    runs = {c: (lambda c=c: calls.append((c, 0))) for c in "abc"}
    pick, rounds = tuning._fastest(runs)
    assert pick == "b"  # a drift of 0.05 ms a batch against b's 0.04 ms lead
    assert [c for c, _ in calls[:3]] == ["a", "b", "c"] and {r for _, r in calls[:3]} == {1}  # sizing launches
    assert {r for _, r in calls[3:]} == {5}  # 2 ms launches: five to a batch of about 10 ms
    assert "".join(c for c, _ in calls[3:]) == "abc" + "cba" + "abc" + "cba" + "abc" + "cba" + "abc"
    assert set(rounds) == set("abc") and all(len(t) == 6 for t in rounds.values())
    calls.clear()
    state.update(fast_round=(2, "c"))  # no drift; c is faster than b once (by less than b leads it in total)
    pick, rounds = tuning._fastest(runs)
    assert pick == "b" and min(rounds["c"]) < min(rounds["b"])
    calls.clear()
    state.update(launch_ms=40.0)  # long launches: one to a batch
    tuning._fastest(runs)
    assert {r for _, r in calls} == {1}


def test_layout_patterns_are_tuned_over_tiles_and_launch_the_chosen_ones(monkeypatch: Any) -> None:
    """A pattern with a token layout (the dilated window) read in place (`layout_gather=False`) is tuned over
    its own candidates (the configured tiles first, then the tuning configs' distinct tiles, warps, stages),
    and its kernel launches the tiles it is given: the interpreter's output with tiles other than the
    configured ones matches the float64 reference."""
    from patterndsl.runtime import forward, tuning

    src = "causal & window(40, dilation=4)"
    attn = P.compile(f"pattern p = {src}\n", **SMALL)
    spec = attn.spec
    assert spec.layouts[0] is not None and forward._fast(spec, 0)
    with attn.options(layout_gather=False):
        assert not forward._fast(spec, 0)
        default = (*forward._config(spec, 128), 1, 0, 0)
        cands = tuning._layout_candidates(spec, 128, 2, default)
        assert cands[0] == default and len(cands) == len(set(c[:4] for c in cands)) >= 3
        assert {c[:4] for c in cands} == {default[:4]} | {tuple(c[:4]) for c in dict(spec.tune_configs)[128]}
        launched: list[Any] = []
        spy_launches(monkeypatch, forward, "_attn_fwd", launched,
                     lambda kw: (kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"]))  # fmt: skip
        n, d = 77, 32
        mask = P.dense_mask(src, n)
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, n, d, generator=g) for _ in range(3))
        out = torch.full_like(q, float("nan"))
        lse = torch.full((1, 2, n), float("nan"))
        forward._launch(spec, q, k, v, out, lse, (32, 32, 4, 1, 0, 0, 0), d**-0.5, 1, 0)  # what the tuner runs
        assert launched == [(32, 32, 4, 1)]
        want, want_lse = attention_reference(q, k, v, mask, d**-0.5)
        assert (out.double() - want).abs().max().item() < 2e-5
        assert torch.equal(torch.isfinite(lse), torch.isfinite(want_lse))


def _way_tuner(pick: int, timed: list[tuple[int, ...]]) -> Any:
    """A stand-in for `tuning._tuned`: the layout-way choice runs each way once (logged in `timed`) and
    picks way `pick`; every other choice keeps its fallback (the configured tiles)."""

    def tuned(spec: Any, fields: Any, candidates: Any, run: Any, fallback: Any) -> tuple[int, ...]:
        if fields[0] == "layout-way":
            for way in candidates():
                timed.append(way)
                run(way)
            return (pick,)
        return tuple(fallback)

    return tuned


@pytest.mark.slow  # about 5 s each
@pytest.mark.parametrize("pick", [0, 1])
def test_the_tuner_picks_how_a_token_layout_is_read(pick: int, monkeypatch: Any) -> None:
    """Under the default `layout_gather=None` a pattern with a token layout is timed both ways where tuning
    runs, gathered (the fast kernel) and read in place (`_attn_fwd`), and the call launches the way picked;
    an explicit True or False, or a call that tunes nothing (the interpreter), times nothing and gathers
    unless told False. The tuner is stood in for by one that runs each way once and picks `pick`."""
    from patterndsl.runtime import forward

    src = "causal & window(40, dilation=4)"
    attn = P.compile(f"pattern p = {src}\n", **SMALL)
    timed: list[tuple[int, ...]] = []
    monkeypatch.setattr(forward, "_tuned", _way_tuner(pick, timed))
    launched: list[str] = []
    spy_launches(monkeypatch, forward, "_attn_fwd", launched, lambda kw: "in place")
    spy_launches(monkeypatch, forward, "_attn_fwd_fast", launched, lambda kw: "gathered")
    check_attention(attn, P.dense_mask(src, 77), h=2, hkv=1)
    assert timed == [] and set(launched) == {"gathered"}  # the interpreter tunes nothing
    monkeypatch.setattr(forward, "_may_tune", lambda spec, q, used: True)
    for forced, way in ((True, "gathered"), (False, "in place")):
        launched.clear()
        with attn.options(layout_gather=forced):
            check_attention(attn, P.dense_mask(src, 77), h=2, hkv=1)
        assert timed == [] and set(launched) == {way}
    launched.clear()
    check_attention(attn, P.dense_mask(src, 77), h=2, hkv=1)
    assert timed == [(1,), (0,)] and launched[:2] == ["gathered", "in place"]
    assert set(launched[2:]) == {("gathered", "in place")[1 - pick]}


def test_the_layout_way_is_timed_with_the_calls_scores(monkeypatch: Any) -> None:
    """A `heads { }` pattern with a token layout and a `score=given` selector: the two ways are timed with
    the call's scores (the selector's heads run in every timed launch), and the pick computes what an
    explicit `layout_gather` computes."""
    from patterndsl.runtime import forward

    text = ("pattern m = heads {\n  0:1 => causal & window(40, dilation=4)\n"
            "  1:2 => causal & topk(2, block=16, score=given)\n}\n")
    attn = P.compile(text, **SMALL)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
    scores = torch.randn(1, 2, 4, 4, generator=g)
    with attn.options(layout_gather=True):
        want = attn(q, k, v, scores=scores)
    timed: list[tuple[int, ...]] = []
    monkeypatch.setattr(forward, "_tuned", _way_tuner(0, timed))
    monkeypatch.setattr(forward, "_may_tune", lambda spec, q, used: True)
    got = attn(q, k, v, scores=scores)
    assert timed == [(1,), (0,)] and (got - want).abs().max().item() < 1e-5


def test_backward_autotune_times_each_kernel_on_its_own(tmp_path: Path, monkeypatch: Any) -> None:
    """dK/dV and dQ are tuned apart: each kernel's candidates (the default tile first, then the halves of
    the backward tuning configs) are timed once, the fastest of each is kept, also in another process through
    the disk cache; explicit backward tiles, the interpreter and PATTERNDSL_AUTOTUNE=0 keep the defaults."""
    from patterndsl.runtime import backward, tuning
    from patterndsl.runtime.common import _by_width

    monkeypatch.setenv("PATTERNDSL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("PATTERNDSL_AUTOTUNE", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Simulated GPU")
    monkeypatch.setattr(tuning, "_TUNED", {})  # this process's tuned choices: this test's own, put back after
    fields = ("bwd", 128, torch.bfloat16, 1, 0, 8192, (0, 0))
    spec = P.compile(STREAM).spec
    speed = {"dq": {(128, 64, 8, 2): 0.5}, "dkdv": {(32, 64, 4, 2): 0.25}}

    def fresh() -> tuple[dict[str, list[Any]], Any]:
        ran: dict[str, list[Any]] = {"dq": [], "dkdv": []}
        last: list[Any] = []

        def runner(kind: str) -> Any:
            return lambda tile: (ran[kind].append(tile), last.append((kind, tile)))

        def tiles() -> Any:
            with monkeypatch.context() as m:  # a simulated GPU: the kernels are not interpreted
                m.setattr(backward, "_INTERPRET", False)
                m.setattr(tuning, "_time_ms", lambda fn, reps: (fn(), speed[last[-1][0]].get(last[-1][1], 1.0))[1])
                return backward._bwd_tiles(spec, fields, 2, runner("dq"), runner("dkdv"))

        return ran, tiles

    ran, tiles = fresh()
    default = backward._bwd_config(spec, 128, 2, 1)
    dq_cands = {(c[2], c[3], c[6], c[7]) for c in _by_width(spec.bwd_tune_configs, 128, 2)}
    dkdv_cands = {(c[0], c[1], c[4], c[5]) for c in _by_width(spec.bwd_tune_configs, 128, 2)}
    assert len(dq_cands) >= 2 and len(dkdv_cands) >= 2 and (128, 64, 8, 2) in dq_cands and (32, 64, 4, 2) in dkdv_cands
    assert tiles() == ((32, 64, 4, 2), (128, 64, 8, 2))
    assert set(ran["dq"]) == dq_cands | {(default[2], default[3], default[6], default[7])}
    assert set(ran["dkdv"]) == dkdv_cands | {(default[0], default[1], default[4], default[5])}
    count = len(ran["dq"]) + len(ran["dkdv"])
    assert tiles() == ((32, 64, 4, 2), (128, 64, 8, 2)) and len(ran["dq"]) + len(ran["dkdv"]) == count
    tuning._TUNED.clear()  # another process: from the disk cache, nothing launched
    ran2, tiles2 = fresh()
    assert tiles2() == ((32, 64, 4, 2), (128, 64, 8, 2)) and ran2 == {"dq": [], "dkdv": []}
    tuning._TUNED.clear()
    with monkeypatch.context() as m:
        m.setenv("PATTERNDSL_AUTOTUNE", "0")
        ran3, tiles3 = fresh()
        assert tiles3() == ((default[0], default[1], default[4], default[5]),
                            (default[2], default[3], default[6], default[7]))  # fmt: skip
        assert ran3 == {"dq": [], "dkdv": []}
    assert P.compile(STREAM, bwd_config=(32, 64, 64, 32, 4, 3)).spec.bwd_autotune is False
    grid = P.compile("layout g = grid(8, 8)\npattern p = neighborhood(g, kernel=3)\n").spec
    plain = dict(spec.bwd_tune_configs)
    assert all(set(cs) > set(plain[d]) for d, cs in grid.bwd_tune_configs)  # and 32-key tiles for grids
    assert any(c[1] == 32 for c in dict(grid.bwd_tune_configs)[128])
    attn4 = P.compile(STREAM, bwd_config=(32, 16, 16, 32, 4, 3))  # what a backward launches
    launched: list[Any] = []
    for name in ("_attn_bwd_dq", "_attn_bwd_dkdv"):
        spy_launches(monkeypatch, backward, name, launched,
                     lambda kw, name=name: (name, kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"]))  # fmt: skip
    q, k, v = (torch.randn(1, 1, 40, 16, requires_grad=True) for _ in range(3))
    torch.autograd.grad(attn4.attention(q, k, v).sum(), (q, k, v))
    # (32, 16, 16, 32, 4, 3, 4, 3): dK/dV 32 queries x 16 keys, dQ 16 queries x 32 keys, 4 warps, 3 stages each
    assert launched == [("_attn_bwd_dq", 16, 32, 4, 3), ("_attn_bwd_dkdv", 32, 16, 4, 3)]
