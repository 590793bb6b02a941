"""Flash varlen attention on CUDA against its plain-PyTorch reference and against the masked SDPA update
(`pytest -m gpu`; skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from r1lightning import attention
from r1lightning.grpo import GRPOModule
from r1lightning.logprobs import pack_sequences
from r1lightning.options import GRPOLossOptions, SamplingOptions
from r1lightning.policy import Policy
from r1lightning.rewards import Reward

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_varlen_flash_matches_the_reference_values_and_grads(kv_heads):
    g = torch.Generator(device="cuda").manual_seed(0)
    cu = torch.tensor([0, 37, 38, 300, 512, 700, 1024], dtype=torch.int32, device="cuda")  # incl. a 1-token span
    T, d = int(cu[-1]), 64
    q = torch.randn(T, 4, d, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    k = torch.randn(T, kv_heads, d, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    v = torch.randn(T, kv_heads, d, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    dout = torch.randn(T, 4, d, device="cuda", generator=g, dtype=torch.bfloat16)
    out = attention.varlen_flash(q, k, v, cu, int(cu.diff().max()), d**-0.5)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = attention.reference_varlen(q32, k32, v32, cu, d**-0.5)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), dout.float())
    assert rel(out, ref) < 1e-2
    for a, b in zip(grads, ref_grads):
        assert rel(a, b) < 2e-2


def test_packed_update_with_varlen_equals_sdpa(tiny_moe_config):
    """Log-probs and gradients of one packed micro-batch, bf16 on CUDA: r1l_varlen (flash) vs sdpa (masked)."""
    torch.manual_seed(0)
    lengths = [(5, 40), (9, 3), (12, 77), (3, 1), (7, 30)]
    P, C = max(p for p, _ in lengths), max(c for _, c in lengths)
    N = len(lengths)
    prompt_ids = torch.zeros(N, P, dtype=torch.long)
    prompt_mask = torch.zeros(N, P, dtype=torch.long)
    completion_ids = torch.zeros(N, C, dtype=torch.long)
    completion_mask = torch.zeros(N, C, dtype=torch.long)
    for i, (p, c) in enumerate(lengths):
        prompt_ids[i, P - p:], prompt_mask[i, P - p:] = torch.randint(3, 40, (p,)), 1
        completion_ids[i, :c], completion_mask[i, :c] = torch.randint(3, 40, (c,)), 1
    out = {}
    for attn in ("sdpa", attention.ATTN_IMPLEMENTATION):
        torch.manual_seed(0)
        module = GRPOModule(Policy(config=tiny_moe_config, tokenizer="char", attn_implementation=attn, dtype="bfloat16"),
                            rewards=[Reward("accuracy")], sampling=SamplingOptions(num_samples=1, max_new_tokens=C),
                            loss=GRPOLossOptions(beta=0.0), router_aux_loss_coef=0.0, log_completions_every=0)
        module.configure_model()
        module.model.cuda()
        layout = pack_sequences(prompt_ids.cuda(), prompt_mask.cuda(), completion_ids.cuda(), completion_mask.cuda(),
                                list(range(N)), pad_token_id=0)
        assert layout.input_ids.shape[0] < N  # rows hold several sequences
        logp, _, _ = module.forward_logprobs(layout)
        logp[completion_mask.cuda().bool()].sum().backward()
        out[attn] = (logp.detach(), {n: p.grad.float().clone() for n, p in module.model.named_parameters() if p.grad is not None})
    (l0, g0), (l1, g1) = out["sdpa"], out[attention.ATTN_IMPLEMENTATION]
    on = completion_mask.cuda().bool()
    assert (l1[on] - l0[on]).abs().max().item() < 0.05  # bf16 log-probs over a 40-token vocabulary
    for n in g0:
        assert rel(g1[n], g0[n]) < 0.05, n
