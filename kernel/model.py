"""## 10. The model

A decoder-only transformer in two presets that share one implementation:

* `gpt2`: exactly GPT-2: token + learned position embeddings, pre-norm blocks of causal multi-head
  self-attention and a GELU MLP, LayerNorm, biases, an output head tied to the token embedding.
* `llama`: exactly Llama: no position embeddings but rotary ones (RoPE) on queries and keys, RMSNorm,
  a SwiGLU MLP, no biases; optionally QK-norm (RMSNorm on each head's queries and keys, as in Qwen3).

Keeping each preset exactly its namesake means a trained model exports to `transformers` as
`GPT2LMHeadModel`, `LlamaForCausalLM` or (with QK-norm) `Qwen3ForCausalLM`, and that such a model can be
loaded to start from (`model.init_from`). Pretrained models differ from the presets in details the model
also holds exactly: grouped-query attention (fewer key/value heads than query heads), a head width that is
not width / heads, any MLP width, an output head of its own (not tied to the embedding), their norms'
epsilon and a position count longer than the training windows. Section 11 maps each of these tensors to its
name in a `transformers` checkpoint.

Attention goes through `torch.nn.functional.scaled_dot_product_attention`, which picks the fastest kernel
the hardware has (FlashAttention on Ampere+, memory-efficient attention on a T4, plain math on a CPU).
With `gradient_checkpointing` each block's activations are recomputed in the backward pass instead of
being stored, trading ~30% more compute for a much smaller memory footprint. For generation, a `KVCache`
keeps each layer's keys and values, so every new token costs one forward step over that token alone.
"""

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kernel.config import Config, ModelConfig
from kernel.chat import IGNORED


# --- Its parts ----------------------------------------------------------------------------------------

def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """The embedding's row count: the vocabulary rounded up, since matrix shapes that are multiples of 64
    run faster on tensor cores. The extra rows are never targets; sampling and export mask them."""
    return multiple * math.ceil(vocab_size / multiple)


@dataclass
class GPTConfig(ModelConfig):
    """The `model` section of the config (section 5: shape, arch, dropout, ...) plus the vocabulary size,
    which the tokenizer decides. Fields the config leaves at 0 take the preset's rule here, so a GPTConfig
    always holds the exact shape (a pretrained model's config sets them all)."""
    vocab_size: int = field(kw_only=True)  # embedding rows, padding included

    def __post_init__(self) -> None:
        gpt2 = self.arch == "gpt2"
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        # GPT-2: 4 x width. SwiGLU has three matrices, so 8/3 x width (rounded up to a multiple of 32) keeps
        # the parameter count of a 4 x width MLP.
        self.mlp_hidden = self.mlp_hidden or (4 * self.n_embd if gpt2 else 32 * math.ceil(8 * self.n_embd / 3 / 32))
        self.norm_eps = self.norm_eps or (1e-5 if gpt2 else 1e-6)
        self.max_positions = self.max_positions or self.block_size

    @classmethod
    def from_settings(cls, model: ModelConfig, vocab_size: int) -> "GPTConfig":
        """The model for these settings and a tokenizer of `vocab_size` tokens."""
        padded = padded_vocab_size(vocab_size, model.vocab_multiple)
        return cls(**{f.name: getattr(model, f.name) for f in fields(ModelConfig)}, vocab_size=padded)


def make_norm(config: GPTConfig, size: int) -> nn.Module:
    if config.arch == "llama":
        return nn.RMSNorm(size, eps=config.norm_eps)
    return nn.LayerNorm(size, eps=config.norm_eps, bias=config.bias)


def rotary_tables(config: GPTConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, (T, head_dim), in Llama's layout: the first and second halves of a head form the pairs."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, device=positions.device, dtype=torch.float32) / d))
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, d/2)
    angles = torch.cat((angles, angles), dim=-1)              # (T, d)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + d/2]) of every head of x (B, nh, T, d) by its position's angle."""
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat((-second, first), dim=-1)
    return (x * cos + rotated_half * sin).to(x.dtype)


class KVCache:
    """Keys and values of the positions seen so far, one (B, nh, T, hs) pair per layer."""

    def __init__(self, n_layer: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer

    @property
    def length(self) -> int:
        """Positions held (read before a forward pass: during one, layers fill up one after another)."""
        return self.layer_length(0)

    def layer_length(self, layer: int) -> int:
        return 0 if self.keys[layer] is None else self.keys[layer].size(2)

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k, v = torch.cat((self.keys[layer], k), dim=2), torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class CausalSelfAttention(nn.Module):
    """Causal self-attention of n_head query heads. With grouped-query attention (n_kv_head < n_head, as in
    many Llama and Qwen3 models) each key/value head serves n_head / n_kv_head consecutive query heads."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.dropout = config.dropout
        bias = config.bias and config.arch == "gpt2"
        self.sizes = [config.n_head * config.head_dim] + 2 * [config.n_kv_head * config.head_dim]  # q, k, v
        self.c_attn = nn.Linear(config.n_embd, sum(self.sizes), bias=bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(self.sizes[0], config.n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.q_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps) if config.qk_norm else None

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.sizes, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim) for t in (k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hs)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        past = 0
        if cache is not None:  # the cache holds the n_kv_head heads: grouped-query attention's memory saving
            past = cache.layer_length(layer)
            k, v = cache.extend(layer, k, v)
        if self.n_kv_head != self.n_head:  # query head h reads key/value head h // (n_head / n_kv_head)
            k, v = (t.repeat_interleave(self.n_head // self.n_kv_head, dim=1) for t in (k, v))
        if past == 0:  # every query sees itself and what precedes it
            mask, causal = None, True
        else:  # new queries at positions past.., keys at 0..past+T-1
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, self.sizes[0])  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GPT-2: Linear, GELU (tanh approximation), Linear."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class SwiGLU(nn.Module):
    """Llama: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.w_gate = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.w_up = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.silu(self.w_gate(x)) * self.w_up(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = SwiGLU(config) if config.arch == "llama" else MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, rotary)
        x = x + self.mlp(self.ln_2(x))
        return x


# --- The model ----------------------------------------------------------------------------------------

class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.arch not in ("gpt2", "llama"):
            raise ValueError(f"unknown architecture {config.arch!r}")
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.arch == "gpt2":
            modules["wpe"] = nn.Embedding(config.max_positions, config.n_embd)
        modules.update(drop=nn.Dropout(config.dropout), h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                       ln_f=make_norm(config, config.n_embd))
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:  # weight tying: one matrix embeds and un-embeds
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the stream's variance stays put
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """The model's parameters, a tied embedding counted once; LoRA's adapters (section 12) are not counted:
        merged into the weights at export, they add none."""
        return sum(p.numel() for name, p in self.named_parameters() if ".lora_" not in name)

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B: 6 per weight
        that multiplies (every parameter but the position table, the tied head included once), plus
        attention's 12 x layers x (heads x head width) x context."""
        c = self.config
        weights = self.num_params() - (self.transformer.wpe.weight.numel() if c.arch == "gpt2" else 0)
        return 6 * weights + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """Logits (B, T, vocab) and, given targets (B, T), the mean cross-entropy loss. With a cache, idx
        continues the sequence the cache holds (and is added to it)."""
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.max_positions:
            raise ValueError(f"sequence of length {past + T} is longer than the model's {self.config.max_positions} "
                             "positions (model.max_positions, block_size unless set)")
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx)  # (B, T, C)
        rotary = None
        if self.config.arch == "gpt2":
            x = x + self.transformer.wpe(pos)
        else:
            rotary = rotary_tables(self.config, pos)
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, None, layer, rotary, use_reentrant=False)
            else:
                x = block(x, cache, layer, rotary)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            # a target of IGNORED (a conversation's prompt or padding, section 8) is not trained on
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORED)
        return logits, loss


# --- Building it --------------------------------------------------------------------------------------

def build_model(config: Config, vocab_size: int) -> GPT:
    return GPT(GPTConfig.from_settings(config.model, vocab_size))


class ShapesOnly(torch.overrides.TorchFunctionMode):
    """Skips the weights' random normal fill: a model on the meta device is only its shapes, and meta's
    normal_ imports torch._dynamo (about 2 s, paid inside every run's time budget)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) == "normal_":
            return args[0] if args else kwargs["tensor"]  # init.normal_(tensor=...) or Tensor.normal_
        return func(*args, **(kwargs or {}))


def model_shape(config: Config, vocab_size: int) -> GPT:
    """The model on the meta device, allocating nothing: its parameter counts and FLOPs, never its values."""
    with torch.device("meta"), ShapesOnly():
        return build_model(config, vocab_size)
