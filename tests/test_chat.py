"""Conversations (issue 23): records of every style, the model's own chat template or the built-in one, the
loss on the answers only, and a chat model that transformers asks with apply_chat_template."""

import collections
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import AddedToken
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from kernel.chat import (IGNORED, ChatEncoder, ConversationSampler, conversation, end_of_turn_id, examples,
                         is_conversation)
from kernel.config import load_config
from kernel.data import prepare_data
from kernel.env import KernelError
from kernel.inputs import list_sources
from kernel.main import resolve_config, run
from kernel.tokenization import BUILT_IN_CHAT_TEMPLATE, CHAT_TOKENS, BPETokenizer, CharTokenizer, HFTokenizer
from tests.conftest import TINY
from tests.test_init_from import TEXT, make_source

# A template of the model's own, not the built-in one: a default system turn when none is given.
OWN_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
RECORDS = {  # one record of each style, and the conversation it holds
    "messages": ({"messages": [{"role": "system", "content": "Answer in French."},
                               {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Bonjour"},
                               {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "De rien"}]},
                 [("system", "Answer in French."), ("user", "Hello there"), ("assistant", "Bonjour"),
                  ("user", "Thanks"), ("assistant", "De rien")]),
    "sharegpt": ({"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}]},
                 [("user", "What is 2+2?"), ("assistant", "4")]),
    "alpaca": ({"instruction": "Translate to German", "input": "the house", "output": "das Haus"},
               [("user", "Translate to German\n\nthe house"), ("assistant", "das Haus")]),
    "completion": ({"prompt": "The sky is", "completion": " blue."}, [("user", "The sky is"), ("assistant", " blue.")]),
    "qa": ({"question": "Capital of Italy?", "answer": "Rome"}, [("user", "Capital of Italy?"), ("assistant", "Rome")]),
}
ANSWER = "It is done."


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A small llama in transformers' format whose tokenizer has its own chat template and turn markers."""
    folder = tmp_path_factory.mktemp("chat-model") / "llama"
    make_source("llama", folder)
    backend = BPETokenizer.train([TEXT], vocab_size=300).backend
    backend.add_special_tokens([AddedToken(token, special=True) for token in CHAT_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    tokenizer.chat_template = OWN_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def conversations_file(path: Path, count: int = 240, seed: int = 0) -> Path:
    """Questions of random words, always the same answer: learnable only where the answers are trained on."""
    rng = random.Random(seed)
    words = TEXT.split()[:400]
    with path.open("w", encoding="utf-8") as f:
        for _ in range(count):
            question = " ".join(rng.choice(words) for _ in range(rng.randint(4, 10)))
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": ANSWER}]}) + "\n")
    return path


# --- Records ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("style", list(RECORDS))
def test_each_record_style_is_a_conversation_and_encodes_as_apply_chat_template_does(style, model_folder):
    record, expected = RECORDS[style]
    assert is_conversation(record)
    messages = conversation(record)
    assert [(m["role"], m["content"]) for m in messages] == expected
    encoder = ChatEncoder(HFTokenizer.load(model_folder).with_chat(), 1000, "assistant")
    ids, mask, truncated = encoder.encode(messages)
    source = AutoTokenizer.from_pretrained(str(model_folder))
    assert ids.tolist() == source.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert not truncated and encoder.turn_end == "<|im_end|>"
    # what is trained on: each answer and the marker that ends its turn, nothing of the questions
    answers = "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
    assert source.decode(ids[mask].tolist()) == answers


def test_malformed_records_are_skipped_and_counted_by_reason(tmp_path):
    lines = [json.dumps(RECORDS["messages"][0]), json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
             json.dumps({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
             json.dumps({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]}),
             json.dumps({"conversations": "not a list"}), "{not json", json.dumps({"title": "a text record"})]
    (tmp_path / "chats.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _, sources, _ = list_sources(str(tmp_path / "chats.jsonl"))
    skipped = collections.Counter()
    found = list(examples(sources, sources, skipped))
    assert len(found) == 1
    assert skipped == {"no assistant turn": 1, "unknown role 'wizard'": 1, "a turn without text": 1,
                       "turns not a list of objects": 1, "invalid JSON line": 1, "not a conversation": 1}


def test_a_file_without_conversations_names_its_fields_when_chat_is_required(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text(json.dumps({"title": "A", "body": "some text"}) + "\n", encoding="utf-8")
    config = load_config("llm_cpu.yaml", {**TINY, "data.text_glob": str(path), "data.format": "chat"})
    with pytest.raises(KernelError, match=r"notes.jsonl holds no conversations \(its fields: title, body\)"):
        prepare_data(config, tmp_path / "cache")


def test_a_folder_mixing_text_and_conversations_trains_on_both(tmp_path):
    conversations_file(tmp_path / "chats.jsonl", count=40)
    (tmp_path / "story.txt").write_text(TEXT[:3000], encoding="utf-8")
    config = load_config("llm_cpu.yaml", {**TINY, "data.text_glob": str(tmp_path / "*"), "model.block_size": 128,
                                          "tokenizer.mode": "bpe_simple", "tokenizer.vocab_size": 300})
    data = prepare_data(config, tmp_path / "cache")
    assert data.chat and data.stats["conversations"] == 40 and data.stats["documents"] == 1
    text_rows = 0
    for rows in data.rows.values():
        lengths = np.diff(rows.offsets)
        assert lengths.max() <= config.model.block_size + 1
        text_rows += sum(bool(rows.mask[start:stop].all()) for start, stop in zip(rows.offsets, rows.offsets[1:]))
    assert text_rows >= 3000 // 4 // 129  # the story, cut into rows, every token trained on


def test_rows_are_padded_and_only_trained_tokens_are_targets():
    ids = np.array([5, 6, 7, 8, 9, 1, 2, 3], dtype=np.int64)
    mask = np.array([0, 0, 0, 1, 1, 0, 1, 1], dtype=bool)
    sampler = ConversationSampler(ids, mask, np.array([0, 5, 8]), batch_size=2, seed=0, pad_id=0)
    x, y = sampler.windows(torch.tensor([0, 1]))
    assert x.tolist() == [[5, 6, 7, 8], [1, 2, 0, 0]]
    assert y.tolist() == [[IGNORED, IGNORED, 8, 9], [2, 3, IGNORED, IGNORED]]


def test_the_built_in_template_round_trips_through_a_saved_char_or_bpe_tokenizer(tmp_path):
    messages = [{"role": "user", "content": "to be"}, {"role": "assistant", "content": "or not"}]
    for tokenizer in (CharTokenizer.train(TEXT).with_chat(), BPETokenizer.train([TEXT], vocab_size=300).with_chat()):
        folder = tmp_path / tokenizer.mode
        tokenizer.save(folder)
        saved = AutoTokenizer.from_pretrained(str(folder))
        ids, _, _ = ChatEncoder(tokenizer, 1000, "assistant").encode(messages)
        assert saved.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"] == ids.tolist()
        assert tokenizer.chat_template == BUILT_IN_CHAT_TEMPLATE and saved.chat_template == BUILT_IN_CHAT_TEMPLATE
        assert tokenizer.decode(ids.tolist()).startswith("<|im_start|>user\nto be<|im_end|>")
        assert end_of_turn_id(tokenizer) == tokenizer.encode("<|im_end|>")[0]


# --- Training ------------------------------------------------------------------------------------------------

def chat_run(folder: Path, data: Path, out: Path, **changes) -> dict:
    settings = {k: v for k, v in TINY.items() if not k.startswith("model.")}
    settings.update({"model.init_from": str(folder), "model.block_size": 48, "data.text_glob": str(data),
                     "train.max_steps": 120, "train.lr": 3e-3, "train.warmup_steps": 10, "train.eval_interval": 60,
                     "sample.max_new_tokens": 12})
    settings.update({key.replace("__", "."): value for key, value in changes.items()})
    return run(resolve_config("configs/llm_cpu.yaml", settings), out)


@pytest.mark.slow
def test_a_chat_model_learns_the_answer_where_the_mask_says_and_transformers_asks_it(tmp_path, model_folder):
    data = conversations_file(tmp_path / "chats.jsonl")
    answers = chat_run(model_folder, data, tmp_path / "answers")
    everything = chat_run(model_folder, data, tmp_path / "all", train__loss_on="all")
    assert answers["val_loss"] < 0.1 and answers["data"]["loss_on"] == "assistant"
    assert everything["val_loss"] > 1.0  # the random questions cannot be learnt: the mask decided what was
    samples = (tmp_path / "answers" / "samples.txt").read_text(encoding="utf-8")
    assert f"===\n{ANSWER}\n" in samples  # samples at evaluations and at the end answer validation questions
    hf = tmp_path / "answers" / "hf"
    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    model = AutoModelForCausalLM.from_pretrained(str(hf)).eval()
    question = [{"role": "user", "content": "Where is the harbour?"}]
    ids = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == ANSWER  # stopped at the turn's end
    from transformers import pipeline
    chat = pipeline("text-generation", model=str(hf), tokenizer=str(hf))
    reply = chat(question, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert reply[-1] == {"role": "assistant", "content": ANSWER}


@pytest.mark.slow
def test_a_from_scratch_chat_run_exports_its_template_and_answers_on_the_command_line(tmp_path, capsys):
    from kernel.cli import cli

    data = conversations_file(tmp_path / "chats.jsonl")
    config = load_config("llm_cpu.yaml", {**TINY, "data.text_glob": str(data), "tokenizer.mode": "bpe_simple",
                                          "tokenizer.vocab_size": 300, "model.block_size": 48, "train.max_steps": 80,
                                          "train.lr": 3e-3})
    summary = run(config, tmp_path / "run")
    assert summary["data"]["chat_template"] == "built-in" and summary["val_loss"] < 0.2
    # tokens are the positions trained: rows grouped by length are shorter than the context
    assert 0 < summary["tokens"] < summary["steps"] * 8 * 48 and summary["mfu"] > 0
    card = (tmp_path / "run" / "hf" / "README.md").read_text(encoding="utf-8")
    assert "| trained on | the assistant's answers only |" in card
    assert f"| conversations | {summary['data']['conversations']} |" in card and summary["data"]["conversations"] > 100
    assert 'print(generator(chat)[0]["generated_text"][-1]["content"])' in card
    saved = AutoTokenizer.from_pretrained(str(tmp_path / "run" / "hf"))
    messages = conversation(json.loads(data.read_text(encoding="utf-8").splitlines()[0]))
    from kernel.checkpoint import given_checkpoint
    from kernel.sample import load_trained
    _, tokenizer, _ = load_trained(*given_checkpoint(tmp_path / "run"))
    ids, _, _ = ChatEncoder(tokenizer, 1000, "assistant").encode(messages)
    assert saved.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"] == ids.tolist()
    capsys.readouterr()
    assert cli(["sample", str(tmp_path / "run"), "--chat", "a question", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith(f"=== sample 1 | prompt 'a question' ===\n{ANSWER}\n")
    assert cli(["sample", str(tmp_path / "run" / "hf"), "--chat", "a question", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith(f"=== sample 1 | prompt 'a question' ===\n{ANSWER}\n")
    run(load_config("llm_cpu.yaml", {**TINY, "train.max_steps": 2}), tmp_path / "text-run")  # no conversations
    capsys.readouterr()
    assert cli(["sample", str(tmp_path / "text-run"), "--chat", "a question"]) == 2
    assert "this model was not trained on conversations" in capsys.readouterr().err


def test_a_model_without_a_template_or_spare_rows_gets_the_markers_as_new_rows(tmp_path):
    """GPT-2's case: no chat template and as many embedding rows as tokens. The built-in template's two markers
    get two new rows (rounded up to 64), starting at the mean row; the others are the model's own."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from safetensors.torch import load_file

    tokenizer = BPETokenizer.train([TEXT], vocab_size=300)
    folder = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, eos_token="<|endoftext|>").save_pretrained(folder)
    data = conversations_file(tmp_path / "chats.jsonl", count=30)
    summary = chat_run(folder, data, tmp_path / "run", train__max_steps=0, model__block_size=64)
    assert summary["data"]["chat_template"] == "built-in" and summary["data"]["vocab_size"] == 302
    source = load_file(str(folder / "model.safetensors"))["transformer.wte.weight"]
    exported = load_file(str(tmp_path / "run" / "hf" / "model.safetensors"))["transformer.wte.weight"]
    assert exported.shape == (320, 32) and torch.equal(exported[:300], source)
    assert torch.allclose(exported[300:], source.mean(0).expand(20, -1))
    saved = AutoTokenizer.from_pretrained(str(tmp_path / "run" / "hf"))
    assert saved.convert_tokens_to_ids(list(CHAT_TOKENS)) == [300, 301]


def test_what_a_template_puts_between_the_header_and_the_answer_is_trained_on(tmp_path):
    """Qwen3's template writes an empty `<think>` block before the last answer: the model must write it itself
    when asked (the generation prompt ends at the header), so it is part of what is trained on."""
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
                "{% if m['role'] == 'assistant' and loop.last %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
                "{{ m['content'] + '<|im_end|>\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    backend = BPETokenizer.train([TEXT], vocab_size=300).backend
    backend.add_special_tokens([AddedToken(token, special=True) for token in CHAT_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    tokenizer.chat_template = template
    tokenizer.save_pretrained(tmp_path / "tok")
    encoder = ChatEncoder(HFTokenizer.load(tmp_path / "tok").with_chat(), 1000, "assistant")
    messages = conversation(RECORDS["messages"][0])
    ids, mask, _ = encoder.encode(messages)
    assert encoder.header == "<|im_start|>assistant\n"
    assert tokenizer.decode(ids[mask].tolist()) == "Bonjour<|im_end|><think>\n\n</think>\n\nDe rien<|im_end|>"


def test_batches_are_grouped_by_length_and_a_restored_sampler_draws_the_same_ones():
    from kernel.chat import GROUPED_BATCHES
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=1000)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = np.zeros(offsets[-1], dtype=np.int64)
    sampler = ConversationSampler(ids, np.ones_like(ids, dtype=bool), offsets, batch_size=8, seed=3, pad_id=0)
    batches = [sampler.draw(8) for _ in range(GROUPED_BATCHES)]
    padding = lambda rows: 1 - lengths[rows].sum() / (len(rows) * lengths[rows].max())
    assert np.mean([padding(b.numpy()) for b in batches]) < 0.05  # random batches of these: ~45% padding
    assert len({tuple(b.tolist()) for b in batches}) == GROUPED_BATCHES and all(len(b) == 8 for b in batches)
    sampler.draw(8), sampler.draw(8)  # into the next group
    state = sampler.state_dict()
    ahead = [sampler.draw(8).tolist() for _ in range(GROUPED_BATCHES)]
    restored = ConversationSampler(ids, np.ones_like(ids, dtype=bool), offsets, batch_size=8, seed=99, pad_id=0)
    restored.load_state_dict(state)
    assert [restored.draw(8).tolist() for _ in range(GROUPED_BATCHES)] == ahead


@pytest.mark.slow
def test_a_chat_run_stopped_and_resumed_trains_exactly_as_one_that_ran_straight(tmp_path, monkeypatch):
    import kernel.train as train_module
    from tests.test_hardening import signal_myself_then

    data = conversations_file(tmp_path / "chats.jsonl", count=120)
    config = load_config("llm_cpu.yaml", {**TINY, "data.text_glob": str(data), "tokenizer.mode": "bpe_simple",
                                          "tokenizer.vocab_size": 300, "model.block_size": 64, "train.max_steps": 30,
                                          "train.eval_interval": 15})
    straight = run(config, tmp_path / "straight")
    with monkeypatch.context() as patch:  # SIGTERM during step 12: the run stops after it, with a checkpoint
        patch.setattr(train_module, "train_step", signal_myself_then(train_module.train_step, at_call=12))
        assert run(config, tmp_path / "resumed")["steps"] == 12
    resumed = run(config, tmp_path / "resumed")
    assert resumed["resumed_from"] and resumed["val_loss"] == straight["val_loss"]
    losses = lambda folder: [r["train_loss"] for r in map(json.loads, (folder / "metrics.jsonl").open())
                             if "train_loss" in r]
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
