"""The generated module's pieces against patterndsl's own: its rendered interval classifier answers
exactly what `intervals.classify` answers, its tables list exactly the tiles `blocks.block_tables` lists,
its text is byte-identical for identical input, and nothing from a .pat file can inject code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_language_masks import expressions

import patterndsl as P
from patterndsl import expr as E
from patterndsl.blocks import block_tables
from patterndsl.codegen import doc_text, safe_name
from patterndsl.compile import compile_source
from patterndsl.intervals import classify
from patterndsl.semantics import predicate
from patterndsl.source import PatternError

torch = pytest.importorskip("torch")


def _module(src: str):  # type: ignore[no-untyped-def]
    return P.compile(f"pattern p = {src}\n", block_m=16, block_n=16)


def _compilable(src: str) -> bool:
    try:
        _module(src)
    except PatternError:
        return False
    return True


@settings(max_examples=40)
@given(src=expressions(max_leaves=3), n=st.integers(1, 120), data=st.data())
def test_rendered_interval_classifier_equals_intervals_classify(src: str, n: int, data: st.DataObject) -> None:
    assume(_compilable(src))
    body = P.pattern(src)
    try:
        P.dense_mask(body, n)
    except PatternError:
        assume(False)
    module = _module(src)
    rects = data.draw(st.lists(st.tuples(*[st.integers(0, n - 1)] * 4), min_size=1, max_size=20))
    i_lo = torch.tensor([min(a, b) for a, b, _, _ in rects])
    i_hi = torch.tensor([max(a, b) for a, b, _, _ in rects])
    j_lo = torch.tensor([min(c, d) for _, _, c, d in rects])
    j_hi = torch.tensor([max(c, d) for _, _, c, d in rects])
    want = classify(E.bind_n(predicate(body), n), i_lo, i_hi, j_lo, j_hi, xp=torch)
    got = module._classify(0, n, i_lo, i_hi, j_lo, j_hi)
    assert torch.equal(got.to(torch.int8), want.to(torch.int8))


def _tiles(offsets, indices) -> set[tuple[int, int]]:  # type: ignore[no-untyped-def]
    out = set()
    for r in range(offsets.numel() - 1):
        out |= {(r, int(c)) for c in indices[int(offsets[r]) : int(offsets[r + 1])]}
    return out


@pytest.mark.parametrize("src", ["causal & (window(30) | sink(4))", "window(9, dilation=3) | global(0:5)",
                                 "causal & blockwise(8, hops(2) | window(1))", "causal & hops(2)",
                                 "blockwise(8, random(2, seed=3) | window(1))", "random(3, seed=1) | (causal & window(5))"])  # fmt: skip
@pytest.mark.parametrize("n", [1, 50, 203])
def test_module_tables_list_the_same_tiles_as_blocks_py(src: str, n: int) -> None:
    module = _module(src)
    f_off, f_idx, p_off, p_idx = module.block_tables(n, 32, 16, torch.device("cpu"))
    ref = block_tables(P.pattern(src), n, 32, 16)
    mine_full, mine_part = _tiles(f_off, f_idx), _tiles(p_off, p_idx)
    ref_full, ref_part = _tiles(ref.full.offsets, ref.full.indices), _tiles(ref.partial.offsets, ref.partial.indices)
    assert mine_full | mine_part == ref_full | ref_part
    ragged = {(q, k) for q, k in ref_full if (k + 1) * 16 > n}
    assert mine_full == ref_full - ragged  # the module lists ragged key blocks PARTIAL (bounds checked there)


def test_same_input_gives_byte_identical_module() -> None:
    path = Path(__file__).resolve().parent.parent / "patterns" / "longformer.pat"
    a = compile_source(path, "longformer", {"w": 128})
    b = compile_source(path, "longformer", {"w": 128})
    assert a.text == b.text and a.text.encode() == b.text.encode()
    assert compile_source(path, "longformer", {"w": 64}).text != a.text


def test_module_imports_only_torch_and_triton() -> None:
    text = compile_source("pattern p = causal & window(5)\n").text
    imports = {line.split()[1].split(".")[0] for line in text.splitlines() if line.startswith(("import ", "from "))}
    assert imports <= {"functools", "json", "math", "os", "warnings", "torch", "triton"}  # stdlib + torch + triton


def test_source_text_cannot_inject_code(tmp_path: Path) -> None:
    evil = '# """ + __import__("os").system("touch PWNED") + """ \\\\ \\x00 \'\'\'\npattern p = causal\n'
    compiled = compile_source(evil)
    target = tmp_path / "m.py"
    target.write_text(compiled.text, encoding="utf-8")
    subprocess.run([sys.executable, "-c", f"import runpy; m = runpy.run_path({str(target)!r}); "
                    f"assert m['PATTERN_SOURCE'] == {evil!r}"], check=True, cwd=tmp_path)  # fmt: skip
    assert not (tmp_path / "PWNED").exists()
    assert eval('"""' + doc_text('a"""b\\c\x00') + '"""') == 'a"""b\\c\x00'  # noqa: S307
    for bad in ["x; import os", "a b", "1abc", "é", ""]:
        with pytest.raises(ValueError):
            safe_name(bad)
    with pytest.raises(PatternError):
        compile_source("pattern p = window(w)\n", defines={"w": "1); import os; (1"})


def test_patc_compile_writes_a_loadable_module(tmp_path: Path) -> None:
    from patterndsl.cli import main

    src = tmp_path / "s.pat"
    src.write_text("param w = 7\npattern s = causal & window(w)\n", encoding="utf-8")
    out = tmp_path / "s_kernel.py"
    assert main(["compile", str(src), "-D", "w=3", "-o", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "pattern s = causal & window(w)" in text and "sha256" in text
    import runpy

    ns = runpy.run_path(str(out))
    q = torch.randn(1, 1, 12, 8, dtype=torch.float64)
    mask = torch.from_numpy(np.asarray(P.dense_mask("causal & window(3)", 12)))
    s = (q @ q.transpose(-1, -2) * 8**-0.5).masked_fill(~mask, float("-inf"))
    assert torch.allclose(ns["attention"](q, q, q), torch.softmax(s, -1) @ q)  # type: ignore[operator]


def test_kernels_launch_on_the_tensors_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton launches on the current CUDA device: tensors on cuda:1 while cuda:0 is current must switch to 1."""
    module = P.compile("pattern p = causal\n")
    entered: list[object] = []

    class Guard:
        def __init__(self, dev: object) -> None:
            self.dev = dev

        def __enter__(self) -> None:
            entered.append(self.dev)

        def __exit__(self, *exc: object) -> bool:
            return False

    class OnGpu:  # what the guard reads of a tensor
        is_cuda = True

        def __init__(self, index: int) -> None:
            self.device = torch.device("cuda", index)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Guard)
    seen: list[tuple[str, list[object]]] = []
    run = module._on_device_of(lambda t, x: seen.append((x, list(entered))) or x)
    assert run(OnGpu(1), "a") == "a" and seen[-1] == ("a", [torch.device("cuda", 1)])
    entered.clear()
    assert run(OnGpu(0), "b") == "b" and seen[-1] == ("b", [])
    assert run(torch.zeros(1), "c") == "c" and seen[-1] == ("c", [])
    for fn in (module._forward, module._backward, module._picks, module._varlen_forward, module._varlen_backward):
        assert getattr(fn, "__wrapped__", None) is not None, fn  # every entry point that launches kernels
