"""vLLM's CPU LoRA ops with ftaas's plugin: a token marked -1 (no adapter) takes none,
however full the adapter slots are; the tokens with an adapter get it exactly as before."""

from __future__ import annotations

from importlib.metadata import entry_points

import torch

from serving.vllm_cpu_lora_fix import only_lora_rows, register


def shrink_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    inputs = torch.randn(4, 16)
    weights = torch.randn(2, 1, 8, 16)  # two slots, both holding an adapter
    indices = torch.tensor([0, -1, 1, -1])
    return inputs, weights, indices


def test_vllms_own_op_gives_a_no_adapter_token_the_last_slots_adapter():
    from vllm.lora.ops.torch_ops import lora_ops

    op = getattr(lora_ops.bgmv_shrink, "__wrapped__", lora_ops.bgmv_shrink)
    inputs, weights, indices = shrink_case()
    output = torch.zeros(4, 8)
    op(inputs, weights, output, indices, 1.0)
    # The bug the plugin is for: row 1 got slot 1's (the last) adapter.
    assert torch.allclose(output[1], weights[1, 0] @ inputs[1])


def test_with_the_plugin_no_adapter_tokens_are_left_alone_and_the_others_unchanged():
    from vllm.lora.ops.torch_ops import lora_ops

    register()
    register()  # vLLM may load a plugin more than once per process
    inputs, weights, indices = shrink_case()
    output = torch.zeros(4, 8)
    lora_ops.bgmv_shrink(inputs, weights, output, indices, 0.5)
    assert torch.equal(output[1], torch.zeros(8)) and torch.equal(output[3], torch.zeros(8))
    assert torch.allclose(output[0], 0.5 * weights[0, 0] @ inputs[0])
    assert torch.allclose(output[2], 0.5 * weights[1, 0] @ inputs[2])

    # expand adds an adapter's output to the base layer's: untouched for no-adapter rows
    base = torch.randn(4, 16)
    expanded = base.clone()
    lora_ops.bgmv_expand(output, weights.transpose(-1, -2), expanded, indices, True)
    assert torch.equal(expanded[1], base[1]) and torch.equal(expanded[3], base[3])
    assert torch.allclose(expanded[0], base[0] + weights[0, 0].T @ output[0])
    sliced = base.clone()
    lora_ops.bgmv_expand_slice(output, weights.transpose(-1, -2)[:, :, :8], sliced, indices, 4, 8)
    assert torch.equal(sliced[1], base[1])
    # the CPU punica wrapper and the sgmv ops use the fixed ones
    from vllm.lora.punica_wrapper import punica_cpu

    assert punica_cpu.bgmv_shrink is lora_ops.bgmv_shrink is only_lora_rows(lora_ops.bgmv_shrink)


def test_vllm_finds_the_plugin_in_every_process_it_starts():
    names = {plugin.name for plugin in entry_points(group="vllm.general_plugins")}
    assert "ftaas_cpu_lora_fix" in names


def test_the_grouped_ops_give_vllms_numbers_for_every_token_with_an_adapter():
    """One product per adapter slot instead of a weight copy per token: the same values as
    vLLM's own ops on the rows that take an adapter, whatever the mix of slots."""
    from vllm.lora.ops.torch_ops import lora_ops

    register()
    torch.manual_seed(1)
    original = {
        name: getattr(lora_ops, name).__wrapped__
        for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
    }
    for indices in ([2, 2, 2, 2, 2, 2], [0, 1, 1, 0, 2, 1], [1, -1, 1, 0, -1, 2]):
        at = torch.tensor(indices)
        rows = at >= 0
        inputs, a_weights = torch.randn(6, 32), torch.randn(3, 1, 8, 32)
        shrunk = torch.zeros(6, 8)
        lora_ops.bgmv_shrink(inputs, a_weights, shrunk, at, 0.5)
        expected_rows = torch.zeros(int(rows.sum()), 8)
        original["bgmv_shrink"](inputs[rows], a_weights, expected_rows, at[rows], 0.5)
        assert torch.allclose(shrunk[rows], expected_rows, atol=1e-5)

        b_weights = torch.randn(3, 1, 32, 8)
        base = torch.randn(6, 32)
        for add in (True, False):
            ours, theirs = base.clone(), base[rows].clone()
            lora_ops.bgmv_expand(shrunk, b_weights, ours, at, add)
            original["bgmv_expand"](shrunk[rows], b_weights, theirs, at[rows], add)
            assert torch.allclose(ours[rows], theirs, atol=1e-5)
            assert torch.equal(ours[~rows], base[~rows])
            ours, theirs = base.clone(), base[rows].clone()
            lora_ops.bgmv_expand_slice(shrunk, b_weights[:, :, :16], ours, at, 8, 16, add)
            original["bgmv_expand_slice"](
                shrunk[rows], b_weights[:, :, :16], theirs, at[rows], 8, 16, add
            )
            assert torch.allclose(ours[rows], theirs, atol=1e-5)
            assert torch.equal(ours[~rows], base[~rows])
