"""A hostile-input campaign against `patc`: generated files (random bytes, random text, token soup, and
valid-looking files with mistakes in them) through every subcommand that needs no GPU.

What is asserted is only what must hold for every input: exit status 0 or 2; on 2, a message that starts
`error:` (or `file:line:col: error:`); never a traceback; never longer than a time box; and no file
written except the output the command was asked for.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patterndsl.cli import main as patc

pytestmark = pytest.mark.slow

TIME_BOX = 30  # seconds per command: generous for a loaded two-core CI box; a hang takes for ever
ERROR = re.compile(r"^(\S+:\d+:\d+: )?error: \S")


class Hang(Exception):
    pass


@contextlib.contextmanager
def _time_box(seconds: int) -> Iterator[None]:
    def ring(signum: int, frame: object) -> None:
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with _time_box(TIME_BOX), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = patc(argv)
        except SystemExit as e:  # argparse's own usage errors
            code = e.code if isinstance(e.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


# (argv after the file, the outputs it may write when it succeeds)
COMMANDS = [
    (["check"], set()),
    (["fmt"], set()),
    (["fmt", "-w"], set()),
    (["mask", "-N", "{n}", "-o", "{d}/m.npy"], {"m.npy"}),
    (["show", "-N", "{n}", "--width", "16"], set()),
    (["show", "-N", "{n}", "-o", "{d}/s.png"], {"s.png", "s-0.png", "s-1.png", "s-2.png", "s-3.png", "s-4.png"}),
    (["analyze", "-N", "{n}"], set()),
    (["analyze", "-N", "{n}", "--json", "-p", "p"], set()),
    (["compile", "-o", "{d}/c.py"], {"c.py"}),
]


def _campaign(data: bytes, n: int, root: Path) -> None:
    """Every command on one file, each in a fresh folder holding only that file."""
    for k, (argv, outputs) in enumerate(COMMANDS):
        case = root / f"c{k}"
        case.mkdir()
        pat = case / "t.pat"
        pat.write_bytes(data)
        before = _listing(case)
        args = [a.format(n=n, d=case) for a in argv]
        full = [args[0], str(pat), *args[1:]]
        code, out, err = _run(full)
        where = f"patc {' '.join(full)}\n--- input ---\n{data!r}\n--- stderr ---\n{err}"
        assert "Traceback" not in err and "internal error" not in err, where
        assert code in (0, 2), where
        if code == 2:
            assert ERROR.match(err), where
        after = _listing(case)
        new = set(after) - set(before)
        assert new <= (outputs if code == 0 else set()), where
        if argv[:2] != ["fmt", "-w"] or code != 0:
            assert after["t.pat"] == before["t.pat"], where


# --- generators ------------------------------------------------------------------------------------

NAMES = st.sampled_from(["p", "p", "w", "a", "g", "q", "k", "N", "qc0", "x_1", "window", "heads", "causal"])
NUMBERS = st.one_of(
    st.integers(0, 8).map(str),
    st.integers(-3, 40).map(str),
    st.sampled_from(["0", "1_000", "2 ** 62", "2 ** 70", "99999999999999999999", "1.5", "1e999", "0.5"]),
    st.sampled_from(["N", "N // 4", "N - 100", "w", "q", "-w", "(w)", "min(w, 3)", "abs(-2)", "w ** 2"]),
)
PRIMITIVES = st.one_of(
    st.sampled_from(
        [
            "causal",
            "full",
            "none",
            "hops(2)",
            "hops(1)",
            "hops(base=3)",
            "global(0:4)",
            "rows(-3:)",
            "cols([0, 2, -1])",
            "global(::0)",
            "where(q - k < 4)",
            "where(k % 0 == 1)",
            "where(q < k < 3 and not q == 1)",
            "where(g, abs(qc0 - kc0) <= 1)",
            "where(g, qc2 == 0)",
            "neighborhood(g, kernel=3)",
            "neighborhood(g, kernel=(3, 1), stride=2, causal=(true, false))",
            "neighborhood(g, kernel=9)",
            "topk(2, block=16)",
            "threshold(0.9, block=32)",
            "topk(1, block=8)",
            "threshold(2, block=16)",
            "random(3)",
            "random(N // 2, seed=1)",
            "random(40)",
            "blockwise(4, window(1) | random(2))",
            "window(1, 2, 3)",
            "window(before=2)",
            "window()",
            "window(1, dilation=0)",
            "causal(1)",
            "grid(2)",
            "window(1",
            "where(q = k)",
            "q",
            "N",
            "3",
            "(causal, full)",
            "[1, 2]",
            "1:4",
            "given",
        ]
    ),  # fmt: skip
    NUMBERS.map(lambda v: f"window({v})"),
    NUMBERS.map(lambda v: f"sink({v})"),
    NUMBERS.map(lambda v: f"stride({v})"),
    st.tuples(NUMBERS, NUMBERS).map(lambda t: f"window({t[0]}, dilation={t[1]})"),
    st.tuples(NUMBERS, NUMBERS).map(lambda t: f"window({t[0]}, {t[1]})"),
    NUMBERS.map(lambda v: f"where(q % ({v}) == 0)"),
)
EXPRESSIONS = st.recursive(
    PRIMITIVES,
    lambda e: st.one_of(
        st.tuples(e, st.sampled_from([" | ", " & ", " - ", " and ", " or ", " + ", " * "]), e).map("".join),
        e.map(lambda x: f"~{x}"),
        e.map(lambda x: f"({x})"),
        st.tuples(NUMBERS, e).map(lambda t: f"blockwise({t[0]}, {t[1]})"),
    ),
    max_leaves=6,
)
HEAD_RANGES = st.tuples(st.integers(0, 4), st.integers(0, 5), EXPRESSIONS).map(lambda t: f"    {t[0]}:{t[1]} => {t[2]}")
MODEL_ENTRIES = st.one_of(
    st.tuples(st.integers(0, 3), EXPRESSIONS).map(lambda t: f"    every {t[0]} => {t[1]}"),
    st.tuples(st.integers(0, 3), st.integers(0, 5), EXPRESSIONS).map(lambda t: f"    {t[0]}:{t[1]} => {t[2]}"),
    EXPRESSIONS.map(lambda x: f"    else => {x}"),
)
STATEMENTS = st.one_of(
    st.tuples(NAMES, NUMBERS).map(lambda t: f"param {t[0]} = {t[1]}"),
    st.tuples(NAMES, EXPRESSIONS).map(lambda t: f"let {t[0]} = {t[1]}"),
    st.tuples(NAMES, st.lists(st.integers(0, 5), min_size=0, max_size=4)).map(
        lambda t: f"layout {t[0]} = grid({', '.join(map(str, t[1]))})"
    ),
    st.tuples(NAMES, EXPRESSIONS).map(lambda t: f"pattern {t[0]} = {t[1]}"),
    st.tuples(NAMES, st.lists(HEAD_RANGES, max_size=3)).map(
        lambda t: f"pattern {t[0]} = heads {{\n" + "\n".join(t[1]) + "\n}"
    ),
    st.tuples(NAMES, st.integers(-1, 5), st.lists(MODEL_ENTRIES, max_size=3)).map(
        lambda t: f"model {t[0]} = layers({t[1]}) {{\n" + "\n".join(t[2]) + "\n}"
    ),
    st.text(max_size=30).map(lambda t: "# " + t.replace("\n", " ").replace("\r", " ")),
)
PRELUDE = "layout g = grid(4, 4)\nparam w = 3\n"
FILES = st.tuples(st.booleans(), st.lists(STATEMENTS, max_size=5)).map(
    lambda t: (PRELUDE if t[0] else "") + "\n".join(t[1]) + "\n"
)
TOKENS = st.sampled_from(
    [
        "param", "let", "layout", "pattern", "model", "layers", "heads", "every", "else", "and", "or", "not", "p",
        "q", "k", "N", "w", "causal", "window", "where", "topk", "grid", "neighborhood", "blockwise", "(", ")", "[",
        "]", "{", "}", ",", ":", "=", "=>", "==", "<", "|", "&", "-", "~", "+", "*", "//", "%", "**", "0", "7",
        "1.5", "1e999", "99999999999999999999", "#", "\n", " ", "\t", "é", "\u202e", "\x00", "\ufeff", "'", "!",
    ]
)  # fmt: skip
SOUP = st.lists(TOKENS, max_size=40).map(" ".join)
LENGTHS = st.sampled_from([1, 2, 7, 16, 16, 33])


# Mostly valid files, so that the commands past the checker (masks, pictures, analysis, code) get work.
SOUND = st.recursive(
    st.one_of(
        st.sampled_from(
            [
                "causal",
                "full",
                "hops(2)",
                "global(0:2)",
                "rows(-2:)",
                "where(q - k < 3)",
                "where(k % 4 == 0)",
                "neighborhood(g, kernel=3)",
                "neighborhood(g, kernel=(3, 1), stride=2, causal=(true, false))",
                "where(g, abs(qc0 - kc0) <= 1)",
                "blockwise(2, window(1) | random(1, seed=2))",
                "random(2, seed=1)",
                "topk(2, block=16)",
                "threshold(0.5, block=16)",
                "window(w, dilation=2)",
                "window(N // 4)",
            ]
        ),  # fmt: skip
        st.integers(0, 8).map(lambda r: f"window({r})"),
        st.integers(0, 4).map(lambda r: f"sink({r})"),
        st.integers(1, 4).map(lambda r: f"stride({r})"),
    ),
    lambda e: st.one_of(
        st.tuples(e, st.sampled_from([" | ", " & ", " - "]), e).map(lambda t: f"({t[0]}{t[1]}{t[2]})"),
        e.map(lambda x: f"~{x}"),
    ),
    max_leaves=4,
)
SOUND_FILES = st.one_of(
    SOUND.map(lambda x: f"{PRELUDE}pattern p = {x}\n"),
    st.tuples(SOUND, SOUND).map(lambda t: f"{PRELUDE}pattern p = heads {{\n    0:1 => {t[0]}\n    1:3 => {t[1]}\n}}\n"),
    st.tuples(SOUND, SOUND).map(lambda t: f"{PRELUDE}# é ∑\nlet a = {t[0]}\npattern p = a | {t[1]}\n"),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=SOUND_FILES, n=st.sampled_from([16, 16, 16, 5]))
def test_sound_files(text: str, n: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    _campaign(text.encode("utf-8"), n, tmp_path_factory.mktemp("sound"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8", "replace"))),
    n=LENGTHS,
)
def test_random_bytes_and_text(data: bytes, n: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    _campaign(data, n, tmp_path_factory.mktemp("bytes"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=SOUP, n=LENGTHS)
def test_token_soup(text: str, n: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    _campaign(text.encode("utf-8", "surrogatepass"), n, tmp_path_factory.mktemp("soup"))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=FILES, n=LENGTHS)
def test_valid_looking_files(text: str, n: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    _campaign(text.encode("utf-8", "surrogatepass"), n, tmp_path_factory.mktemp("files"))


def test_nothing_is_written_in_the_working_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative outputs land where they are named, nowhere else (no stray temporary or suffixed files)."""
    monkeypatch.chdir(tmp_path)
    Path("t.pat").write_text(PRELUDE + "pattern p = causal & window(w)\n")
    for argv in (["mask", "t.pat", "-N", "16", "-o", "m"], ["show", "t.pat", "-N", "16", "-o", "s.svg"],
                 ["compile", "t.pat", "-o", "c"], ["fmt", "-w", "t.pat"]):  # fmt: skip
        assert _run(argv)[0] == 0, argv
    assert sorted(os.listdir(tmp_path)) == ["c", "m", "s.svg", "t.pat"]


# --- a few in child processes, with a wall-clock limit -------------------------------------------

HOSTILE = {
    "deep": "pattern p = " + "(" * 5000 + "causal" + ")" * 5000 + "\n",
    "wide": "pattern p = " + " | ".join(f"where(q - k == {t})" for t in range(2000)) + "\n",
    "long_let_chain": "let a0 = causal\n" + "".join(f"let a{k} = a{k - 1} | window({k})\n" for k in range(1, 3000)) + "pattern p = a2999\n",
    "nul": "pattern p = causal\x00\n",
    "huge_literal": "pattern p = window(" + "9" * 5000 + ")\n",
    "index_name": "param k = 3\npattern p = where(q - k <= k)\n",
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.parametrize(
    "argv",
    [["check"], ["fmt"], ["mask", "-N", "64", "-o", "m.npy"], ["show", "-N", "64"], ["analyze", "-N", "64"],
     ["compile", "-o", "c.py"], ["bench", "-N", "64", "--vs", "none"]],
    ids=lambda a: a[0],
)  # fmt: skip
def test_hostile_files_in_a_child_process(name: str, argv: list[str], tmp_path: Path) -> None:
    (tmp_path / "t.pat").write_text(HOSTILE[name])
    code = "import sys; from patterndsl.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code, argv[0], "t.pat", *argv[1:]],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr
    assert done.returncode in (0, 2), done.stderr
    if done.returncode == 2:
        assert ERROR.match(done.stderr), done.stderr
