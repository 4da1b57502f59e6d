"""# 8. Export to Hugging Face transformers

Every run ends by writing `hf/`: `config.json`, `model.safetensors`, `generation_config.json` and the
tokenizer files, which `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load
offline. The model is exactly GPT-2's architecture, so it loads as `GPT2LMHeadModel`: the only change is
layout (GPT-2's `Conv1D` stores linear weights transposed). A model trained without biases gets zero
biases, which compute the same thing. `python -m kernel export CKPT OUT` does the same from a checkpoint.
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


def export_hf(model: GPT, tokenizer: Tokenizer, sampling: SampleConfig, folder: str | Path) -> Path:
    """Write a transformers model folder, atomically (a staging folder renamed at the end)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, GPT2Config  # imported late: transformers is slow to import

    folder = Path(folder)
    c = model.config
    staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        special = {"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id}
        GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                   n_head=c.n_head, activation_function="gelu_new", resid_pdrop=c.dropout, embd_pdrop=c.dropout,
                   attn_pdrop=c.dropout, layer_norm_epsilon=1e-5, tie_word_embeddings=True,
                   architectures=["GPT2LMHeadModel"], **special).save_pretrained(staging)
        save_file(gpt2_state_dict(model), str(staging / "model.safetensors"), metadata={"format": "pt"})
        GenerationConfig(do_sample=sampling.temperature > 0, temperature=sampling.temperature or None,
                         top_k=sampling.top_k or None, top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens,
                         pad_token_id=tokenizer.eos_id, **special).save_pretrained(staging)
        tokenizer.save(staging)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder
