import torch
import torch.nn.functional as F

from kernel.config import SampleConfig
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
    tokenizer = CharTokenizer.train("abcdefghij klmnop\n")
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    settings = SampleConfig(prompts=["ab", ""], max_new_tokens=12, temperature=1.0, top_k=5, top_p=0.9)
    first = sample_texts(model, tokenizer, settings, torch.device("cpu"), seed=11)
    again = sample_texts(model, tokenizer, settings, torch.device("cpu"), seed=11)
    assert first == again and first[0][1].startswith("ab") and len(first[0][1]) == 14


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
