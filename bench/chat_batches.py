"""Conversations in batches: one per row, padded (what kernel/chat.py does), against packing rows full.

Useful tokens per second (padding excluded) of a training step, for conversation lengths drawn from a
log-normal like instruction datasets' (median ~180 tokens, a long tail; synthetic: no dataset is downloaded),
cut at the context as the run cuts them:
  padded   one conversation per row, each batch as wide as its longest row (kernel.chat.ConversationSampler)
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = load_config("llm_cpu.yaml", {"model.n_layer": 4, "model.n_embd": 256, "model.n_head": 4,
                                          "model.block_size": args.context, "train.dtype": "float32"})
    model = build_model(config, 8192)
    sizes = lengths(args.batch * args.batches, args.context)
    padded_useful = padded_time = 0.0
    for batch in sizes.reshape(args.batches, args.batch):
        width = int(batch.max()) - 1
        x = torch.randint(8192, (args.batch, width))
        y = x.clone()
        for row, size in enumerate(batch):
            y[row, size - 1:] = -1
        padded_time += step_seconds(model, x, y, args.repeats)
        padded_useful += float((batch - 1).sum())
    rows = int(np.ceil((sizes - 1).sum() / args.context))
    x = torch.randint(8192, (rows, args.context))
    packed_time = step_seconds(model, x, x, args.repeats)
    packed_useful = float((sizes - 1).sum())
    waste = 1 - padded_useful / sum(args.batch * (int(b.max()) - 1) for b in sizes.reshape(args.batches, args.batch))
    print(f"conversation lengths: median {int(np.median(sizes))}, mean {sizes.mean():.0f}, max {sizes.max()} "
          f"(context {args.context}); padding is {waste:.0%} of the padded batches' positions")
    print(f"padded (one per row): {padded_useful / padded_time:,.0f} useful tokens/s")
    print(f"packed (no mask, an upper bound): {packed_useful / packed_time:,.0f} useful tokens/s "
          f"({packed_useful / packed_time / (padded_useful / padded_time):.2f}x)")
    documents = max(1, round(args.context / np.median(sizes)))
    print(f"SDPA with a document mask ({documents} documents per row) / is_causal at {args.context}: "
          f"{mask_cost(args.context, 4, 64, documents, args.repeats):.2f}x")


if __name__ == "__main__":
    main()
