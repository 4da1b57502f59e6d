import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kernel.config import Config, SampleConfig
from kernel.inputs import demo_sources
from kernel.env import KernelError
from kernel.export import RunFacts, export_hf
from kernel.model import GPT, GPTConfig
from kernel.sample import generate
from kernel.tokenization import BPETokenizer, CharTokenizer, tokenizer_from_dict
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
    export_hf(model, tokenizer, Config(), tmp_path / "hf")
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} <= names
    assert "kernel_tokenizer.json" not in names  # this program's own state file is not part of a model folder
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert_transformers_matches(hf, model, torch.tensor([tokenizer.encode("def function(x):\n    return x")]), 8)
    hf_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert hf_tokenizer.encode(TEXT[:500], add_special_tokens=False) == tokenizer.encode(TEXT[:500])


def test_bpe_export_carries_the_end_of_document_token(tmp_path):
    tokenizer = BPETokenizer.train([TEXT], vocab_size=300)
    sampling = SampleConfig(temperature=0.7, top_k=50, max_new_tokens=0)  # no samples at the end of the run
    export_hf(trained_like(tokenizer.vocab_size), tokenizer, Config(sample=sampling), tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert hf.config.eos_token_id == tokenizer.eos_id and hf.generation_config.top_k == 50
    hf_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert hf_tokenizer.eos_token_id == tokenizer.eos_id


@pytest.mark.slow
def test_every_run_exports_and_the_cli_exports_a_checkpoint(tmp_path, tiny):
    from kernel.main import run
    run(tiny(train__max_steps=20), tmp_path / "run")
    assert (tmp_path / "run" / "hf" / "model.safetensors").exists()
    card = (tmp_path / "run" / "hf" / "README.md").read_text()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert f"| validation loss (nats per token) | {summary['val_loss']:.4f} |" in card
    assert f"| characters | {summary['data']['chars']:,} |" in card
    checkpoint = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    done = subprocess.run([sys.executable, "-m", "kernel", "export", str(checkpoint), str(tmp_path / "again")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    a = (tmp_path / "run" / "hf" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "again" / "model.safetensors").read_bytes()
    # the final checkpoint's export tells the same figures (from the run's summary.json) as the run's own
    again = (tmp_path / "again" / "README.md").read_text()
    assert again == card.replace('model="hf"', 'model="again"')  # absolute folders by their name alone
    (tmp_path / "run" / "hf" / "notes.txt").write_text("mine")
    run(tiny(train__max_steps=30), tmp_path / "run")  # resumed: the run's own export is replaced, notes kept
    assert (tmp_path / "run" / "hf" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "run" / "hf" / "model.safetensors").read_bytes() != a
    done = subprocess.run([sys.executable, "-m", "kernel", "export", str(tmp_path / "run"), "."], cwd=tmp_path / "run",
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
                          capture_output=True, text=True, timeout=120)  # a run folder; into the current folder
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"error: {tmp_path / 'run'} already holds files that an export did not write")


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
    export_hf(model, tokenizer, Config(), tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    assert type(hf).__name__ == architecture
    assert_transformers_matches(hf, model, torch.tensor([tokenizer.encode("for x in y:\n    print(x)")]), 6)


def test_a_padded_vocabulary_exports_with_its_padding_suppressed(tmp_path, tiny):
    from kernel.model import build_model
    tokenizer = CharTokenizer.train(TEXT)
    model = build_model(tiny(), tokenizer.vocab_size).eval()
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size > tokenizer.vocab_size
    with torch.no_grad():
        model.lm_head.weight[tokenizer.vocab_size:] *= 50  # padding rows that would win greedy decoding
    export_hf(model, tokenizer, Config(), tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    idx = torch.tensor([tokenizer.encode("import os\n")])
    with torch.no_grad():
        ours = generate(model, idx, 15, temperature=0, vocab_size=tokenizer.vocab_size)
        theirs = hf.generate(idx, max_new_tokens=15, do_sample=False, pad_token_id=0)
    assert theirs.tolist() == ours.tolist() and max(ours[0].tolist()) < tokenizer.vocab_size


# --- What transformers users meet: generation within the context, padding, end-of-text, the model card ---

@pytest.fixture
def transformers_warnings(caplog):
    """Every warning transformers logs (its logger does not propagate by default) or raises, from here on."""
    import logging
    import warnings
    import transformers
    transformers.logging.enable_propagation()
    transformers.utils.logging.warning_once.cache_clear()  # a warning already given once would stay silent
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        yield lambda: [r.getMessage() for r in caplog.records] + [str(w.message) for w in raised]
    transformers.logging.disable_propagation()


def exported_preset(tmp_path, preset: str, mode: str, arch: str | None = None):
    """A preset's model (random weights) and a tokenizer of `mode` learnt from the demo text, exported."""
    from kernel.config import load_config
    from kernel.model import build_model
    config = load_config(preset, {"tokenizer.mode": mode, **({"model.arch": arch} if arch else {})})
    tokenizer = CharTokenizer.train(TEXT) if mode == "char" else BPETokenizer.train([TEXT], vocab_size=400)
    torch.manual_seed(0)
    model = build_model(config, tokenizer.vocab_size).eval()
    export_hf(model, tokenizer, config, tmp_path / "hf")
    return config, tokenizer


@pytest.mark.parametrize("preset, mode, arch", [
    ("llm_cpu.yaml", "char", None), ("llm_cpu.yaml", "bpe_simple", None), ("llm_kaggle_t4.yaml", "char", None),
    ("llm_kaggle_t4.yaml", "bpe_simple", None), ("llm_cpu.yaml", "char", "gpt2"),
    ("llm_cpu.yaml", "bpe_simple", "gpt2")])
@pytest.mark.slow
def test_generate_and_pipeline_with_the_exported_defaults_stay_within_the_context(tmp_path, transformers_warnings,
                                                                                   preset, mode, arch):
    from transformers import pipeline
    config, tokenizer = exported_preset(tmp_path, preset, mode, arch)
    context = config.model.block_size
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert hf_tokenizer.model_max_length == context and hf_tokenizer.padding_side == "left"
    assert hf_tokenizer.eos_token == "<|endoftext|>" and hf_tokenizer.eos_token_id == tokenizer.eos_id
    assert hf.config.pad_token_id == hf.generation_config.pad_token_id == hf_tokenizer.pad_token_id == tokenizer.eos_id
    assert hf.generation_config.max_length == context and hf.generation_config.max_new_tokens is None
    assert hf.generation_config.do_sample and hf.generation_config.temperature == config.sample.temperature
    batch = hf_tokenizer(["The ", "def function(value):\n    return"], padding=True, return_tensors="pt")
    assert batch.input_ids[0, 0] == tokenizer.eos_id and batch.attention_mask[0, 0] == 0  # padded on the left
    torch.manual_seed(0)
    with torch.no_grad():
        out = hf.generate(**batch, do_sample=True)
    assert batch.input_ids.shape[1] < out.shape[1] <= context
    generator = pipeline("text-generation", model=str(tmp_path / "hf"))
    assert generator("The ")[0]["generated_text"].startswith("The ")
    assert len(generator("The ", return_tensors=True)[0]["generated_token_ids"]) <= context
    assert transformers_warnings() == []
    with torch.no_grad():  # no prompt: the end-of-text token starts a new text
        started = hf.generate(do_sample=True, max_length=8)
    assert started[0, 0] == tokenizer.eos_id and 1 < started.shape[1] <= 8


def test_the_warning_capture_sees_the_context_length_reminder(tmp_path, transformers_warnings):
    """The check above would pass vacuously if it saw nothing: generating past the context does warn."""
    config, tokenizer = exported_preset(tmp_path, "llm_cpu.yaml", "char")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    with torch.no_grad():
        hf.generate(torch.tensor([tokenizer.encode("The ")]), max_new_tokens=config.model.block_size, do_sample=False)
    assert any("maximum length" in message for message in transformers_warnings())


def test_char_mode_ends_documents_and_generation_with_its_end_of_text_token(tmp_path):
    tokenizer = CharTokenizer.train(TEXT)
    assert tokenizer.eos_id == tokenizer.vocab_size - 1 and tokenizer.decode([tokenizer.eos_id]) == "<|endoftext|>"
    model = trained_like(tokenizer.vocab_size)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_id] += 5 * model.transformer.ln_f(model.transformer.wte.weight).mean(0)
    export_hf(model, tokenizer, Config(), tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([tokenizer.encode("import os\n")]), do_sample=False, attention_mask=None)
    assert out[0, -1] == tokenizer.eos_id and out.shape[1] < 32  # stopped at the end-of-text token
    text = "a<|endoftext|>b"  # written out, it is the token, in our tokenizer and in the exported one
    hf_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert tokenizer.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False) == [
        *tokenizer.encode("a"), tokenizer.eos_id, *tokenizer.encode("b")]
    old = tokenizer_from_dict({"mode": "char", "chars": tokenizer.chars[1:]})  # saved before char had one
    assert old.eos_id is None and old.vocab_size == tokenizer.vocab_size - 1  # its checkpoints still fit


def test_the_model_card_holds_metadata_figures_data_and_config(tmp_path):
    from huggingface_hub import ModelCard
    tokenizer = CharTokenizer.train(TEXT)
    run = RunFacts(name="my-run", steps=2000, tokens=2_048_000, evaluation={"val_loss": 1.2834, "val_ppl": 3.609,
                   "val_bpb": 1.8452}, data={"source": "demo corpus", "documents": 79, "chars": 464_970,
                   "train_tokens": 418_543, "val_tokens": 46_506}, trained_on="cpu, float32, 1 process(es), 63 s")
    export_hf(trained_like(tokenizer.vocab_size), tokenizer, Config(), tmp_path / "hf", run)
    card = ModelCard.load(tmp_path / "hf" / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "gpt2" in card.data.tags and card.data.model_name == "my-run"
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {
        "loss": 1.2834, "perplexity": 3.61, "bits_per_byte": 1.845}
    for shown in ("`GPT2LMHeadModel`", "| validation loss (nats per token) | 1.2834 |", "| optimizer steps | 2,000 |",
                  "| training tokens seen | 2,048,000 |", "| documents | 79 |", "| characters | 464,970 |",
                  "| context | 32 tokens |", "cpu, float32", "pipeline(\"text-generation\"", "lr: 0.001"):
        assert shown in card.text, shown


def test_export_never_deletes_what_it_did_not_write(tmp_path):
    tokenizer = CharTokenizer.train(TEXT)
    model = trained_like(tokenizer.vocab_size)
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("my notes")
    with pytest.raises(KernelError, match=r"already holds files that an export did not write \(notes.txt\).*--force"):
        export_hf(model, tokenizer, Config(), target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"] and not list(tmp_path.glob(".mine.partial-*"))
    export_hf(model, tokenizer, Config(), target, force=True)  # replaces only the export's own files
    assert (target / "notes.txt").read_text() == "my notes" and (target / "model.safetensors").is_file()
    (target / "notes.txt").unlink()
    first = (target / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    export_hf(model, tokenizer, Config(), target)  # an earlier export alone: replaced without --force
    assert (target / "model.safetensors").read_bytes() != first
    (tmp_path / "readme").mkdir()
    (tmp_path / "readme" / "README.md").write_text("# My project\n")
    with pytest.raises(KernelError, match=r"\(README.md\)"):  # a README.md that is not our model card is theirs
        export_hf(model, tokenizer, Config(), tmp_path / "readme")
    (tmp_path / "file").write_text("x")
    with pytest.raises(KernelError, match="is a file"):
        export_hf(model, tokenizer, Config(), tmp_path / "file")
