"""The pattern library in patterns/: every file checks, is canonical, opens with its paper, and every
static pattern builds a reference mask whose rows are never empty; a few patterns are compared with an
independent reading of their paper."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from helpers import LIBRARY

import patterndsl as P
from patterndsl import ir
from patterndsl.cli import main as patc
from patterndsl.mask import dense_mask

LIBRARY_FILES = sorted(LIBRARY.glob("*.pat"))

# Smaller params for files whose defaults are slow to draw densely (the layout follows the params).
SMALL = {
    "radial.pat": {"frames": 8, "tokens": 256, "w0": 128, "side": 16},
    "sta.pat": {"tiles_t": 3, "tt": 2, "th": 4, "tw": 4},
    "video_dit.pat": {"text": 10, "frames": 4, "height": 12, "width": 12},
}

# Sequence lengths for patterns without a layout: one a multiple of every block size, one not.
LENGTHS_1D = (1000, 1024)


def _load(path: Path, small: bool = False) -> ir.Program:
    return P.load(path, SMALL.get(path.name) if small else None)


def _bodies(program: ir.Program) -> list[tuple[str, ir.Body]]:
    """Every pattern of a file, and every distinct layer pattern of its models."""
    out: list[tuple[str, ir.Body]] = [(p.name, p.body) for p in program.patterns]
    for m in program.models:
        out.extend((f"{m.name}[{k}]", b) for k, b in enumerate(m.distinct()))
    return out


def _nodes(body: ir.Body) -> list[ir.Pattern]:
    return [n for p in ir.body_patterns(body) for n in ir.walk(p)]


def _layout_sizes(body: ir.Body) -> set[int]:
    sizes = set()
    for n in _nodes(body):
        if isinstance(n, ir.Neighborhood):
            sizes.add(n.layout.size)
        elif isinstance(n, ir.Where) and n.layout is not None:
            sizes.add(n.layout.size)
    return sizes


def _is_dynamic(body: ir.Body) -> bool:
    return any(ir.is_dynamic(p) for p in ir.body_patterns(body))


def _has_local(body: ir.Body) -> bool:
    return any(isinstance(n, ir.Window | ir.Neighborhood) for n in _nodes(body))


def _static_part(p: ir.Pattern) -> ir.Pattern:
    """The pattern with every selector replaced by `none`: what it allows before looking at the data."""
    match p:
        case ir.TopK() | ir.Threshold() | ir.Vertical() | ir.Slash():
            return ir.Empty()
        case ir.Union(a, b):
            return ir.Union(_static_part(a), _static_part(b))
        case ir.Inter(a, b):
            return ir.Inter(_static_part(a), _static_part(b))
    return p


def _cases() -> list[tuple[str, str]]:
    return [(path.name, name) for path in LIBRARY_FILES for name, _ in _bodies(_load(path, small=True))]


def _get(file: str, name: str, defines: dict[str, int] | None = None) -> ir.Body:
    program = P.load(LIBRARY / file, defines)
    item = program.get(name)
    assert item is not None, f"{file} has no '{name}'"
    assert isinstance(item, ir.PatternDef)
    return item.body


def _model(file: str, name: str) -> ir.Model:
    item = P.load(LIBRARY / file).get(name)
    assert isinstance(item, ir.Model)
    return item


# --- the files -------------------------------------------------------------------------------------


def test_library_has_at_least_16_files() -> None:
    assert len(LIBRARY_FILES) >= 16, [p.name for p in LIBRARY_FILES]


def test_library_covers_the_literature() -> None:
    names: dict[str, str] = {}
    for path in LIBRARY_FILES:
        for name in _load(path, small=True).names():
            assert name not in names, f"'{name}' is defined in {names.get(name)} and {path.name}"
            names[name] = path.name
    wanted = {
        "mistral", "streaming", "longformer", "longformer_dilated", "bigbird", "strided", "fixed",
        "logsparse", "power", "masformer", "moa", "tidaldecode", "nat", "dinat", "gna", "video_causal",
        "radial", "nsa", "prefill", "xattention", "seer", "swin", "swin_shifted", "dilated",
    }  # fmt: skip
    assert wanted <= set(names), sorted(wanted - set(names))


@pytest.mark.parametrize("path", LIBRARY_FILES, ids=lambda p: p.name)
def test_file_checks(path: Path) -> None:
    program = P.load(path)
    assert program.names(), f"{path.name} defines nothing"
    assert patc(["check", str(path)]) == 0


@pytest.mark.parametrize("path", LIBRARY_FILES, ids=lambda p: p.name)
def test_file_opens_with_its_paper(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines and lines[0].startswith("# "), f"{path.name} must open with a comment"
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    text = " ".join(header)
    assert re.search(r"\((?:[^()]*?), (?:19|20)\d\d[,)]", text), f"{path.name}: name the paper (authors, year)"
    assert len(text) > 120, f"{path.name}: say what the pattern models"


@pytest.mark.parametrize("path", LIBRARY_FILES, ids=lambda p: p.name)
def test_file_is_canonical(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert patc(["fmt", "--check", str(path)]) == 0, capsys.readouterr().out


# --- every pattern ---------------------------------------------------------------------------------


@pytest.mark.parametrize("file,name", _cases())
def test_pattern_builds_a_mask_without_empty_rows(file: str, name: str) -> None:
    path = LIBRARY / file
    item = _load(path, small=True).get(name)
    if isinstance(item, ir.PatternDef) and item.permute is not None:
        pytest.skip("a permuted pattern: PBS-Attn's far part, whose rows pbs_diagonal completes (test_permutation.py)")
    body = dict(_bodies(_load(path, small=True)))[name]
    sizes = _layout_sizes(body)
    assert len(sizes) <= 1, f"{name} mixes layouts of sizes {sizes}"
    lengths = tuple(sizes) if sizes else LENGTHS_1D
    for n in lengths:
        if _is_dynamic(body):
            # The selectors pick blocks from the data; what stands without them must still cover every
            # query when the pattern holds a window (NSA, FlexPrefill, ...).
            if not _has_local(body):
                continue
            parts = ir.body_patterns(body)
            masks = np.stack([dense_mask(_static_part(p), n) for p in parts])
        else:
            masks = dense_mask(body, n)
            if isinstance(body, ir.Heads):
                assert masks.shape == (body.count, n, n)
                masks = masks.reshape(body.count, n, n)
            else:
                assert masks.shape == (n, n)
                masks = masks[None]
        rows = masks.sum(axis=-1)
        empty = np.argwhere(rows == 0)
        assert empty.size == 0, f"{file}:{name} at N={n}: query {empty[0][-1]} has no key"
        # Every library pattern lets a query see itself (a window, neighborhood or block around it).
        blind = np.argwhere(~np.diagonal(masks, axis1=-2, axis2=-1))
        assert blind.size == 0, f"{file}:{name} at N={n}: query {blind[0][-1]} does not see itself"


# --- exact meanings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "file,name,keys",
    [
        ("nat.pat", "nat", 7 * 7),
        ("dinat.pat", "dinat", 7 * 7),
        ("dinat.pat", "dinat_stage1", 7 * 7),
        ("gna.pat", "gna", 16 * 16),
        ("gna.pat", "gna_blocked", 15 * 15),
        ("video.pat", "video_na", 3 * 9 * 9),
        ("swin.pat", "swin", 7 * 7),
        ("axial.pat", "criss_cross", 64 + 64 - 1),
    ],
)
def test_grid_patterns_have_exact_row_counts(file: str, name: str, keys: int) -> None:
    body = _get(file, name)
    (n,) = _layout_sizes(body)
    rows = dense_mask(body, n).sum(axis=1)
    assert (rows == keys).all(), (rows.min(), rows.max())


def test_video_causal_sees_only_current_and_past_frames() -> None:
    body = _get("video.pat", "video_causal")
    m = dense_mask(body, 16 * 32 * 32)
    frame = np.arange(16 * 32 * 32) // (32 * 32)
    i, j = np.nonzero(m)
    assert (frame[j] <= frame[i]).all() and (frame[i] - frame[j] <= 2).all()
    rows = m.sum(axis=1)
    assert rows[frame == 0].max() == 81 and rows[frame >= 2].min() == 243


def test_streaming_rows() -> None:
    w, sinks, n = 64, 4, 300
    m = dense_mask(_get("streaming.pat", "streaming", {"w": w, "sinks": sinks}), n)
    i = np.arange(n)
    assert (m.sum(axis=1) == np.minimum(i + 1, w) + np.clip(i + 1 - w, 0, sinks)).all()
    assert not np.triu(m, 1).any()


def test_mistral_default_window() -> None:
    m = dense_mask(_get("mistral.pat", "mistral"), 5000)
    assert m.sum(axis=1).max() == 4096 and m[4999, 4999 - 4095] and not m[4999, 4999 - 4096]


def test_dilated_window_spans_r_times_d() -> None:
    body = _get("dilated_window.pat", "dilated")
    n = 4200
    m = dense_mask(body, n)
    i = np.arange(n)
    assert (m.sum(axis=1) == np.minimum(i // 4, 1023) + 1).all()
    assert m[4100, 4100 - 4092] and not m[4100, 4100 - 4096] and not m[4100, 4099]


def test_longformer_global_tokens() -> None:
    m = dense_mask(_get("longformer.pat", "longformer"), 2048)
    assert m[:16].all() and m[:, :16].all()
    assert m[1000].sum() == 2 * 256 + 1 + 16


def test_bigbird_blocks_and_determinism() -> None:
    body = _get("bigbird.pat", "bigbird")
    n, b = 2048, 64
    m = dense_mask(body, n)
    assert (m == dense_mask(body, n)).all()
    blocks = m.reshape(n // b, b, n // b, b)
    assert (blocks.all(axis=(1, 3)) == blocks.any(axis=(1, 3))).all(), "BigBird works on whole blocks"
    per_row = blocks.any(axis=(1, 3)).sum(axis=1)
    assert per_row[0] == n // b and per_row[5:].min() >= 3 + 2 and per_row.max() == n // b
    assert per_row[5:].max() <= 3 + 2 + 3


def test_power_block_hops() -> None:
    n, b = 64 * 40, 64
    m = dense_mask(_get("power.pat", "power"), n)
    qb, kb = np.arange(n)[:, None] // b, np.arange(n)[None, :] // b
    d = qb - kb
    hop = (d >= 0) & ((d <= 1) | ((d & (d - 1)) == 0))
    expect = hop & (np.arange(n)[:, None] >= np.arange(n)[None, :])
    assert (m == expect).all()


def test_sparse_transformer_fixed_summary_columns() -> None:
    m = dense_mask(_get("sparse_transformer.pat", "fixed"), 1024)
    assert m[1023, 120:128].all() and not m[1023, 119] and m[1023, 896:].all() and not m[1023, 128:136].any()


def _swin_reference(h: int, w: int, win: int, shift: int) -> np.ndarray:
    """Swin's shifted windows as its code builds them: roll by -shift, partition, mask wrapped regions."""
    label = np.zeros((h, w), dtype=int)
    cuts = (slice(0, -win), slice(-win, -shift), slice(-shift, None))
    cnt = 0
    for hs in cuts:
        for ws in cuts:
            label[hs, ws] = cnt
            cnt += 1
    y, x = np.divmod(np.arange(h * w), w)
    ys, xs = (y - shift) % h, (x - shift) % w  # position in the rolled map
    window = (ys // win) * (w // win) + xs // win
    region = label[ys, xs]
    same: np.ndarray = (window[:, None] == window[None, :]) & (region[:, None] == region[None, :])
    return same


def test_swin_shifted_matches_cyclic_shift_with_mask() -> None:
    m = dense_mask(_get("swin.pat", "swin_shifted"), 56 * 56)
    assert (m == _swin_reference(56, 56, 7, 3)).all()


def test_gna_blocked_is_tiles() -> None:
    m = dense_mask(_get("gna.pat", "gna_blocked"), 3600)
    y, x = np.divmod(np.arange(3600), 60)
    tile = (y // 15) * 4 + x // 15
    assert (m == (tile[:, None] == tile[None, :])).all()


@pytest.mark.parametrize("frames,tokens,w0", [(8, 64, 32), (32, 16, 8)])
def test_radial_bands_halve_with_frame_distance(frames: int, tokens: int, w0: int) -> None:
    body = _get("radial.pat", "radial", {"frames": frames, "tokens": tokens, "w0": w0, "side": 4})
    n = frames * tokens
    m = dense_mask(body, n)
    f, s = np.divmod(np.arange(n), tokens)
    dt = np.abs(f[:, None] - f[None, :])
    ds = np.abs(s[:, None] - s[None, :])
    band = np.floor(np.log2(np.maximum(dt, 1))).astype(int)
    expect = ds <= w0 // 2 ** np.minimum(band, 4)
    assert (m == expect).all()


def test_radial_2d_shrinks_spatially() -> None:
    body = _get("radial.pat", "radial_2d", {"frames": 8, "side": 16, "s0": 8})
    m = dense_mask(body, 8 * 16 * 16)
    centre = 0 * 256 + 8 * 16 + 8  # frame 0, pixel (8, 8)
    per_frame = m[centre].reshape(8, 16, 16).sum(axis=(1, 2))
    # |dt| <= 1: offsets up to 8 (the whole 16 x 16 frame); 2..3: up to 4; 4..7: up to 2.
    assert list(per_frame) == [16 * 16] * 2 + [9 * 9] * 2 + [5 * 5] * 4


def test_moa_heads_and_elastic_spans() -> None:
    moa = _get("moa.pat", "moa")
    assert isinstance(moa, ir.Heads) and moa.count == 16
    elastic = _get("moa.pat", "moa_elastic")
    assert isinstance(elastic, ir.Heads) and elastic.count == 32
    short, long = dense_mask(elastic, 2048), dense_mask(elastic, 4096)
    # Head 0: window 127 + N // 16 plus 64 sinks; the span grows with N.
    assert short[0, 2047].sum() == 64 + 127 + 2048 // 16 + 1
    assert long[0, 4095].sum() == 64 + 127 + 4096 // 16 + 1


def test_model_schedules() -> None:
    mas = _model("masformer.pat", "masformer")
    full = [k for k, b in enumerate(mas.schedule) if b == ir.Causal()]
    assert mas.layers == 24 and full == list(range(0, 24, 4))
    gemma3 = _model("gemma.pat", "gemma3")
    assert [k for k, b in enumerate(gemma3.schedule) if b == ir.Causal()] == [5, 11, 17, 23, 29]
    gemma2 = _model("gemma.pat", "gemma2")
    assert [k for k, b in enumerate(gemma2.schedule) if b == ir.Causal()] == list(range(1, 42, 2))
    tidal = _model("tidaldecode.pat", "tidaldecode")
    dense = [k for k, b in enumerate(tidal.schedule) if b == ir.Causal()]
    assert dense == [0, 1, 2, 13] and all(_is_dynamic(b) for k, b in enumerate(tidal.schedule) if k not in dense)


def test_longnet_heads_cover_every_token_in_dilated_segments() -> None:
    body = _get("longnet.pat", "longnet_heads", {"w": 16})
    m = dense_mask(body, 256)
    # Past its first segment of w, a query sees keys beyond its own segment through some head's dilated part.
    i, j = np.arange(256)[:, None], np.arange(256)[None, :]
    far = m.any(axis=0) & (i // 16 != j // 16)
    assert far[16:64].any(axis=1).all()


def test_params_can_be_overridden() -> None:
    a = dense_mask(_get("streaming.pat", "streaming"), 4096)
    b = dense_mask(_get("streaming.pat", "streaming", {"w": 2048}), 4096)
    assert a[4095].sum() == 1024 + 4 and b[4095].sum() == 2048 + 4


def test_dynamic_patterns_are_dynamic() -> None:
    for file, name in [("nsa.pat", "nsa"), ("flexprefill.pat", "prefill"), ("xattention.pat", "xattention"),
                       ("seer.pat", "seer"), ("minference.pat", "block_sparse")]:  # fmt: skip
        assert _is_dynamic(_get(file, name)), name
    seer = _get("seer.pat", "seer")
    assert any(isinstance(n, ir.TopK) and n.given for n in _nodes(seer))


def test_logsparse_keys_are_powers_of_two_back() -> None:
    # LogSparse: keys at distances 0, 1, 2, 4, ... <= i.
    n = 513
    m = dense_mask(_get("logsparse.pat", "logsparse"), n)
    for i in (0, 1, 2, 3, 4, 100, 512):
        expect = {i} | {i - 2**e for e in range(12) if 2**e <= i}
        assert set(np.nonzero(m[i])[0]) == expect


def test_image_transformer_local_1d_sees_its_block_and_the_previous_one() -> None:
    n, lq = 1000, 256
    m = dense_mask(_get("image_transformer.pat", "local_1d"), n)
    i = np.arange(n)
    assert (m.sum(axis=1) == i - np.maximum(i // lq - 1, 0) * lq + 1).all()
