"""The reference on the host while sampling (`r1lightning.offload`): the setting, the `auto` rule with
hand-computed bytes, the round trip (only written weights copied again), and a GRPO step that matches
one without offloading. On a CPU the move is host to host; the GPU figures are in docs/benchmarks.md."""

import pytest
import torch

from r1lightning import offload
from r1lightning.errors import UserError
from r1lightning.grpo import GRPOModule
from r1lightning.options import GRPOLossOptions, SamplingOptions
from r1lightning.policy import Policy
from r1lightning.rewards import Reward


def _module(tiny_moe_config, **kwargs):
    torch.manual_seed(0)
    module = GRPOModule(Policy(config=tiny_moe_config, tokenizer="char"), rewards=[Reward("accuracy")],
                        sampling=SamplingOptions(num_samples=4, max_new_tokens=12), loss=GRPOLossOptions(beta=0.04),
                        router_aux_loss_coef=0.0, log_completions_every=0, **kwargs)
    module.configure_model()
    return module


def test_the_setting_parses_and_a_bad_value_names_the_key(tiny_moe_config):
    assert [offload.parse_setting(v) for v in ("auto", "AUTO", True, False, "true", "false")] == ["auto", "auto", True, False,
                                                                                                 True, False]
    with pytest.raises(UserError, match="offload_reference: expected auto, true or false, got 'sometimes'"):
        offload.parse_setting("sometimes")
    with pytest.raises(UserError, match="offload_reference"):
        _module(tiny_moe_config, offload_reference=1.5)
    assert _module(tiny_moe_config, offload_reference="true").hparams.offload_reference is True


def test_auto_offloads_when_the_steps_kv_reaches_the_reference(tiny_moe_config, monkeypatch):
    module = _module(tiny_moe_config)
    ref = module.ref_model
    # 2 layers x (K + V) x 1 KV head x head_dim 16 x 4 B (fp32) = 256 B a token
    assert offload.kv_bytes_per_token(module.model) == 256
    ref_bytes = sum(p.numel() for p in ref.parameters()) * 4
    assert offload.parameter_bytes(ref) == ref_bytes
    # on a CPU: auto never offloads, true is an error naming the key and the reason
    assert not offload.wants_offload("auto", ref, module.model, rows=10**6, tokens_per_row=10**6)
    with pytest.raises(UserError, match="offload_reference: true, but .* on cpu, not CUDA"):
        offload.wants_offload(True, ref, module.model, rows=1, tokens_per_row=1)
    monkeypatch.setattr(offload, "unsupported", lambda m: None)  # as if on a GPU
    tokens = -(-ref_bytes // 256)  # the fewest KV tokens that weigh as much as the reference
    assert offload.wants_offload("auto", ref, module.model, rows=1, tokens_per_row=tokens)
    assert not offload.wants_offload("auto", ref, module.model, rows=1, tokens_per_row=tokens - 1)
    # a sampler with a memory budget: offload only when the full-length KV would not fit it
    assert offload.wants_offload("auto", ref, module.model, rows=4, tokens_per_row=100, kv_budget=4 * 100 * 256 - 1)
    assert not offload.wants_offload("auto", ref, module.model, rows=4, tokens_per_row=100, kv_budget=4 * 100 * 256)
    assert not offload.wants_offload("auto", ref, module.model, rows=10**6, tokens_per_row=10**6, kv_budget=float("inf"))
    assert offload.wants_offload(True, ref, module.model, rows=1, tokens_per_row=1)
    assert not offload.wants_offload(False, ref, module.model, rows=10**6, tokens_per_row=10**6)
    assert not offload.wants_offload("auto", None, module.model, rows=10**6, tokens_per_row=10**6)  # beta 0


def test_round_trip_keeps_the_weights_and_copies_only_written_ones(tiny_moe_config, monkeypatch):
    from callbacks.reference import refresh_reference

    module = _module(tiny_moe_config)
    ref, total = module.ref_model, offload.parameter_bytes(module.ref_model)
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    monkeypatch.setattr(offload, "unsupported", lambda m: None)
    moved = offload.HostOffload(ref)
    moved.to_host()
    params = list(ref.parameters())
    assert moved.on_host and all(p.data_ptr() == h.data_ptr() for p, h in zip(params, moved.host))
    assert moved.copied_bytes == total
    moved.to_device()
    assert not moved.on_host and all(p.data_ptr() != h.data_ptr() for p, h in zip(params, moved.host))
    assert all(torch.equal(p, before[n]) for n, p in ref.named_parameters())
    moved.to_host()
    moved.to_device()
    assert moved.copied_bytes == total  # nothing was written: the host copy was still right
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(1.0)
    refresh_reference(module.model, ref)  # writes every reference weight in place
    moved.to_host()
    assert moved.copied_bytes == 2 * total
    for (n, p), h in zip(ref.named_parameters(), moved.host):
        assert torch.equal(h, before[n] + 1.0), n  # the host holds the refreshed weights
    moved.to_device()


def _step(module, monkeypatch, seen):
    from r1lightning.rollout import Rollout

    tok = module.tokenizer
    texts = ["<think>3</think><answer>3</answer>", "<answer>4</answer>", "no", "<answer>3</answer>"] * 2
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(map(len, ids))
    completion_ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
    completion_mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])

    def generate(prompt_ids, prompt_mask, params, sampler=None):
        seen.append(module._ref_offload is not None and module._ref_offload.on_host)
        return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, torch.zeros(len(ids), dtype=torch.bool))

    monkeypatch.setattr(module, "generate", generate)
    opt = torch.optim.SGD(module.model.parameters(), lr=0.1)
    module.optimizers = lambda: opt
    module.lr_schedulers = lambda: type("S", (), {"step": lambda self: None})()
    module.manual_backward = lambda loss: loss.backward()
    logged = {}
    monkeypatch.setattr(module, "log_step", lambda rollout, total, scores, keep, stats, *a: logged.update(stats))
    prompts = tok(["1+2=", "2+2="], return_tensors="pt", padding=True, padding_side="left")
    batch = {"prompt_ids": prompts["input_ids"], "prompt_mask": prompts["attention_mask"], "columns": {"answer": ["3", "4"]}}
    module.training_step(batch, 0)
    module.training_step(batch, 1)  # the second step's reference KL sees the first step's update
    return logged, {n: p.detach().clone() for n, p in module.model.named_parameters()}


def test_a_step_with_the_reference_offloaded_equals_one_without(tiny_moe_config, monkeypatch):
    monkeypatch.setattr(offload, "unsupported", lambda m: None)
    out = {}
    for setting in (False, True):
        seen = []
        module = _module(tiny_moe_config, offload_reference=setting)
        out[setting] = _step(module, monkeypatch, seen)
        assert seen == [setting, setting]  # sampled with the reference on the host, or not
        assert out[setting][0]["reference_offloaded"] == float(setting)
        if setting:
            assert not module._ref_offload.on_host  # back for the reference pass
    (s0, w0), (s1, w1) = out[False], out[True]
    assert s0["kl"] > 0  # the reference really entered the loss
    for k in ("loss", "kl", "grad_norm", "entropy"):
        assert s1[k] == s0[k], k
    assert all(torch.equal(w1[n], w0[n]) for n in w0)
