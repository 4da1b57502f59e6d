"""## 11. Export to Hugging Face transformers

Every run ends by writing `hf/`: `config.json`, `model.safetensors`, `generation_config.json` and the
tokenizer files, which `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load
offline. Each preset is exactly its namesake's architecture, so only names and layout change:
`gpt2` loads as `GPT2LMHeadModel` (its `Conv1D` stores linear weights transposed; a model trained without
biases gets zero biases, which compute the same), `llama` as `LlamaForCausalLM` (the fused q/k/v matrix is
split), `llama` with QK-norm as `Qwen3ForCausalLM`. `python -m kernel export CKPT OUT` does the same from a
checkpoint.
"""

import os
import shutil
from pathlib import Path

import torch

from kernel.config import SampleConfig
from kernel.tokenization import Tokenizer
from kernel.model import GPT

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under GPT-2's names and layout (the tied head is stored once, as the embedding)."""
    ours = model.state_dict()
    c = model.config
    exported = {"transformer.wte.weight": ours["transformer.wte.weight"], "transformer.wpe.weight": ours["transformer.wpe.weight"]}
    norms = [f"transformer.h.{i}.{n}" for i in range(c.n_layer) for n in ("ln_1", "ln_2")] + ["transformer.ln_f"]
    for name in norms:
        exported[f"{name}.weight"] = ours[f"{name}.weight"]
        exported[f"{name}.bias"] = ours.get(f"{name}.bias", torch.zeros(c.n_embd))
    for i in range(c.n_layer):
        for suffix in CONV1D_WEIGHTS:
            weight = ours[f"transformer.h.{i}.{suffix}"]
            exported[f"transformer.h.{i}.{suffix}"] = weight.t()
            bias_name = f"transformer.h.{i}.{suffix.removesuffix('weight')}bias"
            exported[bias_name] = ours.get(bias_name, torch.zeros(weight.size(0)))
    return {name: tensor.detach().float().cpu().contiguous().clone() for name, tensor in exported.items()}


def llama_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under Llama's (and Qwen3's) names: q/k/v split, the tied head stored once."""
    ours, c = model.state_dict(), model.config
    exported = {"model.embed_tokens.weight": ours["transformer.wte.weight"],
                "model.norm.weight": ours["transformer.ln_f.weight"]}
    for i in range(c.n_layer):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        q, k, v = ours[src + "attn.c_attn.weight"].split(c.n_embd, dim=0)
        exported.update({dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
                         dst + "self_attn.v_proj.weight": v,
                         dst + "self_attn.o_proj.weight": ours[src + "attn.c_proj.weight"],
                         dst + "mlp.gate_proj.weight": ours[src + "mlp.w_gate.weight"],
                         dst + "mlp.up_proj.weight": ours[src + "mlp.w_up.weight"],
                         dst + "mlp.down_proj.weight": ours[src + "mlp.c_proj.weight"],
                         dst + "input_layernorm.weight": ours[src + "ln_1.weight"],
                         dst + "post_attention_layernorm.weight": ours[src + "ln_2.weight"]})
        if c.qk_norm:
            exported[dst + "self_attn.q_norm.weight"] = ours[src + "attn.q_norm.weight"]
            exported[dst + "self_attn.k_norm.weight"] = ours[src + "attn.k_norm.weight"]
    return {name: tensor.detach().float().cpu().contiguous().clone() for name, tensor in exported.items()}


def hf_config(model: GPT, special: dict):
    from transformers import GPT2Config, LlamaConfig, Qwen3Config

    c = model.config
    if c.arch == "gpt2":
        return GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                          n_head=c.n_head, activation_function="gelu_new", resid_pdrop=c.dropout, embd_pdrop=c.dropout,
                          attn_pdrop=c.dropout, layer_norm_epsilon=1e-5, tie_word_embeddings=True,
                          architectures=["GPT2LMHeadModel"], **special)
    config_class, architecture = (Qwen3Config, "Qwen3ForCausalLM") if c.qk_norm else (LlamaConfig, "LlamaForCausalLM")
    return config_class(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.mlp_hidden,
                        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_head,
                        head_dim=c.head_dim, max_position_embeddings=c.block_size, rms_norm_eps=1e-6,
                        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, hidden_act="silu",
                        attention_bias=False, attention_dropout=c.dropout, tie_word_embeddings=True,
                        architectures=[architecture], **special)


def export_hf(model: GPT, tokenizer: Tokenizer, sampling: SampleConfig, folder: str | Path) -> Path:
    """Write a transformers model folder, atomically (a staging folder renamed at the end)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig  # imported late: transformers is slow to import

    folder = Path(folder)
    c = model.config
    staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        special = {"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id}
        hf_config(model, special).save_pretrained(staging)
        weights = gpt2_state_dict(model) if c.arch == "gpt2" else llama_state_dict(model)
        save_file(weights, str(staging / "model.safetensors"), metadata={"format": "pt"})
        GenerationConfig(do_sample=sampling.temperature > 0, temperature=sampling.temperature or None,
                         top_k=sampling.top_k or None, top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens or None,
                         pad_token_id=tokenizer.eos_id, **special,
                         # padding rows of the embedding (see model.vocab_multiple) are never generated
                         suppress_tokens=list(range(tokenizer.vocab_size, c.vocab_size)) or None,
                         ).save_pretrained(staging)
        tokenizer.save(staging)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder
