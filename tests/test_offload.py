"""The reference and the optimizer state on the host while sampling (`r1lightning.offload`): the
settings, the `auto` rules in hand-computed bytes, the round trip (only written tensors copied again),
and GRPO steps that equal steps without offloading. On a CPU the move is host to host; the GPU test
(tests/test_offload_gpu.py) checks the freed device memory."""

import pytest
import torch

from r1lightning import offload
from r1lightning.errors import UserError
from r1lightning.rollout.paged import kv_bytes_per_token


def as_if_on_a_gpu(monkeypatch):
    """`unsupported` as on a GPU: device tensors can move, tensors living in an offload's host buffer cannot
    (the real rule refuses them as "on cpu"), whatever the CPU test's tensors report as their device."""
    buffers = set()
    allocate = offload.HostOffload._allocate_host

    def allocate_and_remember(self):
        allocate(self)
        buffers.update(h.untyped_storage().data_ptr() for h in self.host)

    monkeypatch.setattr(offload.HostOffload, "_allocate_host", allocate_and_remember)
    monkeypatch.setattr(offload, "unsupported", lambda tensors, what="it": "on cpu, not CUDA"
                        if any(t.untyped_storage().data_ptr() in buffers for t in tensors) else None)


def _module(tiny_moe_config, **kwargs):
    """The tests' tiny GRPO module (tests.test_grpo.tiny_module) with 12 new tokens and micro-batches by tokens only."""
    from tests.test_grpo import tiny_module

    return tiny_module(tiny_moe_config, sampling={"max_new_tokens": 12}, micro_batch_size=None, router_aux_loss_coef=0.0,
                       log_completions_every=0, **kwargs)


def test_the_settings_parse_and_a_bad_value_names_the_key(tiny_moe_config):
    assert [offload.parse_setting(v) for v in ("auto", "AUTO", True, False, "true", "false")] == ["auto", "auto", True, False,
                                                                                                 True, False]
    with pytest.raises(UserError, match="model.init_args.offload_optimizer: expected auto, true or false, got 'sometimes'"):
        offload.parse_setting("sometimes", "offload_optimizer")
    with pytest.raises(UserError, match="offload_reference"):
        _module(tiny_moe_config, offload_reference=1.5)
    module = _module(tiny_moe_config, offload_reference="true", offload_optimizer="false")
    assert module.hparams.offload_reference is True and module.hparams.offload_optimizer is False


def test_kv_bytes_and_the_auto_rules(tiny_moe_config, monkeypatch):
    module = _module(tiny_moe_config)
    # 2 layers x (K + V) x 1 KV head x head_dim 16 x 4 B (fp32) = 256 B a token
    assert kv_bytes_per_token(module.model, module.device) == 256
    ref = list(module.ref_model.parameters())
    ref_bytes = sum(p.numel() for p in ref) * 4
    assert offload.nbytes(ref) == ref_bytes
    opt = [torch.zeros(10), torch.zeros(30)]  # 160 B of optimizer state
    plan = offload.plan_offload
    # on a CPU: auto never moves anything; true is an error naming the key and the reason
    assert plan("auto", "auto", ref, opt, kv_need=10**12, kv_budget=0) == (False, False)
    with pytest.raises(UserError, match="offload_reference: true, but the reference cannot be offloaded: .* on cpu, not CUDA"):
        plan(True, False, ref, opt, kv_need=1, kv_budget=None)
    with pytest.raises(UserError, match="offload_optimizer: true, but the optimizer state cannot"):
        plan(False, True, ref, opt, kv_need=1, kv_budget=None)
    monkeypatch.setattr(offload, "unsupported", lambda tensors, what="it": None)  # as if on a GPU
    # a budget (the paged engine): the reference moves when the KV does not fit; the optimizer state when it still
    # does not fit with half (fraction 0.5) of the reference's bytes added
    assert plan("auto", "auto", ref, opt, kv_need=1000, kv_budget=1000) == (False, False)
    assert plan("auto", "auto", ref, opt, kv_need=1001, kv_budget=1000, fraction=0.5) == (True, False)
    edge = 1000 + ref_bytes // 2
    assert plan("auto", "auto", ref, opt, kv_need=edge, kv_budget=1000, fraction=0.5) == (True, False)
    assert plan("auto", "auto", ref, opt, kv_need=edge + 1, kv_budget=1000, fraction=0.5) == (True, True)
    assert plan(False, "auto", ref, opt, kv_need=1001, kv_budget=1000) == (False, True)  # nothing else moved
    assert plan("auto", "auto", ref, opt, kv_need=10**12, kv_budget=float("inf")) == (False, False)  # kv_cache_gib set
    # no budget (other samplers): the reference when the KV weighs as much; never the optimizer state
    assert plan("auto", "auto", ref, opt, kv_need=ref_bytes, kv_budget=None) == (True, False)
    assert plan("auto", "auto", ref, opt, kv_need=ref_bytes - 1, kv_budget=None) == (False, False)
    assert plan(True, True, ref, opt, kv_need=0, kv_budget=None) == (True, True)
    assert plan("auto", True, [], [], kv_need=10**12, kv_budget=0) == (False, False)  # beta 0, step 0: nothing to move


def test_round_trip_keeps_the_values_and_copies_only_written_tensors(tiny_moe_config, monkeypatch):
    from callbacks.reference import refresh_reference

    module = _module(tiny_moe_config)
    ref = module.ref_model
    params = list(ref.parameters())
    total = offload.nbytes(params)
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    monkeypatch.setattr(offload, "unsupported", lambda tensors, what="it": None)
    moved = offload.HostOffload.of_module(ref)
    assert moved.same_tensors(list(ref.parameters())) and not moved.same_tensors(params[:-1])
    moved.to_host()
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
    state = offload.HostOffload([torch.zeros(4, 3)], "the optimizer state")

    def no_memory(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory\nmore")

    monkeypatch.setattr(torch, "empty", no_memory)
    with pytest.raises(UserError, match=r"^model.init_args.offload_optimizer: cannot hold the optimizer state in host memory "
                                        r"\(0.0 GiB\): CUDA error: out of memory; set it to false$"):
        state.to_host()
    monkeypatch.undo()
    assert not state.on_host and state.host == [None]  # nothing half-moved
    with pytest.raises(UserError, match="cannot offload the optimizer state: the optimizer state holds no tensors"):
        offload.HostOffload([], "the optimizer state")


def test_reserve_pins_once_before_the_first_move_and_moves_nothing(monkeypatch):
    monkeypatch.setattr(offload, "unsupported", lambda tensors, what="it": None)  # as if on a GPU
    t = torch.arange(12.0).view(4, 3)
    state = offload.HostOffload([t], "the optimizer state")
    calls = []
    allocate = offload.HostOffload._allocate_host
    monkeypatch.setattr(offload.HostOffload, "_allocate_host", lambda self: (calls.append(1), allocate(self))[1])
    assert state.reserve() is True and state.reserve() is False and calls == [1]
    assert not state.on_host and state.copied_bytes == 0 and t.data_ptr() != state.host[0].data_ptr()
    state.to_host()  # the reserved buffer: no second allocation, the 48 bytes copied
    assert calls == [1] and state.on_host and state.copied_bytes == 48 and t.data_ptr() == state.host[0].data_ptr()
    assert torch.equal(t, torch.arange(12.0).view(4, 3))


def test_optimizer_state_tensors_are_the_moments_and_master_weights():
    from r1lightning.optim import MasterWeightAdamW

    w = torch.nn.Parameter(torch.ones(3, 2, dtype=torch.bfloat16))
    opt = MasterWeightAdamW([w], lr=0.1)
    assert offload.optimizer_state_tensors(opt) == []  # no state before the first step
    w.grad = torch.ones_like(w)
    opt.step()
    state = offload.optimizer_state_tensors(opt)
    assert sorted(offload.nbytes([t]) for t in state) == [24, 24, 24]  # master, exp_avg, exp_avg_sq: 6 fp32 each
    assert all(t.dtype == torch.float32 and t.shape == (3, 2) for t in state)


def _steps(module, monkeypatch, seen):
    from r1lightning.rollout import Rollout

    tok = module.tokenizer
    texts = ["<think>3</think><answer>3</answer>", "<answer>4</answer>", "no", "<answer>3</answer>"] * 2
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(map(len, ids))
    completion_ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
    completion_mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])

    def generate(prompt_ids, prompt_mask, params, sampler=None):
        seen.append({name: kept.on_host for name, kept in module._offloads.items()})
        return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, torch.zeros(len(ids), dtype=torch.bool))

    monkeypatch.setattr(module, "generate", generate)
    opt = torch.optim.AdamW(module.model.parameters(), lr=0.01)
    module.optimizers = lambda: opt
    module.lr_schedulers = lambda: type("S", (), {"step": lambda self: None})()
    module.manual_backward = lambda loss: loss.backward()
    logged = []
    monkeypatch.setattr(module, "log_step", lambda rollout, total, scores, keep, stats, *a: logged.append(dict(stats)))
    prompts = tok(["1+2=", "2+2="], return_tensors="pt", padding=True, padding_side="left")
    batch = {"prompt_ids": prompts["input_ids"], "prompt_mask": prompts["attention_mask"], "columns": {"answer": ["3", "4"]}}
    for i in range(3):  # step 2 samples with AdamW's moments of step 1 on the host, step 3 with those of step 2
        module.training_step(batch, i)
    return logged, {n: p.detach().clone() for n, p in module.model.named_parameters()}


def test_steps_with_the_reference_and_optimizer_offloaded_equal_steps_without(tiny_moe_config, monkeypatch):
    """false: nothing moves. auto (a sampler without a budget, a KV smaller than the reference): the reference
    is parked on the host for each update and is back on the device for sampling. true: it stays on the host
    through sampling too, and the optimizer state joins it there while sampling. The steps are the same."""
    as_if_on_a_gpu(monkeypatch)
    out = {}
    for setting in (False, "auto", True):
        seen = []
        module = _module(tiny_moe_config, offload_reference=setting, offload_optimizer=setting)
        out[setting] = _steps(module, monkeypatch, seen)
        logged = out[setting][0]
        if setting is True:  # step 1: no optimizer state yet; then both on the host while sampling
            assert seen == [{"reference": True}, {"reference": True, "optimizer": True}, {"reference": True, "optimizer": True}]
            # the moments were copied to the host before steps 2 and 3; the frozen reference only once
            assert module._offloads["optimizer"].copied_bytes == 2 * offload.nbytes(module._offloads["optimizer"].tensors)
        elif setting == "auto":
            assert seen == [{"reference": False}] * 3
        else:
            assert seen == [{}, {}, {}]
        if setting:  # after each reference pass the reference waits on the host; the optimizer state is back
            assert module._offloads["reference"].on_host and not getattr(module._offloads.get("optimizer"), "on_host", False)
            assert module._offloads["reference"].copied_bytes == offload.nbytes(module._offloads["reference"].tensors)
        assert [s["offload/reference"] for s in logged] == [float(setting is True)] * 3
        assert [s["offload/optimizer"] for s in logged] == [0.0] + [float(setting is True)] * 2
        assert [s["offload/reference_update"] for s in logged] == [float(bool(setting))] * 3
    s0, w0 = out[False]
    assert s0[-1]["kl"] > 0  # the reference really entered the loss
    for setting in ("auto", True):
        s1, w1 = out[setting]
        for a, b in zip(s0, s1):
            for k in ("loss", "kl", "grad_norm", "entropy"):
                assert a[k] == b[k], (setting, k)
        assert all(torch.equal(w1[n], w0[n]) for n in w0)


def test_a_host_that_cannot_pin_the_reference_keeps_it_on_the_gpu_under_auto(tiny_moe_config, monkeypatch, caplog):
    monkeypatch.setattr(offload, "unsupported", lambda tensors, what="it": None)

    def cannot(self):
        raise UserError("model.init_args.offload_reference: cannot hold the reference in host memory (0.0 GiB): no; set it to false")

    monkeypatch.setattr(offload.HostOffload, "_allocate_host", cannot)
    module = _module(tiny_moe_config, offload_reference="auto")
    logged, _ = _steps(module, monkeypatch, [])
    assert [s["offload/reference_update"] for s in logged] == [0.0] * 3 and module._park_failed
    assert "auto keeps the reference on the GPU" in caplog.text
    module = _module(tiny_moe_config, offload_reference=True)
    with pytest.raises(UserError, match="cannot hold the reference in host memory"):
        _steps(module, monkeypatch, [])


def test_a_parked_reference_counts_against_the_rollouts_budget(tiny_moe_config, monkeypatch):
    """The paged engine's budget is measured from free memory; with the reference parked on the host that free
    memory includes its bytes, which come back for sampling unless the plan keeps it away: so the plan takes
    them off the budget, and decides as it would with the reference on the device."""
    as_if_on_a_gpu(monkeypatch)
    module = _module(tiny_moe_config)
    batch = {"prompt_ids": torch.zeros(2, 5, dtype=torch.long)}
    need = 2 * 4 * (5 + 12) * kv_bytes_per_token(module.model, module.device)  # B x G rows of P + C tokens
    ref_bytes = offload.nbytes(list(module.ref_model.parameters()))

    class Budget:
        kv_memory_fraction = 0.5
        free = need

        def memory_budget(self, device):
            return self.free

    module.sampler = Budget()
    assert module.rollout_offloads(batch) == {}  # the KV fits with the reference on the device
    module.parked_reference().to_host()
    Budget.free = need + 0.5 * ref_bytes  # the engine would see the reference's bytes free
    assert module.rollout_offloads(batch) == {}
    Budget.free = need + 0.5 * ref_bytes - 1
    assert list(module.rollout_offloads(batch)) == ["reference"]


def test_auto_parks_the_reference_then_keeps_it_away_for_a_long_rollout_and_back_for_its_pass(tiny_moe_config, monkeypatch):
    """The order of the 8,192-token benchmark: a short first step (the KV fits: the reference comes back for
    sampling, is parked after its pass), then long steps (the KV does not fit: it stays on the host through
    sampling and comes back for its pass). The reference pass always finds it on the device; the steps equal
    steps without offloading."""
    as_if_on_a_gpu(monkeypatch)
    runs = {}
    for setting in (False, "auto"):
        module = _module(tiny_moe_config, offload_reference=setting, offload_optimizer=False)

        class Budget:  # the first step's KV fits, the later ones' do not
            kv_memory_fraction = 1.0
            calls = 0

            def memory_budget(self, device):
                Budget.calls += 1
                return float("inf") if Budget.calls == 1 else 0.0

        module.sampler = Budget()
        at_pass = []
        frozen = module.frozen_logprobs

        def record(rollout, model, micro=None):
            if model is module.ref_model and "reference" in module._offloads:
                at_pass.append(module._offloads["reference"].on_host)
            return frozen(rollout, model, micro)

        monkeypatch.setattr(module, "frozen_logprobs", record)
        seen = []
        runs[setting] = _steps(module, monkeypatch, seen)
        if setting == "auto":
            assert seen == [{"reference": False}, {"reference": True}, {"reference": True}]
            assert at_pass == [False, False, False]
            assert [s["offload/reference"] for s in runs[setting][0]] == [0.0, 1.0, 1.0]
    (s0, w0), (s1, w1) = runs[False], runs["auto"]
    assert [a["kl"] for a in s0] == [b["kl"] for b in s1] and all(torch.equal(w1[n], w0[n]) for n in w0)


def test_a_refresh_while_the_reference_is_parked_reaches_the_device(tiny_moe_config, monkeypatch):
    """ReferenceModelRefresh runs after a step's update, when the reference waits on the host: the refresh writes
    the host copy in place, the next copy back brings the refreshed weights, and parking again needs no copy."""
    from callbacks.reference import refresh_reference

    as_if_on_a_gpu(monkeypatch)
    module = _module(tiny_moe_config)
    parked = module.parked_reference()
    parked.to_host()
    with torch.no_grad():
        for p in module.model.parameters():
            p.mul_(0.5)
    refresh_reference(module.model, module.ref_model)
    parked.to_device(background=True)
    parked.wait()
    policy = dict(module.model.named_parameters())
    assert all(torch.equal(p, policy[n]) for n, p in module.ref_model.named_parameters())
    copied = parked.copied_bytes
    parked.to_host()  # the refresh wrote the host copy itself: it is current, parked again without a copy
    assert parked.copied_bytes == copied
    assert all(torch.equal(h, policy[n]) for (n, _), h in zip(module.ref_model.named_parameters(), parked.host))
