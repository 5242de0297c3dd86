"""Attention inside packed rows: each example attends only to itself, and grouped-query
models (fewer key/value heads than query heads, as SmolLM2, Llama 3 and Qwen) get the
same answers and gradients as with their key/value heads repeated."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from training.attention import packed_cpu_attention_serves, segmented_sdpa


def test_grouped_query_attention_in_packed_rows_equals_each_example_with_repeated_heads():
    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, width, dim = 6, 2, 20, 8
    query = torch.randn(2, heads, width, dim, generator=generator, requires_grad=True)
    key = torch.randn(2, kv_heads, width, dim, generator=generator, requires_grad=True)
    value = torch.randn(2, kv_heads, width, dim, generator=generator, requires_grad=True)
    spans = [[(0, 7), (7, 20)], [(0, 12)]]  # the second row ends in padding
    module = SimpleNamespace(training=False, num_key_value_groups=heads // kv_heads)

    packed, _ = segmented_sdpa(module, query, key, value, None, spans=spans)
    repeated_key = key.repeat_interleave(heads // kv_heads, dim=1)
    repeated_value = value.repeat_interleave(heads // kv_heads, dim=1)
    for row, row_spans in enumerate(spans):
        for start, end in row_spans:
            alone = F.scaled_dot_product_attention(
                query[row : row + 1, :, start:end],
                repeated_key[row : row + 1, :, start:end],
                repeated_value[row : row + 1, :, start:end],
                is_causal=True,
            )
            assert torch.allclose(
                packed[row : row + 1, start:end], alone.transpose(1, 2), atol=1e-6
            )

    used = torch.zeros(2, width, 1, 1)  # the padding is never scored
    used[0], used[1, :12] = 1, 1
    (packed * used).sum().backward()
    grads = [t.grad.clone() for t in (query, key, value)]
    for t in (query, key, value):
        t.grad = None
    expected = torch.zeros_like(packed)
    for row, row_spans in enumerate(spans):
        for start, end in row_spans:
            expected[row, start:end] = F.scaled_dot_product_attention(
                query[row : row + 1, :, start:end],
                repeated_key[row : row + 1, :, start:end],
                repeated_value[row : row + 1, :, start:end],
                is_causal=True,
            )[0].transpose(0, 1)
    (expected * used).sum().backward()
    for got, want in zip(grads, (query.grad, key.grad, value.grad), strict=True):
        assert torch.allclose(got, want, atol=1e-5)


def test_bf16_attention_on_a_cpu_differentiates_in_float32():
    """The trainer's bf16 attention on a CPU (PackedCpuAttention): the answers of bf16 SDPA,
    gradients at least as close to float32's as bf16 SDPA's own, for grouped heads."""
    generator = torch.Generator().manual_seed(1)
    heads, kv_heads, width, dim = 6, 2, 48, 16
    shapes = ((1, heads, width, dim), (1, kv_heads, width, dim), (1, kv_heads, width, dim))
    exact = [torch.randn(s, generator=generator, requires_grad=True) for s in shapes]
    half = [t.detach().bfloat16().requires_grad_() for t in exact]
    spans = [[(0, 20), (20, 48)]]
    module = SimpleNamespace(training=True, num_key_value_groups=heads // kv_heads)
    upstream = torch.randn(1, width, heads, dim, generator=generator)

    assert packed_cpu_attention_serves(half[0], 0.0)
    packed, _ = segmented_sdpa(module, *half, None, spans=spans)
    (packed.float() * upstream).sum().backward()

    def sdpa_per_example(query, key, value):
        return torch.cat(
            [
                F.scaled_dot_product_attention(
                    query[:, :, a:b],
                    key[:, :, a:b],
                    value[:, :, a:b],
                    is_causal=True,
                    enable_gqa=True,
                )
                for a, b in spans[0]
            ],
            dim=2,
        ).transpose(1, 2)

    (sdpa_per_example(*exact) * upstream).sum().backward()
    plain = [t.detach().bfloat16().requires_grad_() for t in exact]
    plain_out = sdpa_per_example(*plain)
    (plain_out.float() * upstream).sum().backward()

    assert torch.equal(packed, plain_out)
    for ours, bf16_sdpa, reference in zip(half, plain, exact, strict=True):
        ours_error = (ours.grad.float() - reference.grad).norm() / reference.grad.norm()
        sdpa_error = (bf16_sdpa.grad.float() - reference.grad).norm() / reference.grad.norm()
        assert ours_error < 0.01
        assert ours_error <= sdpa_error * 1.1
