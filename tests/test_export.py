import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kernel.config import SampleConfig
from kernel.data import demo_sources
from kernel.export import export_hf
from kernel.model import GPT, GPTConfig
from kernel.sample import generate
from kernel.tokenization import BPETokenizer, CharTokenizer
from kernel.checkpoint import list_checkpoints

TEXT = "".join(s.text for s in demo_sources()[:5])


def assert_transformers_matches(hf, model: GPT, idx: torch.Tensor, prompt_length: int) -> None:
    """Same logits within 1e-4 and the same greedy tokens from transformers' generate() as from ours."""
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], rtol=0, atol=1e-4)
        ours = generate(model, idx[:, :prompt_length], 20, temperature=0)
        theirs = hf.generate(idx[:, :prompt_length], max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert theirs.tolist() == ours.tolist()


def trained_like(vocab_size: int, bias: bool = True) -> GPT:
    """A model with random (not initial) weights everywhere, biases included."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32, bias=bias))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


@pytest.mark.parametrize("bias", [True, False])
def test_exported_model_loads_as_gpt2_with_the_same_logits_and_greedy_tokens(tmp_path, bias):
    tokenizer = CharTokenizer.train(TEXT)
    model = trained_like(tokenizer.vocab_size, bias)
    export_hf(model, tokenizer, SampleConfig(), tmp_path / "hf")
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert_transformers_matches(hf, model, torch.tensor([tokenizer.encode("def function(x):\n    return x")]), 8)
    hf_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert hf_tokenizer.encode(TEXT[:500], add_special_tokens=False) == tokenizer.encode(TEXT[:500])


def test_bpe_export_carries_the_end_of_document_token(tmp_path):
    tokenizer = BPETokenizer.train([TEXT], vocab_size=300)
    export_hf(trained_like(tokenizer.vocab_size), tokenizer, SampleConfig(temperature=0.7, top_k=50, max_new_tokens=0),
              tmp_path / "hf")  # max_new_tokens=0 (no samples) is valid here but not in a GenerationConfig
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert hf.config.eos_token_id == tokenizer.eos_id and hf.generation_config.top_k == 50
    hf_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert hf_tokenizer.eos_token_id == tokenizer.eos_id


@pytest.mark.slow
def test_every_run_exports_and_the_cli_exports_a_checkpoint(tmp_path, tiny):
    from kernel.main import run
    run(tiny(train__max_steps=20), tmp_path / "run")
    assert (tmp_path / "run" / "hf" / "model.safetensors").exists()
    checkpoint = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    done = subprocess.run([sys.executable, "-m", "kernel", "export", str(checkpoint), str(tmp_path / "again")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    a = (tmp_path / "run" / "hf" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "again" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("qk_norm, architecture", [(False, "LlamaForCausalLM"), (True, "Qwen3ForCausalLM")])
def test_llama_exports_with_the_same_logits_and_greedy_tokens(tmp_path, qk_norm, architecture):
    tokenizer = CharTokenizer.train(TEXT)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=64,
                          arch="llama", qk_norm=qk_norm, rope_theta=500.0))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.eval()
    export_hf(model, tokenizer, SampleConfig(), tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    assert type(hf).__name__ == architecture
    assert_transformers_matches(hf, model, torch.tensor([tokenizer.encode("for x in y:\n    print(x)")]), 6)


def test_a_padded_vocabulary_exports_with_its_padding_suppressed(tmp_path, tiny):
    from kernel.train import build_model
    tokenizer = CharTokenizer.train(TEXT)
    model = build_model(tiny(), tokenizer.vocab_size).eval()
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size > tokenizer.vocab_size
    with torch.no_grad():
        model.lm_head.weight[tokenizer.vocab_size:] *= 50  # padding rows that would win greedy decoding
    export_hf(model, tokenizer, SampleConfig(), tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    idx = torch.tensor([tokenizer.encode("import os\n")])
    with torch.no_grad():
        ours = generate(model, idx, 15, temperature=0, vocab_size=tokenizer.vocab_size)
        theirs = hf.generate(idx, max_new_tokens=15, do_sample=False, pad_token_id=0)
    assert theirs.tolist() == ours.tolist() and max(ours[0].tolist()) < tokenizer.vocab_size
