import math

import pytest
import torch

from r1lightning.losses import group_advantages, grpo_loss, k3_kl, mask_truncated, sampler_weights, zero_variance_groups

LN2 = math.log(2.0)


def approx(x, v):
    x = float(x.detach()) if torch.is_tensor(x) else float(x)
    assert x == pytest.approx(v, abs=1e-6), (x, v)


# Two sequences, C=3, old_logp = 0 so ratio = exp(logp).
# seq0: A=+1, ratios [1, 1.5, 0.5], mask [1,1,1]
#   token losses -min(r, clip(r)) = [-1, -1.2, -0.5]       sum -2.7, mean -0.9
# seq1: A=-2, ratios [1, 1.5, 0.5], mask [1,0,1]
#   token losses 2*max(r, clip(r)) = [2, (masked), 1.6]    sum  3.6, mean  1.8
# 5 real tokens; one high-clipped (seq0 r=1.5), one low-clipped (seq1 r=0.5).
def _batch():
    ratios = torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.5, 0.5]])
    logp = ratios.log()
    old = torch.zeros_like(logp)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]])
    return logp, old, adv, mask


@pytest.mark.parametrize(
    "aggregation, kwargs, expected",
    [
        ("grpo", {}, (-0.9 + 1.8) / 2),
        ("bnpo", {}, (-2.7 + 3.6) / 5),
        ("dr_grpo", {"max_completion_length": 4}, (-2.7 + 3.6) / (2 * 4)),
        ("dapo", {}, (-2.7 + 3.6) / 5),
        ("dapo", {"num_tokens": 10}, (-2.7 + 3.6) / 10),
        ("grpo", {"num_sequences": 4}, (-0.9 + 1.8) / 4),
    ],
)
def test_aggregations_hand_computed(aggregation, kwargs, expected):
    logp, old, adv, mask = _batch()
    loss, metrics = grpo_loss(logp, old, adv, mask, aggregation=aggregation, **kwargs)
    approx(loss, expected)
    approx(metrics["clip_ratio/low_mean"], 1 / 5)
    approx(metrics["clip_ratio/high_mean"], 1 / 5)
    approx(metrics["clip_ratio/region_mean"], 2 / 5)
    assert "kl" not in metrics


@pytest.mark.parametrize(
    "aggregation, full_kwargs, micro_kwargs, expected",
    [
        ("grpo", {}, {"num_sequences": 2}, 0.45),
        ("dapo", {}, {"num_tokens": 5}, 0.18),
        ("dr_grpo", {"max_completion_length": 4}, {"num_sequences": 2, "max_completion_length": 4}, 0.1125),
    ],
)
def test_micro_batches_sum_to_full_batch(aggregation, full_kwargs, micro_kwargs, expected):
    logp, old, adv, mask = _batch()
    full, _ = grpo_loss(logp, old, adv, mask, aggregation=aggregation, **full_kwargs)
    parts = [
        grpo_loss(logp[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1], aggregation=aggregation,
                  **micro_kwargs)[0]
        for i in range(2)
    ]  # fmt: skip
    approx(full, expected)
    approx(parts[0] + parts[1], expected)


def test_bnpo_micro_batches_average_their_means():
    logp, old, adv, mask = _batch()
    parts = [
        grpo_loss(logp[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1], aggregation="bnpo",
                  num_micro_batches=2)[0]
        for i in range(2)
    ]  # fmt: skip
    approx(parts[0], -0.9 / 2)
    approx(parts[1], 1.8 / 2)


def test_dr_grpo_needs_max_length_and_unknown_aggregation_fails():
    logp, old, adv, mask = _batch()
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logp, old, adv, mask, aggregation="dr_grpo")
    with pytest.raises(ValueError, match="token_mean"):
        grpo_loss(logp, old, adv, mask, aggregation="token_mean")


def test_asymmetric_clipping_and_delta():
    # One sequence with A=-1, ratios [2.0, 0.5]: loss per token = max(r_unclipped, clip(r)).
    logp = torch.tensor([[math.log(2.0), math.log(0.5)]])
    old = torch.zeros_like(logp)
    neg, pos = torch.tensor([-1.0]), torch.tensor([1.0])
    mask = torch.ones_like(logp)
    # eps 0.2/0.28: clip range [0.8, 1.28] -> tokens [2.0, 0.8], mean 1.4
    loss, m = grpo_loss(logp, old, neg, mask, epsilon_low=0.2, epsilon_high=0.28)
    approx(loss, 1.4)
    approx(m["clip_ratio/low_mean"], 0.5)  # r=0.5 < 0.8 with A<0
    approx(m["clip_ratio/high_mean"], 0.0)  # r=2 > 1.28 but A<0
    # delta=1.5 caps the unclipped ratio: tokens [1.5, 0.8], mean 1.15
    loss, _ = grpo_loss(logp, old, neg, mask, epsilon_low=0.2, epsilon_high=0.28, delta=1.5)
    approx(loss, 1.15)
    # positive advantage: -min(r, clip) = [-1.28, -0.5]; delta does not change it
    for d in (None, 1.5):
        loss, m = grpo_loss(logp, old, pos, mask, epsilon_low=0.2, epsilon_high=0.28, delta=d)
        approx(loss, (-1.28 - 0.5) / 2)
        approx(m["clip_ratio/high_mean"], 0.5)
        approx(m["clip_ratio/region_mean"], 0.5)


def test_k3_kl_values():
    logp = torch.zeros(3)
    ref = torch.tensor([LN2, -LN2, 0.0])
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor([1 - LN2, LN2 - 0.5, 0.0]))


def test_kl_penalty_in_loss_and_metric():
    # ratio 1, A=0 -> only beta*k3 remains: k3 = [1-ln2, ln2-0.5] (mean 0.25), third token masked
    logp = torch.zeros(1, 3)
    ref = torch.tensor([[LN2, -LN2, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, m = grpo_loss(logp, logp, torch.zeros(1), mask, ref, beta=0.1)
    approx(loss, 0.1 * 0.25)
    approx(m["kl"], 0.25)
    loss, m = grpo_loss(logp, logp, torch.zeros(1), mask, ref, beta=0.0)
    approx(loss, 0.0)
    approx(m["kl"], 0.25)  # logged even without penalty
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, logp, torch.zeros(1), mask, beta=0.1)


def test_all_zero_mask_row_is_finite_and_ignored():
    # seq1 is fully masked and holds -inf log-probs (padding): no NaN in loss or grad.
    logp = torch.tensor([[0.0, 0.0], [-math.inf, -math.inf]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0], [-math.inf, 0.0]])
    adv = torch.tensor([1.0, 3.0])
    mask = torch.tensor([[1, 1], [0, 0]])
    for aggregation, expected in [("grpo", -1.0 / 2), ("bnpo", -1.0), ("dapo", -1.0), ("dr_grpo", -2.0 / 4)]:
        loss, m = grpo_loss(logp, old, adv, mask, torch.zeros(2, 2), beta=0.5, aggregation=aggregation,
                            max_completion_length=2)  # fmt: skip
        approx(loss, expected)
        (grad,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(grad).all() and (grad[1] == 0).all()
        assert all(torch.isfinite(v) for v in m.values())
    # an entirely empty micro-batch gives 0, not NaN
    loss, m = grpo_loss(logp, old, adv, torch.zeros(2, 2), aggregation="bnpo")
    approx(loss, 0.0)
    approx(m["clip_ratio/region_mean"], 0.0)


def test_group_advantages_group_batch_none():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # G=4
    centered = [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(group_advantages(rewards, 4, scale="none"), torch.tensor(centered))
    # group 0: unbiased std = sqrt(1/3); group 1: std 0 -> 0 / eps = 0
    g_std = math.sqrt(1 / 3)
    torch.testing.assert_close(
        group_advantages(rewards, 4, scale="group"), torch.tensor([c / (g_std + 1e-4) for c in centered])
    )
    # batch: mean 1.25, sum of squared deviations 5.5 -> unbiased std sqrt(5.5/7)
    b_std = math.sqrt(5.5 / 7)
    torch.testing.assert_close(
        group_advantages(rewards, 4, scale="batch", eps=0.0), torch.tensor([c / b_std for c in centered])
    )
    # groups of one have no spread: advantage 0, not NaN
    torch.testing.assert_close(group_advantages(torch.tensor([3.0, 1.0]), 1), torch.zeros(2))
    with pytest.raises(ValueError):
        group_advantages(rewards, 3)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(rewards, 4, scale="rank")


def test_groups_equal_up_to_rounding_get_exactly_zero_advantage():
    """Eight format-only completions score 0.1 each; their float mean is 0.1 + 1 ulp on the CPU, and
    1 ulp / (std 0 + eps) gave every one of them advantage -7.45e-5: a gradient in a batch with no signal."""
    fmt_only = torch.zeros(8) * 1.0 + torch.ones(8) * 0.1  # accuracy 0 (weight 1) + format 1 (weight 0.1)
    assert torch.nanmean(fmt_only) != fmt_only[0]  # the rounding this guards against
    # A group whose sums differ only by rounding (0.6 + 0.1 vs 0.7), and one with a real difference.
    rounding = torch.full((8,), 0.7)
    rounding[:2] = torch.tensor(0.6) + torch.tensor(0.1)
    assert rounding[0] != rounding[2]
    real = torch.tensor([1.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    rewards = torch.cat([fmt_only, rounding, real])
    assert zero_variance_groups(rewards, 8).tolist() == [True, True, False]
    for scale in ("group", "batch", "none"):
        adv = group_advantages(rewards, 8, scale=scale)
        assert (adv[:16] == 0).all(), (scale, adv[:16])
        assert adv[16] > 0 and (adv[17:] < 0).all()
    torch.testing.assert_close(group_advantages(real, 8), (real - real.mean()) / (real.std() + 1e-4))


def test_zero_variance_groups_and_truncation_mask():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    assert zero_variance_groups(rewards, 2).tolist() == [True, False, True]
    assert zero_variance_groups(rewards, 3).tolist() == [False, False]
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    out = mask_truncated(mask, torch.tensor([False, True, False]))
    assert out.dtype == mask.dtype
    assert out.tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]]


def _tiny_policy(seed=0):
    g = torch.Generator().manual_seed(seed)
    N, C, H, V = 3, 4, 5, 6
    x = torch.randn(N, C, H, generator=g)
    W = torch.randn(H, V, generator=g, requires_grad=True)
    tokens = torch.randint(0, V, (N, C), generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    adv = torch.tensor([1.0, -0.5, 2.0])
    logits = x @ W  # [N, C, V]
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)  # [N, C]
    return W, logits, logp, mask, adv


@pytest.mark.parametrize("aggregation", ["grpo", "dapo"])
def test_on_policy_gradient_matches_policy_gradient_surrogate(aggregation):
    W, logits, logp, mask, adv = _tiny_policy()
    loss, _ = grpo_loss(logp, logp.detach(), adv, mask, aggregation=aggregation)
    m = mask.float()
    if aggregation == "grpo":
        # -mean_i mean_t A_i logp_it ; value at ratio 1 is -mean_i A_i
        ref = -((adv[:, None] * logp * m).sum(1) / m.sum(1)).mean()
        approx(loss, -adv.mean().item())
    else:
        ref = -(adv[:, None] * logp * m).sum() / m.sum()
        approx(loss, -(adv * m.sum(1)).sum().item() / m.sum().item())
    g_loss = torch.autograd.grad(loss, [logits, W], retain_graph=True)
    g_ref = torch.autograd.grad(ref, [logits, W])
    for a, b in zip(g_loss, g_ref):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b)


def test_clipped_tokens_get_no_gradient():
    W, logits, logp, mask, adv = _tiny_policy()
    # push token (0,1) to ratio 1.5 with A>0 (clipped) and token (1,0) to ratio 0.5 with A<0 (clipped)
    shift = torch.zeros_like(logp)
    shift[0, 1] = math.log(1.5)
    shift[1, 0] = math.log(0.5)
    old = logp.detach() - shift
    loss, m = grpo_loss(logp, old, adv, mask, aggregation="grpo")
    (g,) = torch.autograd.grad(loss, logp)
    # d loss / d logp_it = -A_i r_it / (n_i N) for unclipped real tokens, 0 otherwise
    n = mask.sum(1).float()
    expected = -(adv[:, None] * torch.exp(shift)) / (n[:, None] * 3) * mask
    expected[0, 1] = 0.0
    expected[1, 0] = 0.0
    torch.testing.assert_close(g, expected)
    approx(m["clip_ratio/region_mean"], 2 / 9)


# -- sampler/trainer mismatch correction (TRL's vllm_importance_sampling_*) ---------------------------
NAN = float("nan")
TRAIN = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -7.0]])
SAMPLER = torch.tensor([[-1.5, -1.0, NAN], [-3.0, -1.0, -1.0]])  # a NaN sampler log-prob: ratio 1
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the last token of row 1 is padding


def test_sampler_weights_by_hand():
    e = math.exp
    # token log-ratios: row 0 [0.5, -1, 0 (NaN)], row 1 [2, 0, padding]
    w, m = sampler_weights(TRAIN, SAMPLER, MASK, "token_truncate", None, 3.0)
    torch.testing.assert_close(w, torch.tensor([[e(0.5), e(-1.0), 1.0], [3.0, 1.0, 1.0]]))
    torch.testing.assert_close(m["sampling/importance_sampling_ratio/mean"], torch.tensor((e(0.5) + e(-1.0) + 1 + 3 + 1) / 5))
    torch.testing.assert_close(m["sampling/sampling_logp_difference/mean"], torch.tensor((0.5 + 1 + 0 + 2 + 0) / 5))
    torch.testing.assert_close(m["sampling/importance_sampling_outside"], torch.tensor(1 / 5))
    w, m = sampler_weights(TRAIN, SAMPLER, MASK, "token_mask", 0.5, 3.0)
    torch.testing.assert_close(w, torch.tensor([[e(0.5), 0.0, 1.0], [0.0, 1.0, 1.0]]))
    torch.testing.assert_close(m["sampling/importance_sampling_outside"], torch.tensor(2 / 5))
    # sequence level: exp of the summed log-ratio, one weight a row: e^-0.5 and e^2
    w, m = sampler_weights(TRAIN, SAMPLER, MASK, "sequence_truncate", None, 3.0)
    torch.testing.assert_close(w, torch.tensor([[e(-0.5)], [3.0]]))
    w, m = sampler_weights(TRAIN, SAMPLER, MASK, "sequence_mask", None, 3.0)
    torch.testing.assert_close(w, torch.tensor([[e(-0.5)], [0.0]]))
    torch.testing.assert_close(m["sampling/importance_sampling_outside"], torch.tensor(2 / 5))  # row 1's two tokens
    with pytest.raises(ValueError, match="unknown sampler correction"):
        sampler_weights(TRAIN, SAMPLER, MASK, "token", None, 3.0)


def test_grpo_loss_weights_the_surrogate_not_the_kl():
    """mu = 1 (old = logp detached: ratio 1, inside the clip): each token's surrogate is -A w, the KL term
    is not weighted; `grpo` aggregation averages tokens per row, then rows."""
    logp = TRAIN.clone().requires_grad_(True)
    ref = TRAIN - 0.1
    adv = torch.tensor([1.0, -2.0])
    beta = 0.5
    loss, metrics = grpo_loss(logp, logp.detach(), adv, MASK, ref, beta=beta, sampler_logp=SAMPLER,
                              sampler_correction="token_truncate", sampler_correction_max=3.0)
    w, _ = sampler_weights(TRAIN, SAMPLER, MASK, "token_truncate", None, 3.0)
    kl = math.exp(-0.1) - (-0.1) - 1  # k3 at log(ref / pi) = -0.1
    row0 = (-(1.0) * w[0].sum() + beta * kl * 3) / 3
    row1 = (-(-2.0) * w[1, :2].sum() + beta * kl * 2) / 2
    torch.testing.assert_close(loss, (row0 + row1) / 2)
    loss.backward()
    # d/dlogp of -A r w at r = 1 is -A w; the k3 term's is beta (1 - exp(ref - logp)) = beta (1 - e^-0.1)
    dkl = beta * (1 - math.exp(-0.1))
    want = torch.stack([(-1.0 * w[0] + dkl) / 3 / 2, torch.cat([(2.0 * w[1, :2] + dkl) / 2 / 2, torch.zeros(1)])])
    torch.testing.assert_close(logp.grad, want)
    assert "sampling/importance_sampling_ratio/mean" in metrics
    with pytest.raises(ValueError, match="needs sampler_logp"):
        grpo_loss(logp, logp.detach(), adv, MASK, sampler_correction="token_mask")
