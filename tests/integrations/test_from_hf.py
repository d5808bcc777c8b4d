"""`patc from-hf`: a transformers config's attention as a `.pat` model (configs written here, no downloads).

Each family's layers are read against the rule its transformers config class states, and each layer's mask
against transformers' own masks, brute force over (i, j): causal `j <= i`, sliding `i - w < j <= i`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import patterndsl as P
from patterndsl.cli import main

N = 40


def _write(tmp_path: Path, config: dict[str, Any], name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return path


def _masks(path: Path) -> list[np.ndarray]:
    program = P.load(path)
    model = next(x for x in (program.get(n) for n in program.names()) if isinstance(x, P.ir.Model))
    return [np.asarray(P.dense_mask(body, N)) for body in model.schedule]


def _hf(window: int | None) -> np.ndarray:
    i, j = np.arange(N)[:, None], np.arange(N)[None, :]
    return (j <= i) & ((j > i - window) if window is not None else True)


CASES = [
    ({"model_type": "gemma2", "num_hidden_layers": 5, "sliding_window": 6}, [6, None, 6, None, 6]),
    ({"model_type": "gpt_oss", "num_hidden_layers": 4, "sliding_window": 3}, [3, None, 3, None]),
    ({"model_type": "gemma3_text", "num_hidden_layers": 13, "sliding_window": 5},
     [5, 5, 5, 5, 5, None, 5, 5, 5, 5, 5, None, 5]),
    ({"model_type": "gemma3_text", "num_hidden_layers": 4, "sliding_window": 5, "sliding_window_pattern": 2},
     [5, None, 5, None]),
    ({"model_type": "cohere2", "num_hidden_layers": 5, "sliding_window": 9}, [9, 9, 9, None, 9]),
    ({"model_type": "olmo3", "num_hidden_layers": 4, "sliding_window": 9}, [9, 9, 9, None]),
    ({"model_type": "mistral", "num_hidden_layers": 3, "sliding_window": 1}, [1, 1, 1]),
    ({"model_type": "mistral", "num_hidden_layers": 2, "sliding_window": None}, [None, None]),
    ({"model_type": "qwen2", "num_hidden_layers": 4, "sliding_window": 7, "use_sliding_window": True,
      "max_window_layers": 2}, [None, None, 7, 7]),
    ({"model_type": "qwen2", "num_hidden_layers": 2, "sliding_window": 7}, [None, None]),
    ({"model_type": "llama", "num_hidden_layers": 2}, [None, None]),
    ({"model_type": "ministral", "num_hidden_layers": 3, "sliding_window": 4,
      "layer_types": ["full_attention", "sliding_attention", "full_attention"]}, [None, 4, None]),
    ({"model_type": "gemma3", "text_config": {"num_hidden_layers": 2, "sliding_window": 8,
                                              "layer_types": ["sliding_attention", "full_attention"]}}, [8, None]),
]


@pytest.mark.parametrize(("config", "windows"), CASES, ids=lambda c: str(c)[:40] if isinstance(c, dict) else "")
def test_each_layer_is_the_mask_transformers_builds(tmp_path: Path, config: dict[str, Any],
                                                    windows: list[int | None]) -> None:
    out = tmp_path / "model.pat"
    assert main([("from-hf"), str(_write(tmp_path, config)), "-o", str(out)]) == 0
    got = _masks(out)
    assert len(got) == len(windows)
    for layer, (mask, window) in enumerate(zip(got, windows, strict=True)):
        assert np.array_equal(mask, _hf(window)), layer
    assert main(["check", str(out)]) == 0


def test_analyze_reads_the_real_depth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model.pat"
    main(["from-hf", str(_write(tmp_path, CASES[0][0])), "-o", str(out)])
    capsys.readouterr()
    assert main(["analyze", str(out), "-p", "gemma2", "-N", "64"]) == 0
    text = capsys.readouterr().out
    assert "layers 0,2,4" in text and "layers 1,3" in text


@pytest.mark.parametrize(("config", "message"), [
    ({"model_type": "foo", "num_hidden_layers": 2}, "model_type 'foo' is not one"),
    ({"model_type": "gemma2", "num_hidden_layers": 0}, "num_hidden_layers must be a positive"),
    ({"model_type": "gemma2", "num_hidden_layers": 2, "sliding_window": None}, "no sliding_window"),
    ({"model_type": "gemma2", "num_hidden_layers": 2, "sliding_window": 0}, "sliding_window must be"),
    ({"model_type": "gemma3", "num_hidden_layers": 2, "use_bidirectional_attention": True}, "bidirectional"),
    ({"model_type": "mistral", "num_hidden_layers": 2, "sliding_window": 4,
      "layer_types": ["full_attention", "sliding_attention"]}, "ignore the config's layer_types"),
    ({"model_type": "gemma2", "num_hidden_layers": 2, "layer_types": ["chunked_attention", "full_attention"],
      "sliding_window": 4}, "layer 0 is 'chunked_attention'"),
])
def test_what_it_cannot_read_is_one_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          config: dict[str, Any], message: str) -> None:
    assert main(["from-hf", str(_write(tmp_path, config))]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_never_overwrites_its_input_or_a_foreign_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _write(tmp_path, CASES[0][0])
    assert main(["from-hf", str(config), "-o", str(config)]) == 2
    assert "never overwrites its input" in capsys.readouterr().err
    other = tmp_path / "mine.pat"
    other.write_text("pattern p = causal\n")
    assert main(["from-hf", str(config), "-o", str(other)]) == 2
    assert other.read_text() == "pattern p = causal\n"
    ours = tmp_path / "ours.pat"
    assert main(["from-hf", str(config), "-o", str(ours)]) == 0
    assert main(["from-hf", str(config), "-o", str(ours)]) == 0  # its own output is replaced
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert main(["from-hf", str(bad)]) == 2
    assert "not JSON" in capsys.readouterr().err
