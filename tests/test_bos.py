"""Tokenizers that start every text with a beginning-of-sequence token (Llama, Mistral, Gemma: their
post-processor adds it with add_special_tokens=True): every document the run trains on starts with it, as
the model saw in pretraining, and sampling starts prompts with it; tokenizers without one are unchanged."""

import numpy as np
import pytest
from tokenizers import Tokenizer as FastBackend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from kernel.data import prepare_data
from kernel.sample import prompt_ids
from kernel.tokenization import HFTokenizer, tokenizer_from_dict

DOCUMENTS = ["The first document, about ships and the sea.", "A second one: rivers, bridges and roads.",
             "Third and last, on gardens in winter."]


def save_tokenizer(folder, adds_bos: bool) -> None:
    """A byte-level BPE with <s> / </s>; `adds_bos`: its post-processor puts <s> before every text."""
    backend = FastBackend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(DOCUMENTS * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>").save_pretrained(folder)


@pytest.fixture
def corpus(tmp_path):
    for number, text in enumerate(DOCUMENTS):
        (tmp_path / f"doc{number}.txt").write_text(text * 5, encoding="utf-8")
    return str(tmp_path / "doc*.txt")


@pytest.mark.parametrize("adds_bos", [True, False])
def test_every_training_document_starts_with_bos_when_the_tokenizer_adds_one(tmp_path, tiny, corpus, adds_bos):
    save_tokenizer(tmp_path / "tok", adds_bos)
    config = tiny(data__text_glob=corpus, tokenizer__mode="hf", tokenizer__pretrained_name=str(tmp_path / "tok"),
                  model__block_size=8)
    data = prepare_data(config, tmp_path / "cache")
    bos, eos = data.tokenizer.hf.convert_tokens_to_ids(["<s>", "</s>"])
    assert data.tokenizer.bos_id == (bos if adds_bos else None)
    stream = np.concatenate([data.train, data.val]).tolist()
    start = "<s>" if adds_bos else ""
    assert data.tokenizer.decode(stream) == "".join(f"{start}{text * 5}</s>" for text in DOCUMENTS)
    assert stream.count(bos) == (len(DOCUMENTS) if adds_bos else 0) and stream.count(eos) == len(DOCUMENTS)
    assert data.train[0] == (bos if adds_bos else data.tokenizer.encode(DOCUMENTS[0])[0])


@pytest.mark.parametrize("adds_bos", [True, False])
def test_prompts_start_with_bos_and_the_shown_text_leaves_it_out(tmp_path, adds_bos):
    save_tokenizer(tmp_path / "tok", adds_bos)
    tokenizer = HFTokenizer.load(tmp_path / "tok")
    bos, eos = tokenizer.hf.convert_tokens_to_ids(["<s>", "</s>"])
    start, shown_from = prompt_ids(tokenizer, "The first")
    assert start == tokenizer.hf.encode("The first")  # what transformers' own generate() would be given
    assert tokenizer.decode(start[shown_from:]) == "The first"
    empty_start, empty_shown = prompt_ids(tokenizer, "")
    assert empty_start == ([bos] if adds_bos else [eos]) and empty_shown == 1
    assert tokenizer_from_dict(tokenizer.to_dict()).bos_id == tokenizer.bos_id  # a checkpoint's copy agrees
