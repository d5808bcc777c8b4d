"""What patterndsl attention adds around its kernels in a transformers model: no copies of q, k, v (the
model's [B, H, N, D] views and its key/value heads go to the kernels as they are), and host syncs per pass,
not per layer (transformers hands every layer the same position ids and mask; reading them is a sync on a
GPU). Syncs are counted on the CPU as the operations that read a tensor on the host."""

from __future__ import annotations

import collections
import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", minversion="5.25")  # the hf extra's floor

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from patterndsl.integrations import hf  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:patterndsl .*not the fast")

READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.equal.default", "aten.is_nonzero.default"}
SIZE = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 128}


class _Ops(TorchDispatchMode):
    """Counts the aten operations run inside it (`tolist`, which reads a tensor without dispatching one on
    the CPU, counted by `_host_reads`)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def _host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Ops]:
    """Operations inside the block, host reads of a tensor's values under "read"."""
    mode = _Ops()
    tolist = torch.Tensor.tolist

    def counted(t: torch.Tensor) -> Any:
        mode.ops["read"] += 1
        return tolist(t)

    with monkeypatch.context() as m, mode:
        m.setattr(torch.Tensor, "tolist", counted)
        yield mode
    mode.ops["read"] += sum(n for op, n in mode.ops.items() if op in READS)


def _model(name: str, source: str, kind: str = "ministral", dtype: Any = torch.float64, **settings: Any) -> Any:
    hf.register(name, source, "m" if source.startswith("model") else None)
    config = transformers.AutoConfig.for_model(kind, **SIZE, **settings)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=name, dtype=dtype)


SCHEDULE = "model m = layers(4) {\n  3:4 => causal\n  else => causal & window(7)\n}\n"
LAYERS = ["sliding_attention"] * 3 + ["full_attention"]


def test_the_attention_function_hands_the_models_tensors_to_the_kernels_as_they_are() -> None:
    model = _model("pd_test_as_is", SCHEDULE, sliding_window=8, layer_types=LAYERS)
    bridge = transformers.AttentionInterface._global_mapping["pd_test_as_is"].__self__
    module = model.model.layers[0].self_attn
    q, k, v = (torch.randn(1, 16, h, 8, dtype=torch.float64).transpose(1, 2) for h in (4, 2, 2))  # as the model's
    out = torch.zeros(1, 4, 16, 8, dtype=torch.float64)
    seen: list[tuple[Any, ...]] = []

    class Recorder:  # the compiled attention, its kernels replaced by a record of what they were given
        spec = bridge.attn.spec

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            seen.append(args)
            return out

    bridge.attn = Recorder()
    position_ids = torch.arange(16)[None]
    for _ in range(2):
        with _Ops() as mode:
            got, _ = bridge.attention(module, q, k, v, None, scaling=0.5, sliding_window=8,
                                      position_ids=position_ids)
    assert all(a is b for a, b in zip(seen[-1], (q, k, v), strict=True))  # no copy, kv heads not expanded
    assert dict(mode.ops) == {"aten.transpose.int": 1}  # the output as [B, N, H, D], a view
    assert got.data_ptr() == out.data_ptr()


def test_a_training_step_reads_the_device_once_whatever_the_depth(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("pd_test_reads", SCHEDULE, sliding_window=8, layer_types=LAYERS)
    x = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        with _host_reads(monkeypatch) as mode:
            model(x, labels=x).loss.backward()
    assert mode.ops["read"] == 1  # the position ids: packed documents or not, for all 4 layers
    with torch.inference_mode():  # inference tensors keep no version: read per layer, still right
        mask = torch.ones(2, 24, dtype=torch.long)
        mask[1, :4] = 0
        rows = torch.stack([x[0], torch.cat([x[0, :4], x[0, :20]])])
        assert (model(rows, attention_mask=mask).logits[1, 4:] - model(x[:, :20]).logits[0]).abs().max() < 1e-7


def test_layers_sharing_a_pattern_share_its_reach_check() -> None:
    model = _model("pd_test_reach", "model m = layers(4) {\n  3:4 => causal\n  else => causal & window(N // 4)\n}\n",
                   "llama")
    bridge = transformers.AttentionInterface._global_mapping["pd_test_reach"].__self__
    model(torch.randint(0, 64, (1, 20)))
    model(torch.randint(0, 64, (1, 24)))
    # two patterns at the model's longest length; the one that reads N again at 20 and 24: not per layer
    assert len(bridge.checked) == 2 + 2


@pytest.fixture
def _no_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton kernels launched in the interpreter do nothing: the host's work alone is counted."""
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", lambda self, *args, **kwargs: None)


@pytest.mark.usefixtures("_no_kernels")
def test_a_padded_decode_step_over_the_pattern_cache_reads_the_device_as_often_as_sdpa(
        monkeypatch: pytest.MonkeyPatch) -> None:
    if torch.cuda.is_available():
        pytest.skip("counts host reads of CPU tensors")
    ours = _model("pd_test_decode_reads", "pattern p = causal & (window(7) | sink(2))", "llama", torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(ours.config), attn_implementation="sdpa")
    prompt = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0

    def per_step(model: Any, cache: bool) -> float:
        reads = []
        for new in (2, 2, 6):  # the first call pays one-time checks
            extra = {"cache": hf.pattern_cache(model, max_length=32)} if cache else {}
            with torch.no_grad(), _host_reads(monkeypatch) as mode:
                model.generate(prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               pad_token_id=0, **extra)
            reads.append(mode.ops["read"])
        return (reads[2] - reads[1]) / 4

    assert per_step(ours, True) <= per_step(theirs, False)  # the mask's padding read once a step, not per layer
