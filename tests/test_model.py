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


def assert_causal(model: GPT, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Changing the token at `position` changes no earlier logits and some later ones; returns the logits."""
    idx = torch.randint(65, (2, 16))
    changed = idx.clone()
    changed[:, position] = (idx[:, position] + 1) % 65
    before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :position], after[:, :position], rtol=0, atol=0)
    assert not torch.allclose(before[:, position:], after[:, position:])
    return idx, before


def test_shapes_and_loss():
    model = small_model()
    idx = torch.randint(65, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 65) and loss.shape == ()
    assert model(idx)[1] is None


def test_changing_a_future_token_never_changes_earlier_logits():
    model = small_model().eval()
    assert_causal(model, 10)


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
    with pytest.raises(ValueError, match="longer than the model.s 16 positions"):
        small_model()(torch.zeros(1, 17, dtype=torch.long))


def test_rotary_embedding_equals_the_complex_number_formula():
    from kernel.model import apply_rotary, rotary_tables
    config = GPTConfig(vocab_size=10, n_head=2, n_embd=16, arch="llama", rope_theta=100.0)
    x = torch.randn(1, 2, 5, 8)
    positions = torch.arange(3, 8)
    rotated = apply_rotary(x, *rotary_tables(config, positions))
    # Llama's layout: dimension i pairs with i + d/2; the pair is the complex number x_i + j x_{i+d/2}.
    pairs = torch.complex(x[..., :4].double(), x[..., 4:].double())
    frequencies = 100.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    turned = pairs * torch.exp(1j * positions.double()[:, None] * frequencies[None, :])
    expected = torch.cat((turned.real, turned.imag), dim=-1).float()
    torch.testing.assert_close(rotated, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_llama_is_causal_biasless_and_cache_consistent(qk_norm):
    from kernel.model import KVCache
    model = small_model(arch="llama", qk_norm=qk_norm).eval()
    assert "transformer.wpe.weight" not in model.state_dict()
    assert not [n for n, p in model.named_parameters() if n.endswith("bias")]
    assert any("q_norm" in n for n, _ in model.named_parameters()) == qk_norm
    idx, before = assert_causal(model, 9)
    cache = KVCache(2)
    steps = [model(idx[:, :4], cache=cache)[0]] + [model(idx[:, t : t + 1], cache=cache)[0] for t in range(4, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), before, rtol=1e-5, atol=1e-5)


def test_grouped_query_attention_with_its_own_head_width_and_untied_head_is_causal_and_cache_consistent():
    """What pretrained models have (model.init_from): 4 query heads sharing 2 key/value heads, heads 12 wide in
    a 32-wide stream, an MLP of 40, an output head of its own. The cache holds only the 2 key/value heads."""
    from kernel.model import KVCache
    model = small_model(arch="llama", n_kv_head=2, head_dim=12, mlp_hidden=40, tie_embeddings=False,
                        qk_norm=True).eval()
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.transformer.h[0].attn.c_attn.weight.shape == (4 * 12 + 2 * 2 * 12, 32)
    assert model.num_params() == sum(p.numel() for p in model.state_dict().values())  # the head counted too
    idx, before = assert_causal(model, 9)
    cache = KVCache(2)
    steps = [model(idx[:, :4], cache=cache)[0]] + [model(idx[:, t : t + 1], cache=cache)[0] for t in range(4, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), before, rtol=1e-5, atol=1e-5)
    assert cache.keys[0].shape == (2, 2, 16, 12)
    # each key/value head serves two consecutive query heads, as transformers' repeat_kv does
    attn, x = model.transformer.h[0].attn, torch.randn(1, 16, 32)
    q, k, v = attn.c_attn(x).split([48, 24, 24], dim=2)
    q, k, v = attn.q_norm(q.view(1, 16, 4, 12)), attn.k_norm(k.view(1, 16, 2, 12)), v.view(1, 16, 2, 12)
    k, v = k[:, :, [0, 0, 1, 1]], v[:, :, [0, 0, 1, 1]]
    y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
    torch.testing.assert_close(attn(x), attn.c_proj(y.transpose(1, 2).reshape(1, 16, 48)), rtol=1e-5, atol=1e-5)


def test_qk_norm_changes_the_computation_and_rope_makes_position_matter():
    a, b = small_model(arch="llama"), small_model(arch="llama", qk_norm=True)
    idx = torch.randint(65, (1, 8))
    assert not torch.allclose(a(idx)[0], b(idx)[0])
    # Without positions, attention would not see the order of earlier tokens: swapping two of them would
    # leave the last position's output unchanged. RoPE (llama has no position table) makes order matter.
    ordered, swapped = torch.tensor([[3, 9, 4, 7]]), torch.tensor([[9, 3, 4, 7]])
    assert not torch.allclose(a(ordered)[0][0, -1], a(swapped)[0][0, -1])


def test_swiglu_keeps_the_parameter_count_of_a_gelu_mlp():
    gpt2, llama = small_model(n_embd=96), small_model(n_embd=96, arch="llama")
    count = lambda m: sum(p.numel() for n, p in m.named_parameters() if ".mlp." in n and "weight" in n)
    assert abs(count(llama) - count(gpt2)) / count(gpt2) < 0.05


def test_flops_per_token_of_gpt2_124m():
    config = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    model = GPT(config)
    assert model.num_params() == 124_439_808  # GPT-2 small, the tied head counted once
    weights = 124_439_808 - 1024 * 768        # without the position table
    assert model.flops_per_token() == 6 * weights + 12 * 12 * 768 * 1024 == 855_166_464


def test_mfu_uses_the_peak_table_for_known_gpus(monkeypatch):
    from kernel.env import peak_flops
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert peak_flops(torch.device("cuda"), torch.float16) == 65e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda"), torch.bfloat16) == 989e12
    for name, peak in (("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
                       ("NVIDIA L4", 121e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-PCIE-40GB", 312e12)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        assert peak_flops(torch.device("cuda"), torch.bfloat16) == peak, name
    assert peak_flops(torch.device("cuda"), torch.float32) == 19.5e12  # the A100's plain fp32
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    assert peak_flops(torch.device("cuda"), torch.bfloat16) is None
    assert peak_flops(torch.device("cpu"), torch.float32) > 1e9  # measured
