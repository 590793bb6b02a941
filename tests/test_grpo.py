import copy
import json

import lightning as L
import pytest
import torch

from r1lightning.cli import R1CLI
from r1lightning.grpo import GRPOModule
from r1lightning.options import GRPOLossOptions, SamplingOptions
from r1lightning.policy import Policy
from r1lightning.rewards import Reward
from r1lightning.rollout import HFGenerateSampler, SamplingParams
from tests import trl_style_reward

ROWS = [{"prompt": f"What is {a}+{b}?", "answer": str(a + b), "source": f"row{i}"} for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (7, 8)])]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def tiny_module(tiny_moe_config, sampling: dict | None = None, loss: dict | None = None, **kwargs):
    """A GRPO module on the tiny MoE: G 4, 6 new tokens, beta 0.04, unless `sampling` / `loss` say otherwise."""
    torch.manual_seed(0)
    args = dict(micro_batch_size=16, sampling=SamplingOptions(**{"num_samples": 4, "max_new_tokens": 6, **(sampling or {})}),
                loss=GRPOLossOptions(**{"beta": 0.04, **(loss or {})}))
    args.update(kwargs)
    module = GRPOModule(Policy(config=tiny_moe_config, tokenizer="char"), rewards=[Reward("accuracy")], **args)
    module.configure_model()
    return module


def record_gradients(module) -> dict:
    """Run `module`'s manual optimisation without an optimizer: each optimizer step records the accumulated
    gradients (by parameter name) into the returned dict instead of stepping."""
    grads = {}

    class Opt:
        param_groups = [{"lr": 0.0}]
        state: dict = {}  # no moments to offload

        def step(self):
            grads.update({n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None})

        def zero_grad(self, set_to_none=True):
            module.model.zero_grad()

    module.optimizers = lambda: Opt()
    module.lr_schedulers = lambda: type("S", (), {"step": lambda self: None})()
    module.manual_backward = lambda loss: loss.backward()
    return grads


def grpo_fit_config(tiny_moe_config, train_file, rewards: list[dict], **model_args) -> dict:
    """A 4-step CPU `fit` config of the tiny MoE: G 4, 6 new tokens, mu 2, dynamic sampling, 2 prompts a batch."""
    init_args = {"policy": {"class_path": "r1lightning.Policy", "init_args": {"config": tiny_moe_config, "tokenizer": "char"}},
                 "rewards": rewards, "sampling": {"num_samples": 4, "max_new_tokens": 6}, "num_iterations": 2,
                 "micro_batch_size": 3, "dynamic_sampling": True, "dynamic_sampling_rounds": 1, **model_args}
    return {
        "seed_everything": 0,
        "trainer": {"max_steps": 4, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "limit_val_batches": 0, "enable_model_summary": False},
        "model": {"class_path": "r1lightning.grpo.GRPOModule", "init_args": init_args},
        "data": {"class_path": "r1lightning.data.PromptDataModule", "init_args": {"train_files": str(train_file), "batch_size": 2}},
    }


def test_trl_reward_from_yaml_gets_the_dataset_columns(prompts_file, tmp_path, tiny_moe_config, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = grpo_fit_config(tiny_moe_config, prompts_file,
                             [{"fn": "tests.trl_style_reward.my_reward", "weight": 1.0}, {"fn": "format", "weight": 0.5}])
    cfg = tmp_path / "grpo.yaml"
    cfg.write_text(json.dumps(config))
    trl_style_reward.CALLS.clear()
    cli = R1CLI(args=["fit", "-c", str(cfg)])
    # 2 batches of prompts x mu=2 optimizer steps each.
    assert cli.trainer.global_step == 4
    first = trl_style_reward.CALLS[0]
    assert len(first["answer"]) == 8  # 2 prompts x G=4, each gold answer repeated per completion
    assert first["answer"][:4] == [first["answer"][0]] * 4
    assert set(first["kwargs"]["source"]) <= {r["source"] for r in ROWS}
    # As TRL passes them: the prompt column arrives as `prompts` (the dataset's strings), not as a keyword.
    assert "completion_ids" in first["kwargs"] and "trainer_state" in first["kwargs"] and "prompt" not in first["kwargs"]
    assert set(first["prompts"]) <= {r["prompt"] for r in ROWS}
    logged = cli.trainer.logged_metrics
    for key in ("train/reward", "train/reward_std", "train/rewards/my_reward/mean", "train/frac_reward_zero_std", "train/kl",
                "train/clip_ratio/low_mean", "train/clip_ratio/high_mean", "train/clip_ratio/region_mean", "train/entropy",
                "train/completions/mean_length", "train/completions/clipped_ratio", "train/time/rollout", "train/time/train",
                "train/tokens_per_s"):
        assert key in logged, key


def _fixed_rollout(module):
    tok = module.tokenizer
    texts = ["<|user|>What is 1+2?<|end|><|assistant|>", "<|user|>What is 13+24?<|end|><|assistant|>"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, ids))
    prompt_ids = torch.tensor([[0] * (width - len(x)) + x for x in ids]).repeat_interleave(4, 0)
    prompt_mask = (prompt_ids != 0).long()
    torch.manual_seed(1)
    return HFGenerateSampler().generate(module.model, prompt_ids, prompt_mask, SamplingParams(6), tok.eos_token_id, tok.pad_token_id)


@pytest.mark.parametrize("aggregation", ["grpo", "dr_grpo", "dapo"])
def test_micro_batching_gives_the_same_update_as_one_batch(tiny_moe_config, aggregation):
    """Gradient accumulation over uneven micro-batches must equal the full-batch gradient."""
    results = []
    for micro in (8, 3):
        module = tiny_module(tiny_moe_config, micro_batch_size=micro, loss={"aggregation": aggregation}, router_aux_loss_coef=0.0)
        rollout = _fixed_rollout(module)
        advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.2, 0.0, -0.2, 0.1])
        module.trainer = None
        grads = record_gradients(module)
        ref = module.frozen_logprobs(rollout, module.ref_model)
        module.optimise(rollout, advantages, rollout.completion_mask.float(), None, ref)
        results.append(grads)
    assert results[0].keys() == results[1].keys() and results[0]
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-4, atol=1e-7)


def test_prepared_layouts_are_built_once_per_micro_batch_and_give_the_same_update(tiny_moe_config):
    """The step lays out every micro-batch once, from one host copy, and the reference and update passes
    reuse it; gradients, reference log-probs and logged metrics equal those of per-pass layouts."""
    runs = []
    for prepared in (False, True):
        module = tiny_module(tiny_moe_config, micro_batch_size=3, router_aux_loss_coef=0.0)
        rollout = _fixed_rollout(module)
        advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.2, 0.0, -0.2, 0.1])
        mask = rollout.completion_mask.float()
        mask[5] = 0  # a row without a loss is in no micro-batch
        module.trainer = None
        grads, builds = record_gradients(module), []
        build = module._build_layout
        module._build_layout = lambda r, rows: builds.append(list(rows)) or build(r, rows)
        micro = module.micro_batches(rollout, mask)
        if prepared:
            module.prepare_layouts(rollout, micro)
        ref = module.frozen_logprobs(rollout, module.ref_model, micro)
        stats = module.optimise(rollout, advantages, mask, None, ref, micro)
        runs.append((grads, ref, stats, builds, micro))
    (g0, ref0, stats0, builds0, micro), (g1, ref1, stats1, builds1, _) = runs
    assert len(micro) == 3 and all(5 not in rows for rows in micro)  # 7 rows in 3s
    assert builds0 == micro * 2 and builds1 == micro  # reference + update passes, or once
    torch.testing.assert_close(ref1, ref0, rtol=0, atol=0)
    assert g0.keys() == g1.keys() and g0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=0)
    assert stats1.keys() == stats0.keys() and all(isinstance(v, float) for v in stats1.values())
    for k in stats0:
        assert stats1[k] == pytest.approx(stats0[k], rel=1e-6, abs=1e-9), k


def test_training_logprobs_match_the_sampler_with_left_padding(tiny_moe_config):
    """Positions follow the attention mask, so the training forward reproduces generate's log-probs."""
    module = tiny_module(tiny_moe_config, sampling={"temperature": 1.0})
    rollout = _fixed_rollout(module)
    module.model.eval()
    with torch.no_grad():
        logp, _, _ = module.completion_logprobs(rollout, slice(None))
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(logp[mask], rollout.logprobs[mask], rtol=1e-4, atol=1e-4)


def test_beta_zero_loads_no_reference(tiny_moe_config):
    assert tiny_module(tiny_moe_config, loss={"beta": 0.0}).ref_model is None
    module = tiny_module(tiny_moe_config, loss={"beta": 0.1})
    assert module.ref_model is not None and not any(p.requires_grad for p in module.ref_model.parameters())
    names = {id(p) for g in module.configure_optimizers.__self__.model.parameters() for p in [g]}
    assert not names & {id(p) for p in module.ref_model.parameters()}


def test_bad_options_are_rejected(tiny_moe_config):
    with pytest.raises(ValueError, match="loss.aggregation: 'mean' is not one of"):
        GRPOModule(Policy(config=tiny_moe_config, tokenizer="char"), rewards=[Reward("accuracy")], loss=GRPOLossOptions(aggregation="mean"))
    with pytest.raises(ValueError, match="GRPO needs at least 2 completions per prompt"):
        GRPOModule(Policy(config=tiny_moe_config, tokenizer="char"), rewards=[Reward("accuracy")], sampling={"num_samples": 1})
    # The flat arguments of earlier versions name their new place, from Python as from YAML.
    with pytest.raises(ValueError, match="^`temperature` moved: use `sampling.temperature`$"):
        GRPOModule(Policy(config=tiny_moe_config, tokenizer="char"), rewards=[Reward("accuracy")], temperature=0.7)
    with pytest.raises(ValueError, match="unknown|not registered|accuraccy"):
        Reward("accuraccy")
    with pytest.raises(ValueError, match="^model.reference_micro_batch_tokens: must be >= 1 or null, got 0$"):
        GRPOModule(Policy(config=tiny_moe_config, tokenizer="char"), rewards=[Reward("accuracy")], reference_micro_batch_tokens=0)


def test_update_recomputes_checkpointed_layers_while_the_policy_stays_in_eval_mode(tiny_moe_config):
    """transformers checkpoints a layer only in training mode; the policy is in eval mode, so the update
    must switch checkpointing on itself (each layer's MLP then runs twice: forward and recompute)."""
    from r1lightning.module import checkpointing_on

    module = tiny_module(tiny_moe_config)
    model = module.model.eval()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    layer = model.model.layers[0]
    layer.mlp.register_forward_pre_hook(lambda m, a: calls.append(1))
    ids = torch.randint(0, 20, (2, 7))

    def mlp_runs():
        calls.clear()
        model(input_ids=ids).logits.sum().backward()
        return len(calls)

    assert mlp_runs() == 1  # eval mode: transformers stores every activation
    with checkpointing_on(model):
        assert mlp_runs() == 2  # recomputed in backward
        assert not layer.mlp.training and not layer.self_attn.training  # children stay in eval mode
    assert not layer.training  # restored


def test_sampler_logprobs_requested_but_missing_is_an_error(tiny_moe_config, monkeypatch):
    """Without sampler log-probs the 'old' policy would silently be the current one (ratio 1, no clipping)."""
    from r1lightning.errors import UserError
    from r1lightning.rollout import HFGenerateSampler

    module = tiny_module(tiny_moe_config, sampler=HFGenerateSampler(return_logprobs=False), use_sampler_logprobs=True)
    ids = module.tokenizer(["1+2="], return_tensors="pt")
    batch = {"prompt_ids": ids["input_ids"], "prompt_mask": ids["attention_mask"], "columns": {"answer": ["3"]}}
    monkeypatch.setattr(module, "log_step", lambda *a, **k: None)
    with pytest.raises(UserError, match="use_sampler_logprobs: the sampler \\(HFGenerateSampler\\) returned no log-probs"):
        module.training_step(batch, 0)


def test_dynamic_sampling_returns_new_objects_and_leaves_its_arguments_alone(tiny_moe_config):
    """resample_flat_groups replaces the flat groups' rows in new objects; the rollout, rewards and scores it
    was given (the caller may still hold them, e.g. for logging) keep their values."""
    from r1lightning.rewards import RewardComposer

    module = tiny_module(tiny_moe_config, dynamic_sampling=True, dynamic_sampling_rounds=1)
    module.rewards = RewardComposer([Reward("tests.test_grpo.row_reward")])
    _ROW_REWARD_CALLS[0] = 0
    ids = module.tokenizer(["1+2=", "3+4="], return_tensors="pt", padding=True)
    batch = {"prompt_ids": ids["input_ids"], "prompt_mask": ids["attention_mask"], "columns": {"answer": ["3", "7"]}}
    torch.manual_seed(0)
    rollout, _, total, scores = module.rollout(batch)
    # Group 0 flat (every reward 1.0), group 1 varied: only group 0 is re-sampled.
    total = torch.tensor([1.0] * 4 + [0.0, 1.0, 0.0, 1.0])
    before = (copy.deepcopy(rollout), total.clone(), copy.deepcopy(scores))
    new_rollout, new_total, new_scores, keep = module.resample_flat_groups(batch, rollout, total, scores)
    old_rollout, old_total, old_scores = before
    for name in ("completion_ids", "completion_mask", "truncated"):
        assert torch.equal(getattr(rollout, name), getattr(old_rollout, name)), name
    assert torch.equal(total, old_total)
    assert scores.completions == old_scores.completions and torch.equal(scores.unscorable, old_scores.unscorable)
    for name, values in scores.per_fn.items():
        torch.testing.assert_close(values, old_scores.per_fn[name], rtol=0, atol=0, equal_nan=True)
    assert new_rollout is not rollout and new_total is not total and new_scores is not scores
    assert keep.shape == (8,) and keep[4:].all()  # the varied group is kept as it was
    assert torch.equal(new_total[4:], total[4:]) and new_scores.completions[4:] == scores.completions[4:]
    # The retry varied, so group 0 was replaced in the new objects only.
    assert new_total[:4].tolist() == [0.0, 1.0, 0.0, 1.0] and keep[:4].all()
    assert new_scores.per_fn["row_reward"][:4].tolist() == [0.0, 1.0, 0.0, 1.0] and scores.per_fn["row_reward"][:4].tolist() == [1.0] * 4


_ROW_REWARD_CALLS = [0]


def row_reward(prompts, completions, **kwargs):
    """Varies within a group on every call after the first (the retry gives the flat group variance)."""
    _ROW_REWARD_CALLS[0] += 1
    return [float(i % 2) if _ROW_REWARD_CALLS[0] > 1 else 1.0 for i in range(len(completions))]


def test_sft_recomputes_checkpointed_layers_of_a_policy_in_eval_mode(tiny_moe_config):
    """SFT from a from_pretrained checkpoint (eval mode, which Lightning keeps): the step's forward still
    recomputes each checkpointed layer in backward."""
    from r1lightning import Policy
    from r1lightning.sft import SFTModule

    module = SFTModule(Policy(config=tiny_moe_config, tokenizer="char"))
    module.configure_model()
    model = module.model.eval()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda m, a: calls.append(1))
    module.log = lambda *a, **k: None
    ids = torch.randint(0, 20, (2, 7))
    labels = ids.clone()
    labels[:, :3] = -100
    module.training_step({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}, 0).backward()
    assert len(calls) == 2 and not model.model.layers[0].training


def test_a_batch_whose_groups_all_score_alike_leaves_the_policy_unchanged(tiny_moe_config, monkeypatch):
    """Every completion has the R1 format and a wrong answer: 1.0 x 0 + 0.1 x 1 = 0.1 each, every group flat
    (frac_reward_zero_std 1), nothing to learn. The float mean of a group of 0.1 is 0.1 + 1 ulp, and the
    advantages were -7.45e-5 instead of 0; Adam (fp32 master weights, bf16 policy as on the GPU) scaled that
    gradient to learning-rate-sized steps on every weight, twice per batch (mu = 2)."""
    from r1lightning.optim import MasterWeightAdamW
    from r1lightning.rewards import RewardComposer
    from r1lightning.rollout import Rollout

    module = tiny_module(tiny_moe_config, sampling={"num_samples": 8, "max_new_tokens": 40}, loss={"beta": 0.0},
                         num_iterations=2, router_aux_loss_coef=0.0, micro_batch_size=None, micro_batch_tokens=256)
    module.model.to(torch.bfloat16)
    module.rewards = RewardComposer([Reward("accuracy", weight=1.0), Reward("format", weight=0.1)])
    tok = module.tokenizer
    texts = [f"<think>{a}+{b}={a + b + 1}</think><answer>{a + b + 1}</answer>" for a, b in [(1, 2), (3, 4)] for _ in range(8)]
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(map(len, ids))
    completion_ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
    completion_mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])

    def generate(prompt_ids, prompt_mask, params, sampler=None):
        return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, torch.zeros(len(ids), dtype=torch.bool))

    monkeypatch.setattr(module, "generate", generate)
    opt = MasterWeightAdamW(module.model.parameters(), lr=5e-5, weight_decay=0.0, betas=(0.9, 0.99))
    module.optimizers = lambda: opt
    module.lr_schedulers = lambda: type("S", (), {"step": lambda self: None})()
    module.manual_backward = lambda loss: loss.backward()
    logged = {}
    monkeypatch.setattr(module, "log_step", lambda rollout, total, scores, keep, stats, *a: logged.update(stats, total=total))
    prompts = tok(["1+2=", "3+4="], return_tensors="pt", padding=True, padding_side="left")
    batch = {"prompt_ids": prompts["input_ids"], "prompt_mask": prompts["attention_mask"], "columns": {"answer": ["3", "7"]}}
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    module.training_step(batch, 0)
    assert torch.allclose(logged["total"], torch.full((16,), 0.1)) and opt.state  # scored as meant; the optimizer stepped
    moved = [n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])]
    assert not moved, moved
    assert logged["loss"] == 0.0 and logged["grad_norm"] == 0.0


def _ragged_rollout():
    """8 sequences of 9 to 39 tokens (left-padded prompts of 3-12, completions of 2-30): under a budget of 160
    tokens the packed update runs 2 micro-batches, one row holding two sequences."""
    from r1lightning.rollout import Rollout

    g = torch.Generator().manual_seed(0)
    prompt_len, completion_len = torch.tensor([9, 4, 12, 3, 9, 7, 5, 12]), torch.tensor([30, 5, 20, 9, 3, 25, 14, 2])
    prompt_mask = (torch.arange(12)[None] >= 12 - prompt_len[:, None]).long()
    mask = (torch.arange(30)[None] < completion_len[:, None]).long()
    return Rollout(torch.randint(5, 60, (8, 12), generator=g) * prompt_mask, prompt_mask,
                   torch.randint(5, 60, (8, 30), generator=g) * mask, mask, torch.zeros(8, dtype=torch.bool))


def test_first_iteration_ratio_is_exactly_one_in_bf16_packed_with_checkpointing(tiny_moe_config):
    """With mu > 1 the old log-probs come from a no-grad forward outside the update and the first iteration's
    from the update's own forward (grad, checkpointed layers in training mode): they must be the same numbers,
    or the first step already clips. bf16 weights, packed rows of two sequences, as on the GPU."""
    from r1lightning.module import checkpointing_on

    module = tiny_module(tiny_moe_config, loss={"beta": 0.0}, num_iterations=2, micro_batch_size=None, micro_batch_tokens=160)
    model = module.model.to(torch.bfloat16).eval()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rollout = _ragged_rollout()
    micro = module.micro_batches(rollout, rollout.completion_mask.float())
    old = module.frozen_logprobs(rollout, model, micro)
    with checkpointing_on(model):
        for rows in micro:
            logp, _, _ = module.completion_logprobs(rollout, rows, with_entropy=True)
            assert logp.requires_grad
            on = rollout.completion_mask[rows].bool()
            assert torch.equal(logp.detach()[on], old[rows][on])


@pytest.mark.parametrize("packing", [True, False])
def test_logged_loss_and_clip_fractions_are_the_whole_batch_values_over_micro_batches_and_iterations(tiny_moe_config, packing):
    """The logged `loss` is the batch's loss and `clip_ratio/*` the batch's token fractions (<= 1), averaged over
    the mu iterations, whatever the micro-batches and layout. Old log-probs 0.5 away from the policy's make
    most tokens clip; an optimizer that does not move keeps every iteration the same."""
    from r1lightning.losses import grpo_loss

    kw = dict(micro_batch_size=None, micro_batch_tokens=160) if packing else dict(micro_batch_size=3)
    module = tiny_module(tiny_moe_config, loss={"beta": 0.0}, num_iterations=2, packing=packing, router_aux_loss_coef=0.0, **kw)
    rollout = _ragged_rollout()
    mask = rollout.completion_mask.float()
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.2, 0.0, -0.2, 0.1])
    micro = module.micro_batches(rollout, mask)
    assert len(micro) > 1
    if packing:
        assert any(len(module.layout(rollout, rows).input_ids) < len(rows) for rows in micro)  # rows hold 2+ sequences
    logp = module.frozen_logprobs(rollout, module.model, micro)
    old = logp + torch.tensor([-0.5, 0.5, -0.5, 0.5, 0.0, 0.5, 0.5, -0.5])[:, None]  # ratio e^0.5 or e^-0.5 (or 1)
    record_gradients(module)
    stats = module.optimise(rollout, advantages, mask, old, None, micro)
    want_loss, want = grpo_loss(logp, old, advantages, mask, epsilon_low=0.2, epsilon_high=0.2)
    assert 0.3 < float(want["clip_ratio/region_mean"]) <= 1.0
    torch.testing.assert_close(torch.tensor(stats["loss"]), want_loss, rtol=1e-5, atol=1e-6)
    for k, v in want.items():
        torch.testing.assert_close(torch.tensor(stats[k]), v, rtol=1e-5, atol=1e-6)


def test_reference_pass_runs_larger_micro_batches_and_gives_the_same_update(tiny_moe_config, monkeypatch):
    """The reference pass (no gradients) packs 4 x the update's token budget by default: here one forward
    instead of the update's two, with the same reference log-probs (fp32, 1e-6), hence the same KL and the
    same gradients as a reference pass over the update's own micro-batches."""
    runs = {}
    for ref_tokens in (None, 160):
        module = tiny_module(tiny_moe_config, micro_batch_size=None, micro_batch_tokens=160,
                             reference_micro_batch_tokens=ref_tokens, router_aux_loss_coef=0.0)
        with torch.no_grad():  # a reference that differs from the policy, so the KL term has a gradient
            for p in module.ref_model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        rollout = _ragged_rollout()
        monkeypatch.setattr(module, "generate", lambda *a, sampler=None, rollout=rollout: rollout)
        grads, logged = record_gradients(module), {}
        monkeypatch.setattr(module, "log_step", lambda rollout, total, scores, keep, stats, *a: logged.update(stats))
        batch = {"prompt_ids": rollout.prompt_ids[::4], "prompt_mask": rollout.prompt_mask[::4], "columns": {"answer": ["1", "2"]}}
        module.training_step(batch, 0)
        runs[ref_tokens] = grads, logged
    (g_big, big), (g_same, same) = runs[None], runs[160]
    assert (big["update/micro_batches"], big["reference/micro_batches"]) == (2, 1)
    assert (same["update/micro_batches"], same["reference/micro_batches"]) == (2, 2)
    assert same["kl"] > 1e-4 and big["kl"] == pytest.approx(same["kl"], rel=1e-6)
    assert g_big.keys() == g_same.keys() and g_big
    for name in g_big:
        torch.testing.assert_close(g_big[name], g_same[name], rtol=1e-5, atol=1e-7)


def test_cudnn_attention_auto_follows_shapes_that_recur_across_steps(tiny_moe_config, monkeypatch):
    """Policy.cudnn_attention auto: a micro-batch may use cuDNN attention (forward and the backward that
    recomputes it) only when its input shape ran in an earlier step; within a step every pass over a shape
    gets the same answer; a shape unseen for more than the window is forgotten."""
    from r1lightning.cudnn_gate import RecurringShapes

    gate = RecurringShapes(window=2)
    gate.next_step()
    assert [gate.allow((4, 10)), gate.allow((4, 10))] == [False, False]  # new this step: no plan built yet
    gate.next_step()
    assert [gate.allow((4, 10)), gate.allow((2, 7)), gate.allow((4, 10))] == [True, False, True]
    gate.next_step()
    gate.next_step()
    gate.next_step()  # (4, 10) last ran three steps ago
    assert not gate.allow((4, 10))

    module = tiny_module(tiny_moe_config, micro_batch_size=None, micro_batch_tokens=160, router_aux_loss_coef=0.0)
    assert module.policy.cudnn_attention == "auto"
    rollout = _ragged_rollout()
    monkeypatch.setattr(module, "generate", lambda *a, sampler=None, rollout=rollout: rollout)
    record_gradients(module)
    flags = []
    forward = module.forward_logprobs
    monkeypatch.setattr(module, "forward_logprobs", lambda *a, **k: flags.append(("f", torch.backends.cuda.cudnn_sdp_enabled()))
                        or forward(*a, **k))
    backward = module.manual_backward
    monkeypatch.setattr(module, "manual_backward", lambda loss: flags.append(("b", torch.backends.cuda.cudnn_sdp_enabled()))
                        or backward(loss))
    monkeypatch.setattr(module, "log_step", lambda *a: None)
    batch = {"prompt_ids": rollout.prompt_ids[::4], "prompt_mask": rollout.prompt_mask[::4], "columns": {"answer": ["1", "2"]}}
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        steps = []
        for i in range(2):
            flags.clear()
            module.training_step(batch, i)
            steps.append(list(flags))
            assert torch.backends.cuda.cudnn_sdp_enabled() is False  # restored after each micro-batch
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
    # one reference forward (its 4x budget) and two update micro-batches, each a forward and a backward
    assert [k for k, _ in steps[0]] == ["f", "f", "b", "f", "b"]
    assert all(not on for _, on in steps[0])  # step 1: every shape is new
    # step 2: the same rollout, the same shapes: cuDNN for each pass
    assert all(on for _, on in steps[1])


def test_sampler_correction_weighs_each_row_by_its_ratio_to_the_sampler(tiny_moe_config):
    """`loss.sampler_correction: token_truncate`: a sampler whose log-probs sit log 2 below the training
    forward's on rows 0-3, log 5 below on row 6 (truncated at 3) and equal elsewhere gives the update of
    advantages scaled by 2, 3 and 1 without the correction (the KL term, unweighted, is the same in both)."""
    import dataclasses

    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.2, 0.0, -0.2, 0.1])
    scale = torch.tensor([2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 3.0, 1.0])  # row 6: ratio 5, truncated at the default 3
    runs = []
    for corrected in (True, False):
        module = tiny_module(tiny_moe_config, micro_batch_size=3, router_aux_loss_coef=0.0,
                             loss={"sampler_correction": "token_truncate"} if corrected else None)
        rollout = _fixed_rollout(module)
        module.trainer = None
        train = module.frozen_logprobs(rollout, module.model)
        shift = torch.log(torch.tensor([2.0] * 4 + [1.0, 1.0, 5.0, 1.0]))[:, None]
        rollout = dataclasses.replace(rollout, logprobs=(train - shift) * rollout.completion_mask)
        grads = record_gradients(module)
        ref = module.frozen_logprobs(rollout, module.ref_model)
        module.optimise(rollout, advantages if corrected else advantages * scale, rollout.completion_mask.float(), None, ref)
        runs.append(grads)
    assert runs[0] and runs[0].keys() == runs[1].keys()
    for name in runs[0]:
        torch.testing.assert_close(runs[0][name], runs[1][name], rtol=1e-4, atol=1e-7)


def test_sampler_correction_needs_the_samplers_log_probs(tiny_moe_config):
    from r1lightning.errors import UserError

    with pytest.raises(UserError, match="sampler_correction with use_sampler_logprobs: true"):
        tiny_module(tiny_moe_config, loss={"sampler_correction": "token_mask"}, use_sampler_logprobs=True)
    with pytest.raises(UserError, match="loss.sampler_correction: 'token' is not one of token_truncate"):
        GRPOLossOptions(sampler_correction="token")
    with pytest.raises(UserError, match="set sampler_correction_min or sampler_correction_max"):
        GRPOLossOptions(sampler_correction="token_truncate", sampler_correction_max=None)
    with pytest.raises(UserError, match="need 0 <= min < max, got 4.0 / 3.0"):
        GRPOLossOptions(sampler_correction="sequence_mask", sampler_correction_min=4.0)
    module = tiny_module(tiny_moe_config, loss={"sampler_correction": "token_truncate"},
                         sampler=HFGenerateSampler(return_logprobs=False))
    batch = {"prompt_ids": torch.tensor([[5, 6, 7]]), "prompt_mask": torch.ones(1, 3, dtype=torch.long),
             "columns": {"answer": ["3"]}}
    module.trainer = None
    record_gradients(module)
    with pytest.raises(UserError, match="the sampler \\(HFGenerateSampler\\) returned no log-probs"):
        module.training_step(batch, 0)


def test_engine_counters_add_up_over_a_steps_sampling_calls():
    """`rollout/*`: summed over a step's sampling calls (dynamic sampling's retries) or the largest; a sampler
    without counters, or a counter it does not keep, logs nothing."""
    from r1lightning.rollout.base import add_engine_stats

    step = {}
    add_engine_stats(step, {"steps": 96, "preempted": 2, "prefill_tokens": 640, "max_live": 128,
                            "kv_bytes": 3 * 2**30, "decode_s": None})
    add_engine_stats(step, {"steps": 40, "preempted": 0, "prefill_tokens": 96, "max_live": 16, "kv_bytes": 2**30})
    add_engine_stats(step, None)  # transformers' generate keeps none
    assert step == {"rollout/decode_steps": 136.0, "rollout/preempted": 2.0, "rollout/prefill_tokens": 736.0,
                    "rollout/max_live": 128.0, "rollout/kv_GiB": 3.0}
    static = {}  # the static engine keeps no slot counters
    add_engine_stats(static, {"steps": 5, "prefill_tokens": 12, "kv_bytes": 2**29})
    assert static == {"rollout/decode_steps": 5.0, "rollout/prefill_tokens": 12.0, "rollout/kv_GiB": 0.5}
