"""# 7. Sampling

Text from the trained model: the prompt is encoded, then tokens are drawn one at a time from the softmax
of the last position's logits, sharpened by `temperature` and limited to the `top_k` most likely tokens.
Sampling uses its own seeded generator, so the same checkpoint and seed give the same text.
"""

import torch
import torch.nn.functional as F

from kernel.config import SampleConfig
from kernel.tokenization import Tokenizer
from kernel.model import GPT


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend idx (B, T) by max_new_tokens sampled tokens; the context is cropped to the block size."""
    for _ in range(max_new_tokens):
        context = idx[:, -model.config.block_size:]
        logits = model(context)[0][:, -1, :].float() / temperature
        if 0 < top_k < logits.size(-1):
            kth_largest = torch.topk(logits, top_k).values[:, -1:]
            logits = logits.masked_fill(logits < kth_largest, float("-inf"))
        probs = F.softmax(logits, dim=-1)
        next_token = torch.multinomial(probs, num_samples=1, generator=generator)
        idx = torch.cat((idx, next_token), dim=1)
    return idx


def sample_texts(model: GPT, tokenizer: Tokenizer, settings: SampleConfig, device: torch.device,
                 seed: int) -> list[tuple[str, str]]:
    """[(prompt, prompt + continuation), ...], one per prompt in settings.prompts."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = []
    for prompt in settings.prompts:
        ids = tokenizer.encode(prompt or "\n")  # the model needs at least one token to condition on
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        out = generate(model, idx, settings.max_new_tokens, settings.temperature, settings.top_k, generator)
        samples.append((prompt, tokenizer.decode(out[0].tolist())))
    model.train(was_training)
    return samples


def format_samples(samples: list[tuple[str, str]]) -> str:
    blocks = [f"=== sample {i + 1} | prompt {prompt!r} ===\n{text}\n" for i, (prompt, text) in enumerate(samples)]
    return "\n".join(blocks)
