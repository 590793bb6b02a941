"""Numbers behind a GRPO update on this machine, for the long-reasoning recipe's settings (one JSON line).

The policy is the long-sum SFT model's shape (configs/gpu/long_sft.yaml: 126 M-parameter Qwen3-MoE, char
tokenizer) with random weights, or `--model` (a save_pretrained directory, e.g. runs/gpu/long_sft/model), in
bf16 with the `auto` MoE backend (MegaBlocks on a GPU that has it) and torch's default dtype bf16, as
Lightning's `bf16-true` runs a training step. `StaticCacheSampler` samples `--prompts` x G 8 completions at
temperature 1, top-p 0.9: with `--model` for the recipe's held-out long sums, scored by accuracy + 0.1 format;
with random weights for random prompts, EOS forced at lengths over [--tokens / 4, --tokens] (packed rows then
hold several sequences) and two of each group's eight scored 1.1, the rest 0.1. Reported:

- `flat_adv_old`: the advantage every completion of a group of eight 0.1 rewards got before commit b5d1b0a
  ((r - mean) / (std + 1e-4) on this device); `flat_adv`: what `group_advantages` gives now (0);
- `first_iter_max_abs`: max |log-prob| difference between the frozen no-grad forward (the "old" policy with
  mu > 1) and the update's forward with grad: 0 means the first iteration's ratio is exactly 1;
- `packed_vs_padded_max_abs`: the packed layout (position ids restarting, no mask) against padded rows;
- `sampler_vs_train_*`: the sampler's log-probs (CUDA-graph decode, decode experts) against the update's;
- `update`: one batch's update (`optimise`: mu 2 optimizer steps, MasterWeightAdamW at `--lr`, no warmup) and
  `logp_change_mean_abs`, how far it moved the completion tokens' log-probs (a 1,000-token chain survives
  only a small change per token); with `--model`, `accuracy` of the batch and of a second batch sampled after
  the update (`accuracy_after`, the same prompts and seed).

  python scripts/check_grpo_numerics.py                                   # GPU, random weights
  python scripts/check_grpo_numerics.py --model runs/gpu/long_sft/model --lr 5e-5   # the recipe's start
  python scripts/check_grpo_numerics.py --device cpu --prompts 1 --tokens 48 --micro-batch-tokens 600  # smoke
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RECIPE = Path(__file__).resolve().parents[1] / "configs/gpu/long_sft.yaml"  # the model shape and the task


def recipe() -> tuple[dict, dict]:
    """(model config, LongSumTask arguments) of the long-reasoning SFT recipe."""
    import yaml

    cfg = yaml.safe_load(RECIPE.read_text())
    return cfg["model"]["init_args"]["policy"]["init_args"]["config"], cfg["data"]["init_args"]["task"]["init_args"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a save_pretrained directory (default: random weights, the SFT model's shape)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=1152)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--micro-batch-tokens", type=int, default=90112)
    args = parser.parse_args(argv)

    from r1lightning.grpo import GRPOModule
    from r1lightning.logprobs import padded_layout
    from r1lightning.losses import group_advantages, nanstd
    from r1lightning.module import checkpointing_on
    from r1lightning.optim import MasterWeightAdamW
    from r1lightning.options import GRPOLossOptions, SamplingOptions
    from r1lightning.policy import Policy
    from r1lightning.rewards import Reward
    from r1lightning.rollout import SamplingParams, StaticCacheSampler

    t0 = time.perf_counter()
    device, G = torch.device(args.device), 8
    torch.manual_seed(0)
    shape, task_args = recipe()
    policy = (Policy(name_or_path=args.model, dtype="bfloat16") if args.model
              else Policy(config=shape, tokenizer="char", dtype="bfloat16"))
    module = GRPOModule(policy, rewards=[Reward("accuracy")], sampler=StaticCacheSampler(cuda_graphs=device.type == "cuda"),
                        sampling=SamplingOptions(num_samples=G, max_new_tokens=args.tokens, temperature=1.0, top_p=0.9),
                        loss=GRPOLossOptions(beta=0.0, epsilon_low=0.2, epsilon_high=0.28), num_iterations=2,
                        micro_batch_tokens=args.micro_batch_tokens, router_aux_loss_coef=0.0)
    module.configure_model()
    model = module.model.to(device=device, dtype=torch.bfloat16).eval()  # buffers too (rotary), as bf16-true converts
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "moe_backend": policy.moe_backend_in_effect, "attn": model.config._attn_implementation}
    import transformers

    out["transformers"] = transformers.__version__
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as Lightning's bf16-true does around a training step
    try:
        # 32 groups of eight format-only scores (accuracy 0 + format 1 x 0.1, fp32 as RewardComposer sums them),
        # through the reductions the advantages used before b5d1b0a
        flat = (torch.zeros(32 * G, device=device, dtype=torch.float32) * 1.0 + 0.1).view(32, G)
        old_adv = (flat - torch.nanmean(flat, dim=1, keepdim=True)) / (nanstd(flat, dim=1, keepdim=True) + 1e-4)
        out["flat_adv_old"] = float(old_adv.abs().max())
        out["flat_adv"] = float(group_advantages(flat.reshape(-1), G).abs().max())

        N = args.prompts * G
        tok = module.tokenizer
        g = torch.Generator().manual_seed(0)
        params = SamplingParams(args.tokens, temperature=1.0, top_p=0.9, seed=0)
        if args.model:
            from r1lightning.data.chat import left_pad
            from r1lightning.evaluation import encode_problems
            from r1lightning.rewards import RewardComposer
            from r1lightning.tasks import LongSumTask

            rows = LongSumTask(**{**task_args, "num_train": 1, "num_test": args.prompts}).splits()["test"]
            prompt_ids, prompt_mask = (t.repeat_interleave(G, 0) for t in left_pad(encode_problems(tok, rows), tok.pad_token_id))
            columns = {"answer": [r["answer"] for r in rows for _ in range(G)]}
            rewards = RewardComposer([Reward("accuracy", weight=1.0), Reward("format", weight=0.1)])

            def sample():
                r = module.sampler.generate(model, prompt_ids.to(device), prompt_mask.to(device), params, tok.eos_token_id, tok.pad_token_id)
                scores = module.score(r, columns, rewards)
                return r, scores.total.float(), float(scores.per_fn["accuracy"].nanmean())

            rollout, total, out["accuracy"] = sample()
        else:
            prompt_len = torch.randint(40, 100, (args.prompts,), generator=g).repeat_interleave(G)
            prompt_mask = (torch.arange(100)[None] >= 100 - prompt_len[:, None]).long()
            prompt_ids = torch.randint(20, 60, (N, 100), generator=g) * prompt_mask
            forced = torch.randint(max(1, args.tokens // 4), args.tokens + 1, (N,), generator=g)
            rollout = module.sampler.generate(model, prompt_ids.to(device), prompt_mask.to(device), params,
                                              tok.eos_token_id, tok.pad_token_id, forced_lengths=forced.to(device))
            total = torch.full((N,), 0.1, dtype=torch.float32)
            total[:: G // 2] = 1.1  # two correct completions per group (accuracy 1 + format 0.1)
        mask = rollout.completion_mask.float()
        on = mask.bool()
        micro = module.micro_batches(rollout, mask)
        out["sequences_per_row"] = round(N / sum(len(module.layout(rollout, rows).input_ids) for rows in micro), 2)
        old = module.frozen_logprobs(rollout, model, micro)
        with torch.no_grad():
            padded = torch.zeros_like(old)
            for i in range(0, N, 16):
                rows = list(range(i, min(i + 16, N)))
                padded[rows] = module.forward_logprobs(padded_layout(rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                                                     rollout.completion_mask, rows), model, 1.0)[0]
        out["packed_vs_padded_max_abs"] = float((old - padded)[on].abs().max())
        d = (rollout.logprobs.float() - old)[on].abs()
        out["sampler_vs_train_mean_abs"], out["sampler_vs_train_max_abs"] = float(d.mean()), float(d.max())
        out["sampler_vs_train_frac_gt_0.1"] = float((d > 0.1).float().mean())
        first = 0.0
        with checkpointing_on(model):
            for rows in micro:
                logp, _, _ = module.completion_logprobs(rollout, rows, with_entropy=True)
                first = max(first, float((logp.detach() - old[rows])[on[rows]].abs().max()))
                del logp
        out["first_iter_max_abs"] = first

        opt = MasterWeightAdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
        module.optimizers = lambda: opt
        module.lr_schedulers = lambda: type("S", (), {"step": lambda self: None})()
        module.manual_backward = lambda loss: loss.backward()
        before = [p.detach().float().clone() for p in model.parameters()]
        stats = module.optimise(rollout, group_advantages(total.to(device), G), mask, old, None, micro)
        moved = torch.cat([(p.detach().float() - b).abs().flatten() for p, b in zip(model.parameters(), before)])
        out["update"] = {k: float(v) for k, v in stats.items()}
        out["update"]["mean_abs_weight_change"] = float(moved.mean())
        out["update"]["logp_change_mean_abs"] = float((module.frozen_logprobs(rollout, model, micro) - old)[on].abs().mean())
        if args.model:
            out["accuracy_after"] = sample()[2]
    finally:
        torch.set_default_dtype(default_dtype)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
