"""Generated modules: small (only what depends on the pattern), lint-clean, byte-identical for identical input
wherever the source was compiled from; their tables list exactly the tiles `blocks.block_tables` lists; the
standalone package computes what the runtime computes; nothing from a .pat file can inject code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import LIBRARY, ROOT

import patterndsl as P
from patterndsl.blocks import block_tables
from patterndsl.codegen import doc_text, safe_name
from patterndsl.compile import compile_source
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
    from patterndsl.runtime import tables

    attn = _module(src)
    f_off, f_idx, p_off, p_idx = tables.block_tables(attn.spec, n, 32, 16, torch.device("cpu"))
    ref = block_tables(P.pattern(src), n, 32, 16)
    mine_full, mine_part = _tiles(f_off, f_idx), _tiles(p_off, p_idx)
    ref_full, ref_part = _tiles(ref.full.offsets, ref.full.indices), _tiles(ref.partial.offsets, ref.partial.indices)
    assert mine_full | mine_part == ref_full | ref_part
    ragged = {(q, k) for q, k in ref_full if (k + 1) * 16 > n}
    assert mine_full == ref_full - ragged  # the module lists ragged key blocks PARTIAL (bounds checked there)


def test_same_input_gives_byte_identical_module() -> None:
    path = LIBRARY / "longformer.pat"
    a = compile_source(path, "longformer", {"w": 128})
    b = compile_source(path, "longformer", {"w": 128})
    assert a.text == b.text and a.text.encode() == b.text.encode()
    assert compile_source(path, "longformer", {"w": 64}).text != a.text


def _imports(text: str) -> set[str]:
    return {line.split()[1].split(".")[0] or "." for line in text.splitlines() if line.startswith(("import ", "from "))}


def test_module_imports_triton_and_the_runtime_only() -> None:
    assert _imports(compile_source("pattern p = causal & window(5)\n").text) == {"triton", "patterndsl"}
    standalone = compile_source("pattern p = causal & window(5)\n", standalone=True).text
    assert _imports(standalone) == {"triton", "."}  # the runtime copied beside it


def test_standalone_files_import_nothing_but_torch_triton_numpy_and_each_other() -> None:
    from patterndsl.compile import standalone_files

    stdlib = set(sys.stdlib_module_names)
    for rel, data in standalone_files().items():
        names = _imports(data.decode("utf-8"))
        assert names - stdlib <= {"torch", "triton", "numpy", "."}, rel


def test_module_text_does_not_depend_on_how_the_path_was_spelled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "w.pat").write_text("param r = 5\npattern w = causal & window(r)\n", encoding="utf-8")
    a = compile_source(gen / "w.pat").text
    monkeypatch.chdir(gen)
    b = compile_source(Path("w.pat")).text
    c = compile_source(Path("../gen/./w.pat")).text
    strip = lambda t: [line for line in t.splitlines() if not line.startswith("# compiled from:")]  # noqa: E731
    assert strip(a) == strip(b) == strip(c)
    assert a != b  # the path comment says where it came from
    keys = {_key(t) for t in (a, b, c)}
    assert len(keys) == 1  # the caches' and the autotuning file's key


def _key(text: str) -> str:
    line = next(x for x in text.splitlines() if x.strip().startswith("key="))
    return line.split("=", 1)[1]


def _library() -> list[tuple[Path, str]]:
    from patterndsl.cli.common import select

    out = []
    for path in sorted(LIBRARY.glob("*.pat")):
        program = P.load(path)
        out += [(path, name) for name in program.names() if _compiles(path, name, select)]
    return out


def _compiles(path: Path, name: str, select: object) -> bool:
    try:
        compile_source(path, name)
    except PatternError:
        return False
    return True


@pytest.mark.slow
def test_every_library_module_is_small_and_passes_ruff(tmp_path: Path) -> None:
    """At most 300 lines for every library pattern, and clean under ruff with the project's own rules."""
    ruff = pytest.importorskip("ruff")
    from ruff.__main__ import find_ruff_bin

    root = ROOT
    written = []
    for path, name in _library():
        for standalone in (False, True):
            text = compile_source(path, name, standalone=standalone).text
            assert len(text.splitlines()) <= 300, (path.name, name, len(text.splitlines()))
            target = tmp_path / f"{path.stem}_{name}_{int(standalone)}.py"
            target.write_text(text, encoding="utf-8")
            written.append(str(target))
    assert len(written) > 40
    done = subprocess.run([find_ruff_bin(), "check", "--config", str(root / "pyproject.toml"), "--no-cache", *written],
                          capture_output=True, text=True, cwd=root)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    del ruff


def test_source_text_cannot_inject_code(tmp_path: Path) -> None:
    evil = '# """ + __import__("os").system("touch PWNED") + """ \\\\ \\x00 \'\'\'\npattern p = causal\n'
    compiled = compile_source(evil)
    target = tmp_path / "m.py"
    target.write_text(compiled.text, encoding="utf-8")
    subprocess.run([sys.executable, "-c", f"import runpy; m = runpy.run_path({str(target)!r}); "
                    f"assert m['SPEC'].source == {evil!r}"], check=True, cwd=tmp_path)  # fmt: skip
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
    assert not main(["compile", str(src), "-D", "w=3", "-o", str(tmp_path / "pkg"), "--standalone"])
    assert (tmp_path / "pkg" / "__init__.py").is_file() and (tmp_path / "pkg" / "_patterndsl" / "runtime").is_dir()
    q = torch.randn(1, 1, 12, 8, dtype=torch.float64)
    mask = torch.from_numpy(np.asarray(P.dense_mask("causal & window(3)", 12)))
    s = (q @ q.transpose(-1, -2) * 8**-0.5).masked_fill(~mask, float("-inf"))
    assert torch.allclose(ns["attention"](q, q, q), torch.softmax(s, -1) @ q)  # type: ignore[operator]


def test_kernels_launch_on_the_tensors_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton launches on the current CUDA device: tensors on cuda:1 while cuda:0 is current must switch to 1."""
    from patterndsl.runtime import autograd, backward, common, forward, selection

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
    run = common._on_device_of(lambda spec, t, x: seen.append((x, list(entered))) or x)
    assert run(None, OnGpu(1), "a") == "a" and seen[-1] == ("a", [torch.device("cuda", 1)])
    entered.clear()
    assert run(None, OnGpu(0), "b") == "b" and seen[-1] == ("b", [])
    assert run(None, torch.zeros(1), "c") == "c" and seen[-1] == ("c", [])
    for fn in (forward._forward, backward._backward, selection._picks, forward._varlen_forward,
               backward._varlen_backward):
        assert getattr(fn, "__wrapped__", None) is not None, fn  # every entry point that launches kernels
    assert autograd  # the custom ops' implementations call these same functions


@pytest.mark.interpreter
def test_standalone_package_gives_the_runtime_outputs_and_gradients(tmp_path: Path) -> None:
    """`--standalone` copies the runtime: the same outputs and gradients as the installed package, bit for bit."""
    import importlib

    from patterndsl.compile import write_standalone

    src = "pattern p = causal & (window(9) | sink(2))\n"
    write_standalone(compile_source(src, standalone=True), tmp_path / "pkg_p")
    sys.path.insert(0, str(tmp_path))
    try:
        pkg = importlib.import_module("pkg_p")
    finally:
        sys.path.remove(str(tmp_path))
    attn = P.compile(src)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g, requires_grad=True) for _ in range(3))
    results = []
    for run in (attn.attention, pkg.attention):
        q.grad = k.grad = v.grad = None
        out = run(q, k, v)
        out.square().sum().backward()
        results.append((out.detach(), q.grad, k.grad, v.grad))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_module_from_a_file_compiles_with_fullgraph(tmp_path: Path) -> None:
    """A module loaded from its file works under torch.compile(fullgraph=True): one custom op, no graph break."""
    import runpy

    from patterndsl.cli import main

    (tmp_path / "w.pat").write_text("pattern w = causal & window(4)\n", encoding="utf-8")
    assert main(["compile", str(tmp_path / "w.pat"), "-o", str(tmp_path / "w_attn.py")]) == 0
    ns = runpy.run_path(str(tmp_path / "w_attn.py"))
    attention = ns["attention"]
    q = torch.randn(1, 2, 24, 8, dtype=torch.float64, requires_grad=True)
    step = torch.compile(lambda x: attention(x, x, x).sum(), fullgraph=True, backend="aot_eager")
    y = step(q)
    y.backward()
    want = q.detach().clone().requires_grad_()
    attention(want, want, want).sum().backward()
    assert torch.allclose(y, attention(q.detach(), q.detach(), q.detach()).sum())
    assert torch.allclose(q.grad, want.grad)


def test_compile_takes_a_pattern_built_in_python() -> None:
    attn = P.compile(P.pattern("causal & window(3)"))
    q = torch.randn(1, 1, 10, 8, dtype=torch.float64)
    mask = torch.from_numpy(np.asarray(P.dense_mask("causal & window(3)", 10)))
    s = (q @ q.transpose(-1, -2) * 8**-0.5).masked_fill(~mask, float("-inf"))
    assert torch.allclose(attn(q, q, q), torch.softmax(s, -1) @ q)
