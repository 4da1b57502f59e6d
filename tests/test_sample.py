import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernel.config import SampleConfig
from kernel.env import KernelError
from kernel.cli import cli
from kernel.main import run
from kernel.sample import final_samples, sample_blocks, sample_from_run
from kernel.model import GPT, GPTConfig, KVCache
from kernel.sample import filter_logits, generate, sample_texts
from kernel.tokenization import CharTokenizer


def small_model(block_size=16) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=40, block_size=block_size, n_layer=2, n_head=2, n_embd=32)).eval()


def test_incremental_logits_equal_the_full_forward():
    model = small_model()
    idx = torch.randint(40, (2, 12))
    full = model(idx)[0]
    cache = KVCache(2)
    steps = [model(idx[:, :5], cache=cache)[0]] + [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 12


def test_generation_with_and_without_the_cache_gives_the_same_tokens():
    model = small_model(block_size=16)
    prompt = torch.randint(40, (1, 5))
    for settings in ({"temperature": 0}, {"temperature": 1.0, "top_k": 10}):  # greedy, then seeded sampling
        outputs = []
        for use_cache in (True, False):
            generator = torch.Generator().manual_seed(3)
            outputs.append(generate(model, prompt, 30, generator=generator, use_cache=use_cache, **settings))
        assert outputs[0].shape == (1, 35)  # 30 new tokens: past the 16-token context, the window slides
        assert torch.equal(outputs[0], outputs[1])


def test_each_new_token_costs_one_forward_step_over_one_token():
    model = small_model(block_size=64)
    lengths = []
    handle = model.transformer.wte.register_forward_hook(lambda module, inputs, output: lengths.append(inputs[0].shape[1]))
    generate(model, torch.randint(40, (1, 7)), 20, temperature=0)
    handle.remove()
    assert lengths == [7] + [1] * 19  # the prompt once, then one token per step (the last token needs no step)


def test_top_k_and_top_p_keep_exactly_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.6)).tolist() == [[False, False, True, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.86)).tolist() == [[False, False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.3)).tolist() == [[False, True, True, True, True]]


def test_sampling_follows_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    kept = F.softmax(filter_logits(logits, top_p=0.75), dim=-1)[0]  # nucleus {0, 1, 2}, renormalised
    generator = torch.Generator().manual_seed(0)
    draws = torch.multinomial(kept.expand(20000, -1), 1, generator=generator).flatten()
    frequencies = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(frequencies, torch.tensor([4 / 9, 3 / 9, 2 / 9, 0.0]), atol=0.015, rtol=0)


def test_generation_stops_at_the_end_of_document_token():
    model = small_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.transformer.ln_f.bias[:] = 0
        model.transformer.ln_f.weight[:] = 0
        model.lm_head.weight[7, :] = 0  # all logits equal: greedy picks token 0
    out = generate(model, torch.tensor([[3, 4]]), 50, temperature=0, eos_id=0)
    assert out.tolist() == [[3, 4, 0]]


def test_sample_texts_are_seeded_and_reproducible():
    tokenizer = CharTokenizer(sorted(set("abcdefghij klmnop\n")), end_of_text=False)  # samples of full length
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    settings = SampleConfig(prompts=["ab", ""], max_new_tokens=12, temperature=1.0, top_k=5, top_p=0.9, num_samples=2)
    first = sample_texts(model, tokenizer, settings, torch.device("cpu"), seed=11)
    again = sample_texts(model, tokenizer, settings, torch.device("cpu"), seed=11)
    assert first == again and [prompt for prompt, _ in first] == ["ab", "ab", "", ""]  # num_samples per prompt
    assert first[0][1].startswith("ab") and len(first[0][1]) == 14 and first[0][1] != first[1][1]
    assert len(first[2][1]) == 12  # an empty prompt starts a new text: the start token is not shown


def test_padding_rows_of_the_vocabulary_are_never_sampled():
    from kernel.model import padded_vocab_size
    assert padded_vocab_size(104, 64) == 128 and padded_vocab_size(128, 64) == 128 and padded_vocab_size(5, 1) == 5
    model = small_model()
    with torch.no_grad():
        model.lm_head.weight[30:] = 10 * model.lm_head.weight[30:].sign()  # make the "padding" rows attractive
    prompt = torch.randint(30, (1, 4))
    unmasked = generate(model, prompt, 20, temperature=0)
    masked = generate(model, prompt, 20, temperature=0, vocab_size=30)
    sampled = generate(model, prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(0), vocab_size=30)
    assert unmasked[0, 4:].max() >= 30  # without the mask, padding rows win
    assert masked[0, 4:].max() < 30 and sampled[0, 4:].max() < 30


# --- The command line and sample_from_run, on a real (tiny) run -----------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    from conftest import tiny_config
    out = tmp_path_factory.mktemp("run")
    run(tiny_config(train__max_steps=20, sample__prompts=["The ", "\n"], sample__top_k=20), out)
    return out


@pytest.mark.slow
def test_sample_without_flags_repeats_the_runs_own_samples_from_its_folder(trained_run, capsys):
    capsys.readouterr()
    assert cli(["sample", str(trained_run)]) == 0
    printed = capsys.readouterr()
    # the checkpoint's sample.* settings (prompts, 20 tokens, top_k 20) and train.seed: the same text
    assert printed.out == final_samples((trained_run / "samples.txt").read_text()) + "\n"
    assert printed.err == f"[sample] {trained_run / 'checkpoints' / 'ckpt_00000020.pt'} (step 20)\n"


@pytest.mark.slow
def test_sample_a_checkpoint_copied_without_its_checksum_with_flags_and_a_prompt_file(trained_run, tmp_path, capsys):
    copy = tmp_path / "ckpt_00000020.pt"
    shutil.copy(trained_run / "checkpoints" / "ckpt_00000020.pt", copy)  # as downloaded alone from Kaggle
    (tmp_path / "prompt.txt").write_text("def main():\n    return\n", encoding="utf-8")
    capsys.readouterr()
    code = cli(["sample", str(copy), "--prompt-file", str(tmp_path / "prompt.txt"), "--num-samples", "2",
                "--max-new-tokens", "7", "--temperature", "0"])
    printed = capsys.readouterr()
    assert code == 0
    warnings = [line for line in printed.err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {copy} has no checksum file ckpt_00000020.pt.sha256 (copied alone?): "
                        "loaded without verifying it"]
    prompt = "def main():\n    return"  # the file as it is, but for its final line break
    assert printed.out.count(f"prompt {prompt!r} ===") == 2 and "sample 3" not in printed.out
    greedy = [block.split("===\n", 1)[1] for block in printed.out.split("=== sample ")[1:]]
    assert greedy[0] == greedy[1] and greedy[0].startswith(prompt)  # temperature 0: the same text twice
    (tmp_path / "ckpt_00000020.pt.sha256").write_text("0" * 64)
    assert cli(["sample", str(copy)]) == 2  # a checksum that is there must still match
    assert "does not match its checksum" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "--temperature must be >= 0 (0 is greedy), got -1.0"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--max-new-tokens", "-5"], "--max-new-tokens must be >= 0, got -5"),
    (["--top-k", "-1"], "--top-k must be >= 0, got -1"),
    (["--num-samples", "0"], "--num-samples must be >= 1, got 0"),
    (["--temperature", "nan"], "--temperature must be >= 0 (0 is greedy), got nan"),
    (["--temperature", "warm"], "argument --temperature: invalid float value: 'warm'"),
    (["--prompt-file", "no-such-prompt.txt"], "--prompt-file no-such-prompt.txt: No such file or directory"),
    (["--device", "gpu"], "--device must be auto, cpu, mps, cuda or cuda:N, got 'gpu'"),
])
def test_each_bad_sampling_value_is_one_line(trained_run, capsys, flags, message):
    capsys.readouterr()
    assert cli(["sample", str(trained_run), *flags]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.count("\n") == 1 and printed.err.startswith(f"error: {message}")


@pytest.mark.slow
def test_sample_from_run_takes_the_runs_settings_and_names_bad_keywords(trained_run):
    text = sample_from_run(trained_run, "def ", max_new_tokens=5, num_samples=2)
    assert text.count("prompt 'def ' ===") == 2
    assert sample_from_run(trained_run) == final_samples((trained_run / "samples.txt").read_text())
    with pytest.raises(KernelError, match=r"^temperature must be >= 0 \(0 is greedy\), got -0.5; top_p must be in"):
        sample_from_run(trained_run, top_p=2, temperature=-0.5)
    with pytest.raises(KernelError, match="holds no checkpoint"):
        sample_from_run(trained_run / "cache")


@pytest.mark.slow
def test_a_bad_value_on_the_real_command_line_is_one_line_without_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "kernel", "sample", str(tmp_path), "--top-p", "-0.5"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr == "error: --top-p must be in (0, 1], got -0.5\n"


def test_help_lists_the_commands_and_a_mistyped_command_gets_the_closest(capsys):
    with pytest.raises(SystemExit) as exited:
        cli(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for command in ("sample", "export", "check-env"):
        assert re.search(rf"^  {command} +\S", text, re.MULTILINE), command
    assert cli(["sampel", "outputs"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown command 'sampel'; did you mean 'sample'?")
    assert cli(["--sett", "x"]) == 2
    assert capsys.readouterr().err.startswith("error: unrecognized arguments: --sett x")


@pytest.mark.slow
def test_sample_takes_a_transformers_folder_and_its_text_equals_the_checkpoints(trained_run, tmp_path, capsys):
    """`python -m kernel sample outputs/hf`: the exported folder (or any transformers folder init_from takes)
    samples the same text as the checkpoint it came from, with the generation config's settings."""
    capsys.readouterr()
    flags = ["--prompt", "The ", "--max-new-tokens", "40", "--seed", "3", "--top-k", "20"]
    assert cli(["sample", str(trained_run), *flags]) == 0
    from_checkpoint = capsys.readouterr().out
    copy = shutil.copytree(trained_run / "hf", tmp_path / "downloaded")  # a folder on its own, no run beside it
    assert cli(["sample", str(copy), *flags]) == 0
    printed = capsys.readouterr()
    assert printed.out == from_checkpoint and "(a transformers model folder)" in printed.err


# --- Samples while it learns ---------------------------------------------------------------------------

def test_a_short_sample_is_printed_and_kept_at_each_evaluation_with_its_step(tmp_path, tiny, capsys):
    run(tiny(train__max_steps=40, train__eval_interval=20, sample__eval_tokens=12,
             sample__prompts=["The ", "\n"]), tmp_path)
    printed = capsys.readouterr().out
    assert [line for line in printed.splitlines() if line.startswith("[sample]")] == [
        "[sample] step 0 (prompt 'The '):", "[sample] step 20 (prompt 'The '):", "[sample] step 40 (prompt 'The '):"]
    text = (tmp_path / "samples.txt").read_text()
    blocks = sample_blocks(text)
    assert [step for step, _ in blocks] == [0, 20, 40, None, None]  # then the final samples, one per prompt
    assert all(block.startswith(f"=== step {step} | prompt 'The ' ===\nThe ") for step, block in blocks[:3])
    assert all(len(block.splitlines()[1]) <= len("The ") + 12 for _, block in blocks[:3])  # 12 char tokens at most
    assert final_samples(text) == text[text.index("=== sample 1 |"):]
    assert final_samples(text).count("=== sample") == 2


def test_eval_tokens_0_takes_no_samples_at_evaluations(tmp_path, tiny, capsys):
    run(tiny(train__max_steps=20, sample__eval_tokens=0), tmp_path)
    assert "[sample]" not in capsys.readouterr().out
    text = (tmp_path / "samples.txt").read_text()
    assert text.startswith("=== sample 1 |") and final_samples(text) == text


def test_eval_tokens_is_a_run_setting_not_a_flag_of_the_sample_command(capsys):
    with pytest.raises(SystemExit):
        cli(["sample", "--help"])
    assert "--eval-tokens" not in capsys.readouterr().out
