import math

import pytest
import torch
import torch.nn.functional as F

from kernel.model import GPT, GPTConfig


def small_model(**changes) -> GPT:
    torch.manual_seed(0)
    settings = dict(vocab_size=65, block_size=16, n_layer=2, n_head=4, n_embd=32)
    settings.update(changes)
    return GPT(GPTConfig(**settings))


def test_shapes_and_loss():
    model = small_model()
    idx = torch.randint(65, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 65) and loss.shape == ()
    assert model(idx)[1] is None


def test_changing_a_future_token_never_changes_earlier_logits():
    model = small_model().eval()
    idx = torch.randint(65, (2, 16))
    changed = idx.clone()
    changed[:, 10] = (idx[:, 10] + 1) % 65
    before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :10], after[:, :10], rtol=0, atol=0)
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_attention_equals_an_explicitly_masked_softmax():
    model = small_model().eval()
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 16, 32)
    B, T, C = x.shape
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, 4, 8).transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(8)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    reference = attn.c_proj((F.softmax(scores, -1) @ v).transpose(1, 2).reshape(B, T, C))
    torch.testing.assert_close(attn(x), reference, rtol=1e-5, atol=1e-5)


def test_loss_at_init_is_close_to_uniform():
    model = small_model(vocab_size=100)
    idx, targets = torch.randint(100, (8, 16)), torch.randint(100, (8, 16))
    assert abs(model(idx, targets)[1].item() - math.log(100)) < 0.05


def test_head_is_tied_to_the_embedding_and_counted_once():
    model = small_model()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.num_params() < sum(p.numel() for p in model.state_dict().values())


def test_residual_projections_get_the_scaled_init():
    model = small_model(n_layer=8, n_embd=128)
    assert model.transformer.h[0].mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    idx = torch.randint(65, (2, 16))
    plain, checkpointed = small_model(), small_model(gradient_checkpointing=True)
    for model in (plain, checkpointed):
        model(idx, idx)[1].backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_sequences_longer_than_the_block_are_refused():
    with pytest.raises(ValueError, match="longer than block_size"):
        small_model()(torch.zeros(1, 17, dtype=torch.long))
