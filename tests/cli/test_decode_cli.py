"""`patc check`'s decode note and `patc analyze --decode` as a user meets them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from patterndsl.cli import main

SRC = "pattern grows = causal & window(N // 8)\npattern rolling = causal & (window(255) | sink(4))\n"


@pytest.fixture
def pat(tmp_path: Path) -> str:
    f = tmp_path / "d.pat"
    f.write_text(SRC)
    return str(f)


def test_check_notes_patterns_that_are_not_decode_consistent(pat: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", pat]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{pat}: ok: grows, rolling"
    assert err.strip() == (
        f"{pat}:1:1: note: 'grows' is not decode-consistent: window(N // 8) is sized with N, "
        "so its rows change as the sequence grows"
    )
    assert main(["check", "-q", pat]) == 0
    assert capsys.readouterr() == ("", "")


def test_analyze_decode_prints_cost_and_cache_as_the_context_grows(pat: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", pat, "-p", "rolling", "-N", "512", "--decode", "--kv-dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "decoding keeps" in out and "the first 4; the last 255" in out
    flat = " ".join(out.split())  # rich wraps the title at the table's width
    assert "decode step and cache, per KV head and sequence (D=128, 4 B per element" in flat
    assert "4,194,304" in out
    assert main(["analyze", pat, "-p", "grows", "-N", "512", "--decode"]) == 0
    out = capsys.readouterr().out.replace("\n", " ")  # rich wraps long lines at spaces
    assert "grows: not decode-consistent: window(N // 8) is sized with N, so its rows change" in out


def test_analyze_decode_json(pat: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", pat, "-p", "rolling", "-N", "512", "--decode", "--json", "--block", "64x64"]) == 0
    d = json.loads(capsys.readouterr().out)["patterns"][0]["decode"]
    assert d["consistent"] and d["page_size"] == 64 and d["bytes_per_element"] == 2
    last = d["steps"][-1]
    assert last == {"N": 1 << 22, "keys": 260, "keys_read": 320, "bytes_read": 320 * 512, "retained_keys": 259,
                    "cache_bytes": 320 * 512}  # fmt: skip
    assert main(["analyze", pat, "-p", "rolling", "-N", "512", "--json"]) == 0
    assert "steps" not in json.loads(capsys.readouterr().out)["patterns"][0]["decode"]


def test_analyze_decode_rows_name_their_heads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One pattern: no pattern column (its source would wrap every row); a heads { } pattern: each row names
    its heads, and the shared page size is in the title, not in every cell."""
    f = tmp_path / "h.pat"
    f.write_text("pattern m = heads {\n    0:2 => causal & (window(63) | sink(4))\n    2:4 => causal & window(15)\n}\n")
    assert main(["analyze", str(f), "-N", "512", "--decode"]) == 0
    out = capsys.readouterr().out
    assert "pages of 64)" in " ".join(out.split()) and "B (pages of" not in out
    rows = [line for line in out.splitlines() if "4,194,304" in line]
    assert len(rows) == 2 and "heads 0:2" in rows[0] and "heads 2:4" in rows[1]
    f.write_text("pattern p = causal & (window(63) | sink(4))\n")
    assert main(["analyze", str(f), "-N", "512", "--decode"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "4,194,304" in line]
    assert len(rows) == 1 and "causal" not in rows[0]
