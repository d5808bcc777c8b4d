"""Generated kernels against a float64 dense masked-softmax reference, in Triton's CPU interpreter.

Every static pattern of `patterns/` and of the spec's examples, hypothesis-drawn patterns, every dtype,
head_dim 32..256, GQA/MQA, `scale=`, N not a multiple of the block, empty rows; outputs are poisoned (NaN)
before each run so an element the kernel never writes shows. `TRITON_INTERPRET=1` is set here, before
triton is first imported by the generated modules (no other test imports triton).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from switches import spy_launches
from test_language_masks import expressions

import patterndsl as P
from patterndsl import ir
from patterndsl.mask import dense_mask
from patterndsl.source import PatternError

pytestmark = pytest.mark.interpreter  # Triton's CPU interpreter: on where there is no GPU (conftest.py)

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "tests" / "examples"
SMALL = dict(block_m=16, block_n=16)


def reference(q: Any, k: Any, v: Any, mask: np.ndarray, scale: float) -> tuple[Any, Any]:
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


def poisoned(module: Any) -> Any:
    module._empty = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    return module


def check(module: Any, mask: np.ndarray, b: int = 1, h: int = 2, hkv: int | None = None, d: int = 32,
          dtype: Any = torch.float32, scale: float | None = None, seed: int = 0) -> None:  # fmt: skip
    n = mask.shape[-1]
    g = torch.Generator().manual_seed(seed)
    hkv = hkv or h
    q = torch.randn(b, h, n, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    out, lse = poisoned(module).attention_lse(q, k, v, scale=scale)
    want, want_lse = reference(q, k, v, mask, d**-0.5 if scale is None else scale)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (b, h, n)
    assert not torch.isnan(out).any(), "output has unwritten (NaN) elements"
    assert not torch.isnan(lse).any(), "lse has unwritten (NaN) elements"
    tol = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    err = (out.double() - want).abs().max().item()
    assert err < tol * max(1.0, want.abs().max().item()), f"max |out - ref| = {err}"
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite), "rows with no key must have lse = -inf, others finite"
    assert (lse.double()[finite] - want_lse[finite]).abs().max().item() < 1e-3 if finite.any() else True


def _library() -> list[Any]:
    cases = []
    files = sorted(ROOT.glob("patterns/*.pat")) + sorted(SPEC.glob("*.pat"))
    for f in files:
        program = P.load(f)
        for pdef in program.patterns:
            label = f"{f.parent.name}/{f.stem}:{pdef.name}"
            cases.append(pytest.param(f, pdef.name, id=label))
    return cases


def _static_and_compilable(body: ir.Body) -> str | None:
    pats = ir.body_patterns(body)
    if any(ir.is_dynamic(p) for p in pats):
        return "dynamic"
    return None


def _layout_n(body: ir.Body) -> int | None:
    for p in ir.body_patterns(body):
        for x in ir.walk(p):
            match x:
                case ir.Neighborhood(layout) | ir.Where(_, layout) if layout is not None:
                    return layout.size
    return None


@pytest.mark.parametrize("path, name", _library())
def test_library_pattern_matches_dense_reference(path: Path, name: str) -> None:
    body = P.load(path).get(name).body  # type: ignore[union-attr]
    if _static_and_compilable(body) == "dynamic":
        pytest.skip("dynamic selectors run against the literal reference in tests/test_selectors.py")
    heads = body.count if isinstance(body, ir.Heads) else 2
    n = _layout_n(body) or (64 if heads > 4 else 100)
    if n > 300:
        pytest.skip(
            f"N = {n} (fixed by its layout) is too large for the CPU interpreter (layouts up to N = 8192 run in tests/test_gpu_kernels.py)"
        )
    if heads > 16:
        pytest.skip(f"{heads} heads are too many for the CPU interpreter (heads patterns up to 16 heads run here)")
    module = P.compile(path, name, **SMALL)
    check(module, dense_mask(body, n, heads if isinstance(body, ir.Heads) else None), h=heads)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(src=expressions(max_leaves=3), n=st.integers(1, 90), blocks=st.sampled_from([(16, 16), (16, 32), (32, 16)]))
def test_random_pattern_matches_dense_reference(src: str, n: int, blocks: tuple[int, int]) -> None:
    body = P.pattern(src)
    assume(_static_and_compilable(body) is None)
    try:
        mask = dense_mask(body, n)
    except PatternError:
        assume(False)
        return
    try:
        module = P.compile(f"pattern p = {src}\n", block_m=blocks[0], block_n=blocks[1])
    except PatternError as e:  # the one documented refusal: random(r) with r depending on N
        assert "random(r, ...) compiles only when r is a number" in str(e)
        assume(False)
        return
    check(module, mask, h=1)


STREAM = "pattern p = causal & (window(20) | sink(4))\n"


INTERPRETER_BF16 = (
    "Triton 3.6's interpreter multiplies bf16 wrongly (tl.dot of 16x16 randn: error 2e10); on the GPU test"
)


@pytest.mark.parametrize(
    "dtype", ["float32", "float16", pytest.param("bfloat16", marks=pytest.mark.skip(reason=INTERPRETER_BF16))]
)
def test_every_dtype_matches_reference(dtype: str) -> None:
    module = P.compile(STREAM, **SMALL)
    check(module, P.dense_mask("causal & (window(20) | sink(4))", 77), dtype=getattr(torch, dtype))


@pytest.mark.parametrize("d", [32, 64, 128, 256, 48])
def test_head_dims_match_reference(d: int) -> None:
    module = P.compile(STREAM, **SMALL)
    check(module, P.dense_mask("causal & (window(20) | sink(4))", 40), d=d, h=1)


@pytest.mark.parametrize("h, hkv", [(4, 2), (4, 1)])
def test_gqa_and_mqa_match_reference(h: int, hkv: int) -> None:
    module = P.compile(STREAM, **SMALL)
    check(module, P.dense_mask("causal & (window(20) | sink(4))", 50), h=h, hkv=hkv, b=2)


def test_scale_is_used() -> None:
    module = P.compile(STREAM, **SMALL)
    check(module, P.dense_mask("causal & (window(20) | sink(4))", 50), scale=0.37)


def test_empty_rows_give_zeros_and_minus_inf() -> None:
    module = P.compile("pattern p = where(q >= 21) & causal\n", **SMALL)
    mask = P.dense_mask("where(q >= 21) & causal", 60)
    check(module, mask)
    q = torch.randn(1, 1, 60, 32)
    out, lse = module.attention_lse(q, q, q)
    assert torch.equal(out[0, 0, :21], torch.zeros(21, 32)) and torch.isinf(lse[0, 0, :21]).all()


def test_heads_pattern_uses_each_heads_predicate() -> None:
    text = "pattern m = heads {\n  0:1 => causal & window(5)\n  1:3 => sink(7) | window(0)\n}\n"
    body = P.loads(text).patterns[0].body
    check(P.compile(text, **SMALL), dense_mask(body, 45, 3), h=3)


def test_cpu_path_matches_reference_and_warns_once() -> None:
    module = P.compile(STREAM, **SMALL)
    mask = P.dense_mask("causal & (window(20) | sink(4))", 70)
    q, k, v = (torch.randn(2, 2, 70, 32, dtype=torch.float64) for _ in range(3))
    module._warned_cpu.clear()
    with pytest.warns(UserWarning, match="not the fast"):
        out, lse = module.attention_lse(q, k, v)  # float64 always takes the PyTorch path
    want, want_lse = reference(q, k, v, mask, 32**-0.5)
    assert (out - want).abs().max().item() < 1e-12


def test_bad_calls_raise_one_clear_error() -> None:
    module = P.compile(STREAM, **SMALL)
    q = torch.randn(1, 4, 32, 16)
    with pytest.raises(ValueError, match=r"q must be \[batch, heads, N, head_dim\]"):
        module.attention(q[0], q, q)
    with pytest.raises(TypeError, match="share one dtype"):
        module.attention(q, q.half(), q)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        module.attention(q, q.numpy(), q)
    with pytest.raises(ValueError, match="kv heads"):
        module.attention(q, q[:, :3], q[:, :3])
    with pytest.raises(ValueError, match="k, v must be"):
        module.attention(q, q[:, :, :16], q[:, :, :16])
    with pytest.raises(TypeError, match="dtype must be one of"):
        module.attention(q.int(), q.int(), q.int())
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
@pytest.mark.parametrize("n", [1, 7, 50, 130])
def test_random_is_compiled_from_the_same_draw(src: str, n: int) -> None:
    """The kernel redraws each row's keys from the counter hash; the mask draws them in numpy."""
    mask = dense_mask(P.pattern(src), n)
    module = P.compile(f"pattern p = {src}\n", block_m=16, block_n=32 if n % 2 else 16)
    check(module, mask, h=1)
    q, k, v = (torch.randn(1, 1, n, 16, dtype=torch.float64) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, _ = module.attention_lse(q, k, v)  # float64: the PyTorch path, same draw in torch
    assert (out - reference(q, k, v, mask, 16**-0.5)[0]).abs().max().item() < 1e-12


def test_random_with_too_many_keys_or_n_dependent_count_is_refused_clearly() -> None:
    with pytest.raises(PatternError, match="more than 16 keys"):
        P.compile("pattern p = random(17, seed=1)\n")
    with pytest.raises(PatternError, match="not a function of N"):
        P.compile("pattern p = random(N // 4)\n")


MODEL = """\
model m = layers(5) {
    every 2 => causal & window(6)
    3:4 => heads {
        0:1 => causal
        1:2 => window(3) | sink(2)
    }
    else => causal & sink(3)
}
"""


def test_model_module_applies_each_layers_pattern() -> None:
    program = P.loads(MODEL)
    model = program.get("m")
    module = P.compile(MODEL, **SMALL)
    assert module.MODEL_LAYERS is not None and len(module.MODEL_LAYERS) == 5
    assert module.PATTERNS == 4  # distinct patterns across the schedule, one predicate each
    for layer, body in enumerate(model.schedule):  # type: ignore[union-attr]
        mask = dense_mask(body, 37, 2 if isinstance(body, ir.Heads) else None)
        q, k, v = (torch.randn(1, 2, 37, 16, dtype=torch.float64) for _ in range(3))
        want = reference(q, k, v, mask, 0.25)[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cpu = module.attention(q, k, v, layer=layer)
        assert (cpu - want).abs().max().item() < 1e-12, layer
        got = poisoned(module).attention(q.float(), k.float(), v.float(), layer=layer)  # the Triton kernel
        assert (got.double() - want).abs().max().item() < 2e-5, layer


def test_model_module_needs_a_valid_layer_and_a_pattern_module_takes_none() -> None:
    module = P.compile(MODEL, **SMALL)
    q = torch.randn(1, 2, 16, 16)
    for bad in (None, 5, -1, True, "0"):
        with pytest.raises(ValueError, match=r"has 5 layers: pass layer=0..4"):
            module.attention(q, q, q, layer=bad)
    with pytest.raises(ValueError, match="this layer of the model defines 2 heads, got 4"):
        module.attention(*(torch.randn(1, 4, 16, 16) for _ in range(3)), layer=3)
    with pytest.raises(TypeError, match="layer= is for modules compiled from a model"):
        P.compile(STREAM, **SMALL).attention(q, q, q, layer=0)

SWITCHES = [
    dict(TMA_MODE=0, FOLD=False, CONTIG=False, SPLIT_TILES=0),
    dict(TMA_MODE=0, FOLD=True, CONTIG=True, SPLIT_TILES=2),
    dict(TMA_MODE=1, FOLD=True, CONTIG=True, SPLIT_TILES=3),
    dict(TMA_MODE=2, FOLD=True, CONTIG=False, SPLIT_TILES=None),
    dict(TMA_MODE=0, FOLD=True, CONTIG=True, SPLIT_TILES=2, ONE_LOOP=True),  # FULL and PARTIAL in one loop
    dict(TMA_MODE=1, FOLD=False, CONTIG=False, SPLIT_TILES=0, ONE_LOOP=True),
]


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize(
    "src, n", [("window(9) | global(0:3)", 96), ("causal & window(40, dilation=4)", 77), ("where(q >= 21) & causal", 64)]
)
def test_kernel_switches_match_reference(switches: dict[str, Any], src: str, n: int) -> None:
    """Every kernel path (pointer or TMA loads, folded scale, contiguous runs, heavy blocks split into
    slices merged by the combine kernel) computes the same attention; outputs poisoned first."""
    module = P.compile(f"pattern p = {src}\n", **SMALL)
    saved = {k: getattr(module, k) for k in switches}
    try:
        for key, value in switches.items():
            setattr(module, key, value)
        check(module, P.dense_mask(src, n), h=2, hkv=1, b=2)
        check(module, P.dense_mask(src, n), h=1, scale=-0.3)  # a negative scale cannot be folded
    finally:
        for key, value in saved.items():
            setattr(module, key, value)


def test_a_tuned_candidates_loop_and_register_fields_reach_the_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tuner's sixth field switches the grid kernel to one loop over FULL and PARTIAL blocks (without the
    ONE_LOOP switch), its seventh caps registers per thread (ptxas maxnreg; the MAXNREG switch when 0);
    0 keeps two loops and the compiler's registers. Every variant computes the reference."""
    src = "(causal & window(40)) | global(0:3)"  # no token layout: the fast kernels serve it
    module = P.compile(f"pattern p = {src}\n", **SMALL)
    launched: list[tuple[bool, Any]] = []
    spy_launches(monkeypatch, module, "_attn_fwd_fast", launched, lambda kw: (kw["ONE_LOOP"], kw.get("maxnreg")))
    cases = [((16, 16, 4, 1, 0, 1, 0), 0, (True, None)), ((16, 16, 4, 1, 0, 0, 0), 0, (False, None)),
             ((16, 16, 4, 1, 0, 0, 128), 0, (False, 128)), ((16, 16, 4, 1, 0, 1, 0), 96, (True, 96)),
             ((16, 16, 4, 1, 0, 0, 128), 96, (False, 128))]  # fmt: skip
    for cfg, switch, expected in cases:
        monkeypatch.setattr(module, "_choose", lambda *args, cfg=cfg, **kwargs: cfg)
        monkeypatch.setattr(module, "MAXNREG", switch)
        launched.clear()
        check(module, P.dense_mask(src, 77), h=2, hkv=1, b=2)
        assert launched == [expected] and module.LAST_CONFIG == cfg


def test_tuning_candidates_have_seven_fields() -> None:
    """A register cap is offered for head_dims 64 and 128 (two 8-warp blocks per SM), TMA only where allowed."""
    module = P.compile(STREAM)
    for d_pad in (64, 128):
        cands = module._tune_candidates(d_pad, 1)
        assert all(len(c) == 7 for c in cands) and len(set(cands)) == len(cands)
        assert any(c[6] == 128 and c[2] == 8 for c in cands)
        assert all(c[4] == 0 for c in module._tune_candidates(d_pad, 0))


@settings(max_examples=25, deadline=None)
@given(
    counts=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=1, max_size=12),
    chunk=st.sampled_from([None, 0, 1, 2, 5]),
    step=st.sampled_from([1, 2]),
)
def test_work_list_covers_every_tile_once(counts: list[tuple[int, int]], chunk: int | None, step: int) -> None:
    """The work items (whole query blocks or slices) visit each listed tile exactly once, slices of one
    block get consecutive workspace slots named by the split table, and heavier items come first."""
    module = P.compile(STREAM, **SMALL)
    nf = torch.tensor([c[0] for c in counts])
    npart = torch.tensor([c[1] for c in counts])
    f_off = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(nf, 0)])
    p_off = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(npart, 0)])
    f_idx = torch.cat([torch.arange(int(c)) * step + 3 * r for r, c in enumerate(nf)]).long()
    p_idx = torch.arange(int(npart.sum())).long()
    tables = tuple(t.to(torch.int32) for t in (f_off, f_idx, p_off, p_idx))
    saved = module.block_tables
    module.block_tables = lambda *a, **k: tables
    module._WORK.clear()
    try:
        work, splits, slots, contig = module.work_list(1, 16, 16, torch.device("cpu"), 0, chunk)
    finally:
        module.block_tables = saved
        module._WORK.clear()
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
    cache, so a fresh module (another process) launches it without timing anything; a damaged cache file
    is ignored. The GPU is simulated: the launches and timings are recorded, not run."""
    from types import SimpleNamespace

    monkeypatch.setenv("PATTERNDSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Simulated GPU")
    fake = SimpleNamespace(
        device=SimpleNamespace(type="cuda", index=0), shape=(1, 2, 5000, 128), dtype=torch.bfloat16, element_size=lambda: 2
    )

    def fresh() -> tuple[Any, list[Any]]:
        module = P.compile(STREAM)  # autotuned: no explicit tiles
        module._INTERPRET = False
        launched: list[Any] = []
        module._launch = lambda q, k, v, out, lse, cfg, *rest: launched.append(cfg)
        speed = {c: 1.0 + i for i, c in enumerate(module._tune_candidates(128, 1))}
        fastest = module._tune_candidates(128, 1)[2]
        speed[fastest] = 0.5
        module._time_ms = lambda fn, reps: (fn(), speed[launched[-1]])[1]
        return module, launched

    module, launched = fresh()
    assert module.AUTOTUNE and len(module._tune_candidates(128, 1)) >= 2
    cfg = module._choose(fake, fake, fake, None, None, 0.1, 1, 0, 1)
    assert cfg == module._tune_candidates(128, 1)[2]
    assert set(launched) == set(module._tune_candidates(128, 1))
    n_launched = len(launched)
    assert module._choose(fake, fake, fake, None, None, 0.1, 1, 0, 1) == cfg  # in memory
    assert len(launched) == n_launched  # ... so nothing was launched again
    module2, launched2 = fresh()
    module2._TUNED.clear()  # a new process: nothing in memory, the cache file on disk
    assert module2._choose(fake, fake, fake, None, None, 0.1, 1, 0, 1) == cfg and launched2 == []
    # TMA not allowed for these tensors: a different key, candidates without TMA
    assert all(c[4] == 0 for c in module2._tune_candidates(128, 0))
    (tmp_path / "autotune.json").write_text("{not json")
    module2._TUNED.clear()
    assert module2._choose(fake, fake, fake, None, None, 0.1, 1, 0, 1) == cfg and launched2  # tuned again
    assert P.compile(STREAM, block_m=16).AUTOTUNE is False  # explicit tiles are never tuned over


def test_host_sizes_match_triton_s_own() -> None:
    """The generated module's host-side power of two and padded head width (plain Python, off triton's
    constexpr-function wrapper) agree with triton.next_power_of_2 wherever a size can be."""
    import triton

    module = P.compile(STREAM)
    for n in range(1, 5000):
        assert module._pow2(n) == triton.next_power_of_2(n), n
        assert module._d_pad(n) == max(16, triton.next_power_of_2(n)), n


def test_tuner_interleaves_its_rounds_and_picks_the_lowest_total(monkeypatch: Any) -> None:
    """Every candidate is timed once per round, rounds alternating in direction after an untimed one, and the
    pick is the lowest total: a clock drifting linearly while tuning (here faster than the candidates differ)
    cannot hand the pick to the candidate timed first or last, nor can one fast round. Batches are sized
    from one launch each; every timed round is kept for reports."""
    module = P.compile(STREAM)
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

    monkeypatch.setattr(module, "_time_ms", timed)
    runs = {c: (lambda c=c: calls.append((c, 0))) for c in "abc"}
    assert module._fastest(runs) == "b"  # a drift of 0.05 ms a batch against b's 0.04 ms lead
    assert [c for c, _ in calls[:3]] == ["a", "b", "c"] and {r for _, r in calls[:3]} == {1}  # sizing launches
    assert {r for _, r in calls[3:]} == {5}  # 2 ms launches: five to a batch of about 10 ms
    assert "".join(c for c, _ in calls[3:]) == "abc" + "cba" + "abc" + "cba" + "abc" + "cba" + "abc"
    assert all(len(t) == 6 for t in module.LAST_TUNING.values())
    calls.clear()
    state.update(fast_round=(2, "c"))  # no drift; c is faster than b once (by less than b leads it in total)
    assert module._fastest(runs) == "b" and min(module.LAST_TUNING["c"]) < min(module.LAST_TUNING["b"])
    calls.clear()
    state.update(launch_ms=40.0)  # long launches: one to a batch
    module._fastest(runs)
    assert {r for _, r in calls} == {1}


def test_layout_patterns_are_tuned_over_tiles_and_launch_the_chosen_ones(monkeypatch: Any) -> None:
    """A pattern with a token layout (the dilated window) is tuned over its own candidates (the configured
    tiles first, then TUNE_CONFIGS' distinct tiles, warps, stages), and its kernel launches the tiles it is
    given: the interpreter's output with tiles other than CONFIGS' matches the float64 reference."""
    src = "causal & window(40, dilation=4)"
    module = P.compile(f"pattern p = {src}\n", **SMALL)
    assert module._LAYOUT_ROWS[0] is not None and not module._fast(0)
    default = (*module._config(128), 1, 0, 0)
    cands = module._layout_candidates(128, 2, default)
    assert cands[0] == default and len(cands) == len(set(c[:4] for c in cands)) >= 3
    assert {c[:4] for c in cands} == {default[:4]} | {tuple(c[:4]) for c in dict(module.TUNE_CONFIGS)[128]}
    launched: list[Any] = []
    spy_launches(monkeypatch, module, "_attn_fwd", launched,
                 lambda kw: (kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"]))  # fmt: skip
    n, d = 77, 32
    mask = P.dense_mask(src, n)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, d, generator=g) for _ in range(3))
    out = torch.full_like(q, float("nan"))
    lse = torch.full((1, 2, n), float("nan"))
    module._launch(q, k, v, out, lse, (32, 32, 4, 1, 0, 0, 0), d**-0.5, 1, 0)
    assert launched == [(32, 32, 4, 1)]
    want, want_lse = reference(q, k, v, mask, d**-0.5)
    assert (out.double() - want).abs().max().item() < 2e-5
    assert torch.equal(torch.isfinite(lse), torch.isfinite(want_lse))


def test_backward_autotune_times_each_kernel_on_its_own(tmp_path: Path, monkeypatch: Any) -> None:
    """dK/dV and dQ are tuned apart: each kernel's candidates (the default tile first, then the halves of
    BWD_TUNE_CONFIGS) are timed once, the fastest of each is kept, also across a fresh module through the
    disk cache; explicit backward tiles, the interpreter and PATTERNDSL_AUTOTUNE=0 keep the defaults."""
    monkeypatch.setenv("PATTERNDSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Simulated GPU")
    fields = ("bwd", 128, torch.bfloat16, 1, 0, 8192, (0, 0))

    def fresh() -> tuple[Any, dict[str, list[Any]], Any]:
        module = P.compile(STREAM)
        module._INTERPRET = False
        ran: dict[str, list[Any]] = {"dq": [], "dkdv": []}
        speed = {"dq": {(128, 64, 8, 2): 0.5}, "dkdv": {(32, 64, 4, 2): 0.25}}
        last: list[Any] = []
        module._time_ms = lambda fn, reps: (fn(), speed[last[-1][0]].get(last[-1][1], 1.0))[1]

        def runner(kind: str) -> Any:
            return lambda tile: (ran[kind].append(tile), last.append((kind, tile)))

        return module, ran, lambda: module._bwd_tiles(fields, 2, runner("dq"), runner("dkdv"))

    module, ran, tiles = fresh()
    default = module._bwd_config(128, 2, 1)
    dq_cands = {(c[2], c[3], c[6], c[7]) for c in module._by_width(module.BWD_TUNE_CONFIGS, 128, 2)}
    dkdv_cands = {(c[0], c[1], c[4], c[5]) for c in module._by_width(module.BWD_TUNE_CONFIGS, 128, 2)}
    assert len(dq_cands) >= 2 and len(dkdv_cands) >= 2 and (128, 64, 8, 2) in dq_cands and (32, 64, 4, 2) in dkdv_cands
    assert tiles() == ((32, 64, 4, 2), (128, 64, 8, 2))
    assert set(ran["dq"]) == dq_cands | {(default[2], default[3], default[6], default[7])}
    assert set(ran["dkdv"]) == dkdv_cands | {(default[0], default[1], default[4], default[5])}
    count = len(ran["dq"]) + len(ran["dkdv"])
    assert tiles() == ((32, 64, 4, 2), (128, 64, 8, 2)) and len(ran["dq"]) + len(ran["dkdv"]) == count
    module2, ran2, tiles2 = fresh()  # another process: from the disk cache, nothing launched
    assert tiles2() == ((32, 64, 4, 2), (128, 64, 8, 2)) and ran2 == {"dq": [], "dkdv": []}
    monkeypatch.setenv("PATTERNDSL_AUTOTUNE", "0")
    module3, ran3, tiles3 = fresh()
    assert tiles3() == ((default[0], default[1], default[4], default[5]), (default[2], default[3], default[6], default[7]))
    assert P.compile(STREAM, bwd_config=(32, 64, 64, 32, 4, 3)).BWD_AUTOTUNE is False
    grid = P.compile("layout g = grid(8, 8)\npattern p = neighborhood(g, kernel=3)\n")
    plain = dict(module.BWD_TUNE_CONFIGS)
    assert all(set(cs) > set(plain[d]) for d, cs in grid.BWD_TUNE_CONFIGS)  # and 32-key tiles for grids
    assert any(c[1] == 32 for c in dict(grid.BWD_TUNE_CONFIGS)[128])
    module4 = P.compile(STREAM, bwd_config=(32, 16, 16, 32, 4, 3))  # what a backward launched, for reports
    q, k, v = (torch.randn(1, 1, 40, 16, requires_grad=True) for _ in range(3))
    monkeypatch.setattr(module4, "_INTERPRET", True)
    torch.autograd.grad(module4.attention(q, k, v).sum(), (q, k, v))
    assert module4.LAST_BWD[0] == (32, 16, 16, 32, 4, 3, 4, 3)
