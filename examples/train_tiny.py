"""Train a small Llama-style model under several attention patterns and plot the loss curves.

The task is copying: `length` random tokens, a separator, then the same tokens again; the loss is on the
copy. Predicting copy token t means reading the token `length` positions back, beyond a short window's
reach through the model's depth: `causal & window(15)` stays at chance, a window with a stride of 16
(which sees `length` = 32 back directly) and full causal attention learn it. Each pattern runs through
transformers as its own attention implementation (`patterndsl.integrations.hf.register`), from one config
with random initialisation (no downloads), the same initial weights and the same batches.

    python examples/train_tiny.py                  # CPU, a few minutes
    python examples/train_tiny.py --gpu            # a larger model and longer sequences on a CUDA GPU
    python examples/train_tiny.py --steps 20 --out /tmp/loss.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

PATTERNS = {
    "causal": "pattern p = causal",
    "window": "pattern p = causal & window(15)",
    "window+stride": "pattern p = causal & (window(15) | stride(16))",
}


def copy_batch(batch: int, length: int, vocab: int, generator: torch.Generator,
               device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels): `length` random tokens, the separator (token `vocab`), the same tokens again;
    labels are -100 except on the copy (the model predicts each next token)."""
    seq = torch.randint(0, vocab, (batch, length), generator=generator)
    tokens = torch.cat([seq, torch.full((batch, 1), vocab), seq], dim=1)
    labels = torch.full_like(tokens, -100)
    labels[:, length + 1:] = seq
    return tokens.to(device), labels.to(device)


def train(name: str, source: str, args: argparse.Namespace, device: str) -> list[float]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from patterndsl.integrations import hf

    impl = f"patterndsl_{name}"
    hf.register(impl, source)
    torch.manual_seed(0)  # the same initial weights for every pattern
    config = LlamaConfig(vocab_size=args.vocab + 1, hidden_size=args.dim, intermediate_size=2 * args.dim,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=max(1, args.heads // 2), max_position_embeddings=2 * args.length + 1)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(1)  # the same batches for every pattern
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        tokens, labels = copy_batch(args.batch, args.length, args.vocab, generator, device)
        loss = model(tokens, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"{name:>14}  step {step:5d}  loss {losses[-1]:.3f}  {time.perf_counter() - start:6.1f} s", flush=True)
    return losses


def plot(curves: dict[str, list[float]], path: Path, chance: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        ax.plot(losses, label=f"{name}: {PATTERNS.get(name, name).removeprefix('pattern p = ')}")
    ax.axhline(chance, color="grey", linestyle=":", label="chance")
    ax.set_xlabel("step")
    ax.set_ylabel("loss on the copied tokens")
    ax.set_title("copying 32 tokens back, one model per pattern")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the larger size, on a CUDA GPU")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("train_tiny.png"), help="the loss curves (PNG)")
    parser.add_argument("--json", type=Path, default=None, help="also write the losses as JSON here")
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    args = parser.parse_args()
    size = (dict(steps=1000, vocab=256, dim=256, layers=2, heads=8, batch=64, lr=1e-3)
            if args.gpu else dict(steps=150, vocab=32, dim=64, layers=2, heads=4, batch=32, lr=3e-3))
    args.length = 512 if args.gpu else 32  # the stride (16) divides it; two layers of the window reach 30 back
    for key, value in size.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA GPU")
    device = "cuda" if args.gpu else "cpu"
    if not args.gpu:
        torch.set_num_threads(1)  # small matrices: more threads wait more than they work
    import warnings

    warnings.filterwarnings("ignore", message="patterndsl .*not the fast")  # the CPU path is the point on CPU
    curves = {name: train(name, PATTERNS[name], args, device) for name in args.patterns}
    plot(curves, args.out, chance=float(torch.log(torch.tensor(float(args.vocab)))))
    print(f"wrote {args.out}")
    if args.json is not None:
        args.json.write_text(json.dumps(curves))


if __name__ == "__main__":
    main()
