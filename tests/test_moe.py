"""The MoE feed-forward through transformers' experts functions == a per-token reference loop."""

import pytest
import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from rxt_factories import tiny_model

MOE = {
    "shared1-global": dict(use_moe=True, num_experts=4, moe_top_k=2),
    "noshared-local": dict(use_moe=True, num_experts=4, moe_top_k=1, num_shared_experts=0, moe_bias_mode="local"),
    "shared2-weighted-local": dict(use_moe=True, num_experts=5, moe_top_k=3, num_shared_experts=2,
                                   shared_expert_dim=24, moe_use_weighted_shared_experts=True,
                                   moe_bias_mode="local", moe_shared_experts_bias_mode="local"),
    "shared2-global": dict(use_moe=True, num_experts=4, moe_top_k=2, num_shared_experts=2, shared_expert_dim=24,
                           moe_shared_experts_bias_mode="global"),
    "ungated-off": dict(use_moe=True, num_experts=3, moe_top_k=2, use_gated=False, moe_bias_mode="off",
                        moe_shared_experts_bias_mode="off"),
}


def per_token_experts(module, hidden, top_idx, top_w):
    """Reference: every token, every chosen expert, one plain matmul each (no grouping, no batching)."""
    rows = []
    for n in range(hidden.shape[0]):
        acc = torch.zeros_like(hidden[n])
        for slot in range(top_idx.shape[1]):
            e = int(top_idx[n, slot])
            h = hidden[n] @ module.w1[e]
            if module.has_bias:
                h = h + module.b1[e]
            h = module._apply_gate(h) if module.gated else module.act_fn(h)
            y = h @ module.w2[e]
            if module.has_bias:
                y = y + module.b2[e]
            acc = acc + top_w[n, slot] * y
        rows.append(acc)
    return torch.stack(rows)


ALL_EXPERTS_FUNCTIONS.register("rxt_test_per_token", per_token_experts)


def moe_layer(options, seed=0):
    model = tiny_model(seed=seed, decoder=options)
    ff = model.decoder.layers[0].ff
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # every bias off zero, so that a dropped or misplaced bias shows
        for p in ff.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return ff


def run(ff, impl, x):
    ff.experts_implementation = impl  # the reference is not a public choice, so no setter here
    ff.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    out, aux = ff(x)
    loss = (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum() + (aux if aux is not None else 0)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in ff.named_parameters()}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm", "selected_mm"])
@pytest.mark.parametrize("name", list(MOE))
@pytest.mark.parametrize("shape,training", [((1, 1), False), ((3, 1), True), ((2, 9), True)])  # decode, batch, prefill
def test_moe_equals_per_token_reference(name, impl, shape, training):
    """Outputs, input and parameter gradients (aux loss included) within 1e-6 (+ 1e-6 relative: the grouped
    matmul sums a weight's gradient over its tokens in another order than the per-token loop)."""
    ff = moe_layer(MOE[name]).train(training)
    x = torch.randn(*shape, ff.w1.shape[1], generator=torch.Generator().manual_seed(3))
    ref_out, ref_dx, ref_grads = run(ff, "rxt_test_per_token", x)
    out, dx, grads = run(ff, impl, x)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dx, ref_dx, atol=1e-6, rtol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for key in grads:
        torch.testing.assert_close(grads[key], ref_grads[key], atol=1e-6, rtol=1e-6, msg=key)


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm", "selected_mm"])
def test_moe_top_k_ties_match_reference(impl):
    """Two experts with identical router rows tie exactly in every token's probabilities."""
    ff = moe_layer(MOE["shared1-global"])
    with torch.no_grad():
        ff.router.gate.weight[1] = ff.router.gate.weight[2]
        ff.router.gate.weight[3] = ff.router.gate.weight[2]
    x = torch.randn(2, 5, ff.w1.shape[1], generator=torch.Generator().manual_seed(4))
    probs, _, top_idx = ff.route(x.reshape(-1, x.shape[-1]))
    assert (probs[:, 1] == probs[:, 2]).all() and (probs[:, 2] == probs[:, 3]).all()
    assert torch.isin(top_idx, torch.tensor([1, 2, 3])).all(dim=-1).any()  # some token picked two tied experts
    ref_out, ref_dx, ref_grads = run(ff, "rxt_test_per_token", x)
    out, dx, grads = run(ff, impl, x)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dx, ref_dx, atol=1e-6, rtol=1e-6)
    for key in grads:
        torch.testing.assert_close(grads[key], ref_grads[key], atol=1e-6, rtol=1e-6, msg=key)


def test_moe_refuses_unknown_experts_implementation():
    ff = moe_layer(MOE["shared1-global"])
    with pytest.raises(ValueError, match="Unknown experts implementation 'loop'; choose one of"):
        ff.set_experts_implementation("loop")
    ff.set_experts_implementation("batched_mm")
    assert ff.experts_implementation == "batched_mm"


def test_auto_experts_runs_only_the_chosen_experts_for_a_cpu_decode_step():
    """"auto": the selected experts' matmuls when a step has at most num_experts token-expert pairs (a decode step),
    the grouped matmul otherwise; both equal the per-token reference (test_moe_equals_per_token_reference)."""
    from transformers_rxt.modeling_rxt import selected_mm_experts_forward

    ff = moe_layer(MOE["shared1-global"])  # 4 experts, top-2
    assert ff.experts_implementation == "auto"
    assert ff._experts_function(1) is selected_mm_experts_forward
    assert ff._experts_function(2) is selected_mm_experts_forward
    assert ff._experts_function(3) is ALL_EXPERTS_FUNCTIONS["grouped_mm"]
    ff.set_experts_implementation("grouped_mm")
    assert ff._experts_function(1) is ALL_EXPERTS_FUNCTIONS["grouped_mm"]
