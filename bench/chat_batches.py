"""Conversations in batches: one per row, padded (what kernel/chat.py does), against packing rows full.

Useful tokens per second (padding excluded) of a training step, for conversation lengths drawn from a
log-normal like instruction datasets' (median ~180 tokens, a long tail; synthetic: no dataset is downloaded),
cut at the context as the run cuts them:
  padded   one conversation per row, each batch as wide as its longest row: random batches, and batches
           grouped by length as kernel.chat.ConversationSampler serves them
  packed   rows filled to the context with several conversations, no padding, *no* document mask: an upper
           bound for packing, whose mask (so conversations do not attend to one another) only adds cost
and the cost of that mask alone: SDPA with a block-diagonal causal mask against is_causal at the context.
All in one process, interleaved, best of --repeats. Usage: python bench/chat_batches.py [--context 512]
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kernel.config import load_config  # noqa: E402
from kernel.model import build_model  # noqa: E402
from kernel.chat import GROUPED_BATCHES  # noqa: E402


def lengths(count: int, context: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.minimum(rng.lognormal(np.log(180), 0.7, count).astype(int) + 8, context + 1)


def step_seconds(model, x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        loss = model(x, y)[1]
        loss.backward()
        best = min(best, time.perf_counter() - started)
        model.zero_grad(set_to_none=True)
    return best


def mask_cost(context: int, heads: int, width: int, documents: int, repeats: int) -> float:
    """Time of SDPA with a block-diagonal causal mask over that of is_causal, at the context."""
    q, k, v = (torch.randn(4, heads, context, width) for _ in range(3))
    document = torch.arange(context) * documents // context
    mask = (document[:, None] == document[None, :]) & torch.ones(context, context, dtype=torch.bool).tril()
    timed = {}
    for name, kwargs in (("causal", {"is_causal": True}), ("masked", {"attn_mask": mask})):
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, **kwargs)
            best = min(best, time.perf_counter() - started)
        timed[name] = best
    return timed["masked"] / timed["causal"]


def padded_throughput(model, batches: list[np.ndarray], repeats: int) -> tuple[float, float]:
    """(useful tokens/s, share of padding) of one-conversation-per-row batches, each as wide as its longest."""
    useful = seconds = positions = 0.0
    for batch in batches:
        width = int(batch.max()) - 1
        x = torch.randint(8192, (len(batch), width))
        y = x.clone()
        for row, size in enumerate(batch):
            y[row, size - 1:] = -1
        seconds += step_seconds(model, x, y, repeats)
        useful, positions = useful + float((batch - 1).sum()), positions + len(batch) * width
    return useful / seconds, 1 - useful / positions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=6, help="batches timed per way")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = load_config("llm_cpu.yaml", {"model.n_layer": 4, "model.n_embd": 256, "model.n_head": 4,
                                          "model.block_size": args.context, "train.dtype": "float32"})
    model = build_model(config, 8192)
    pool = lengths(args.batch * GROUPED_BATCHES, args.context)  # what the sampler draws at once
    spread = np.linspace(0, GROUPED_BATCHES - 1, args.batches).astype(int)  # timed batches, across the pool
    random_batches = [pool.reshape(GROUPED_BATCHES, args.batch)[i] for i in spread]
    grouped_batches = [np.sort(pool).reshape(GROUPED_BATCHES, args.batch)[i] for i in spread]
    random_rate, random_waste = padded_throughput(model, random_batches, args.repeats)
    grouped_rate, grouped_waste = padded_throughput(model, grouped_batches, args.repeats)
    timed = np.concatenate(random_batches)
    rows = int(np.ceil((timed - 1).sum() / args.context))
    x = torch.randint(8192, (rows, args.context))
    packed_rate = float((timed - 1).sum()) / step_seconds(model, x, x, args.repeats)
    print(f"conversation lengths: median {int(np.median(pool))}, mean {pool.mean():.0f}, max {pool.max()} "
          f"(context {args.context})")
    print(f"padded, random batches: {random_rate:,.0f} useful tokens/s ({random_waste:.0%} padding)")
    print(f"padded, grouped by length ({GROUPED_BATCHES} batches at once, what kernel/chat.py does): "
          f"{grouped_rate:,.0f} useful tokens/s ({grouped_waste:.0%} padding, {grouped_rate / random_rate:.2f}x)")
    print(f"packed (no mask, an upper bound): {packed_rate:,.0f} useful tokens/s ({packed_rate / random_rate:.2f}x)")
    documents = max(1, round(args.context / np.median(pool)))
    print(f"SDPA with a document mask ({documents} documents per row) / is_causal at {args.context}: "
          f"{mask_cost(args.context, 4, 64, documents, args.repeats):.2f}x")


if __name__ == "__main__":
    main()
