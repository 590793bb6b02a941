"""scripts/bench_grpo.py, the script behind the README's GRPO-step figures: its equal-tokens rule and
its TRL lower bounds, on the CPU with a tiny model."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_grpo  # noqa: E402

TINY = ["--layers", "2", "--hidden", "64", "--experts", "4", "--top-k", "2", "--vocab", "512", "--prompt-len", "16",
        "--device", "cpu"]


def test_long_tailed_point_gets_the_fixed_points_tokens_and_a_profile(tmp_path):
    out = bench_grpo.main(["--frameworks", "ours_megablocks", *TINY, "--prompts", "4", "--lengths", "32", "--reps", "2",
                           "--length-dist", "fixed", "lognormal", "--equal-tokens", "--profile", "5", "--warmup-prompts", "2",
                           "--json", str(tmp_path / "b.json"), "--workdir", str(tmp_path / "work")])
    fixed, tailed = out["results"]["ours_megablocks"]["points"]
    assert (fixed["dist"], tailed["dist"]) == ("fixed", "lognormal")
    # median 8 of 32 tokens, sigma 1, clipped: the mean drawn length is ~11.7, so ~11 prompts carry the
    # 4 x 8 x 32 = 1,024 tokens of the fixed point
    assert fixed["settings"]["prompts"] == 4 and 10 <= tailed["settings"]["prompts"] <= 12
    assert fixed["completion_tokens"] == 4 * 8 * 32
    # --warmup-prompts shrinks the length's full-length warm-up only; the log-normal point warms up at its own width
    assert fixed["warmup_prompts"] == 2 and tailed["warmup_prompts"] == tailed["settings"]["prompts"]
    # prompt + completion tokens per second counts the 16-token prompts too
    assert fixed["total_tok_s"] == pytest.approx(fixed["completion_tok_s"] * (32 + 16) / 32, rel=0.05)
    assert tailed["completion_tokens"] == pytest.approx(fixed["completion_tokens"], rel=0.15)
    assert fixed["cudnn_attention"] == "auto"  # the default; `ours_megablocks_cudnn` sets true
    # the default, which on a CPU never offloads; `ours_megablocks_no_offload` sets false
    assert fixed["offload_reference"] == fixed["offload_optimizer"] == "auto"
    assert fixed["reference_offloaded"] == tailed["reference_offloaded"] == fixed["optimizer_offloaded"] == 0
    assert fixed["host_reserved"] == tailed["host_reserved"] == 0  # the primer before the timed steps pinned nothing
    assert tailed["forced_lengths"] == "engine"  # the paged engine stopped each row at its drawn length
    assert fixed["reps"] == tailed["reps"] == 2  # the profiled step is extra, not a timed one
    assert "aten::" in (tmp_path / "b.profile_32_lognormal.txt").read_text()


def test_equal_tokens_counts_completion_or_all_tokens():
    import argparse

    args = argparse.Namespace(prompts=16, prompt_len=128, lognormal_median=0.25, lognormal_sigma=1.0, equal_tokens=None)
    assert bench_grpo.point_args(args, 256, "lognormal").prompts == 16  # off: the same prompts
    mean = bench_grpo.draw_lengths(200_000, 256, 0, args).double().mean().item()
    assert 80 < mean < 100  # median 64 of 256, sigma 1, clipped at 256
    args.equal_tokens = "completion"
    assert bench_grpo.point_args(args, 256, "lognormal").prompts == round(16 * 256 / mean)  # 46
    assert bench_grpo.point_args(args, 256, "fixed").prompts == 16
    args.equal_tokens = "total"  # 16 x (128 + 256) tokens over (128 + mean) a sequence
    assert bench_grpo.point_args(args, 256, "lognormal").prompts == round(16 * 384 / (128 + mean))  # 28


def test_trl_bounds_from_a_shorter_generation():
    # 12 decode steps 10 ms apart, then 4 steps 20, 18, 22, 20 ms apart, as the KV grows
    times = [0.01 * i for i in range(13)]
    for gap in (0.020, 0.018, 0.022, 0.020):
        times.append(times[-1] + gap)
    step = {"rollout_s": 0.5, "step_times": times, "rollout_peak_GiB": 10.0, "step_s": 0.9}
    got = bench_grpo.trl_bounds([step], length=116, n=16, rows=4, kv_per_token=2**28, window=2)
    # the 100 tokens still to come cost at least the fastest 2-step window of the last quarter (16 gaps:
    # the last 4): (18 + 22) / 2 = (20 + 18) / 2 = 19 ms, not the 10 ms of the first steps
    assert got["rollout_s_lower"] == pytest.approx(0.5 + 100 * 0.019)
    assert got["step_s_lower"] == got["rollout_s_lower"]
    # and each of the 4 rows still appends 100 tokens x 0.25 GiB of KV
    assert got["peak_GiB_lower"] == pytest.approx(10.0 + 4 * 100 * 0.25)
    assert got["decode_step_ms_floor"] == pytest.approx(19.0)
    # tail 1 (every step): the first steps' 10 ms, as session 10's bounds used
    assert bench_grpo.trl_bounds([step], length=116, n=16, rows=4, kv_per_token=2**28, window=2,
                                 tail=1.0)["rollout_s_lower"] == pytest.approx(0.5 + 100 * 0.01)


def test_comparisons_give_ratios_bounds_and_long_tailed_shares():
    def point(length, dist, step_s, peak, prompts=16, tok_s=None, total=None):
        return {"length": length, "dist": dist, "step_s": step_s, "peak_GiB": peak, "settings": {"prompts": prompts},
                "completion_tok_s": tok_s, "total_tok_s": total}

    results = {  # numbers like session 9's (docs/benchmarks.md), from two of its runs
        "ours_megablocks": {"points": [point(256, "fixed", 6.62, 67.9, tok_s=4949, total=7424),
                                       point(256, "lognormal", 10.72, 68.3, prompts=46, tok_s=3175, total=7662),
                                       point(4096, "fixed", 120.65, 118.3)]},
        "trl_megablocks": {"points": [point(256, "fixed", 16.88, 69.1),
                                      {"length": 4096, "dist": "fixed", "bound_from_tokens": 512, "step_s_lower": 243.07,
                                       "peak_GiB_lower": 118.0}]},
        "trl": {"points": [point(256, "fixed", 34.73, 69.7), {"length": 1024, "dist": "fixed", "skipped": "time"}]},
    }
    text = bench_grpo.comparisons(results)
    assert "| 256 | fixed | ours_megablocks | trl_megablocks | 2.55× | 67.9 vs 69.1 | yes |" in text
    assert "| 256 | fixed | ours_megablocks | trl | 5.25× | 67.9 vs 69.7 | yes |" in text
    # a bound: the ratio is at least 2.01x, and a peak above the bound's floor proves nothing either way
    assert "| 4,096 | fixed | ours_megablocks | trl_megablocks | ≥ 2.01× | 118.3 vs ≥ 118.0 | not shown |" in text
    # 3,175 / 4,949 of the completion tokens/s, 7,662 / 7,424 of all tokens/s
    assert "| 256 | ours_megablocks | 46 vs 16 | 64.2 % | 103.2 % |" in text
    assert "1,024" not in text  # a skipped point compares with nothing


def test_variants_time_settings_side_by_side(tmp_path):
    out = bench_grpo.main(["--frameworks", "ours_megablocks", *TINY, "--prompts", "2", "--lengths", "16", "--reps", "1",
                           "--ours-variants", "base:", "small:micro_batch_tokens=40,engine.admit_batch=3",
                           "--workdir", str(tmp_path / "work")])
    base, small = out["results"]["ours_megablocks:base"], out["results"]["ours_megablocks:small"]
    assert base["variant"] == {} and small["variant"] == {"micro_batch_tokens": 40, "engine.admit_batch": 3}
    assert base["points"][0]["micro_batch_tokens"] == 32768 and small["points"][0]["micro_batch_tokens"] == 40
    # 16 sequences of 16 + 16 tokens: one micro-batch under 32,768 tokens, one sequence each under 40
    assert base["points"][0]["micro_batches"] == 1 and small["points"][0]["micro_batches"] == 16
    with pytest.raises(SystemExit, match="expected NAME:key=value"):
        bench_grpo.parse_variant("small:micro_batch_tokens")


def test_every_point_gets_an_untimed_first_step(tmp_path):
    """A long-tailed point after the fixed one builds a new module: its first step (optimizer state, the parked
    reference's host buffer on a GPU) is a warm-up, not a timed step; only the length's first runs at full length."""
    out = bench_grpo.main(["--frameworks", "ours_megablocks", *TINY, "--prompts", "2", "--lengths", "16", "--reps", "1",
                           "--length-dist", "fixed", "lognormal", "--workdir", str(tmp_path / "work")])
    fixed, tailed = out["results"]["ours_megablocks"]["points"]
    assert fixed["warmup_step_s"] is not None and tailed["warmup_step_s"] is not None
    assert fixed["reps"] == tailed["reps"] == 1
    assert fixed["warmup_steps"] == tailed["warmup_steps"] == 2  # the default: the second builds cuDNN's plans


def test_decode_fit_splits_a_step_into_a_fixed_part_and_a_rate():
    # 128 live slots, 16 steps a round, 7.4 ms fixed + 0.26 ms per GB of KV read (131,072 bytes a token);
    # rounds with fewer live slots (the tail) are left out of the fit
    per_token = 131072
    rounds = []
    for r in range(10):
        kv = 128 * (128 + 16 * r)
        gb = (kv + 128 * 15 / 2) * per_token / 1e9
        rounds.append([16, 128, kv, 16 * (7.4 + 0.26 * gb) / 1e3])
    rounds.append([16, 3, 3 * 4000, 0.5])
    fit = bench_grpo.decode_fit(rounds, per_token)
    assert fit["rounds"] == 10 and fit["live"] == 128
    assert fit["fixed_ms"] == pytest.approx(7.4) and fit["ms_per_GB"] == pytest.approx(0.26)
    assert fit["GB_per_s"] == pytest.approx(1e3 / 0.26) and fit["r2"] == pytest.approx(1.0)
    assert bench_grpo.decode_fit(rounds[:2], per_token) is None and bench_grpo.decode_fit(None, per_token) is None
    assert bench_grpo.fit_note({"decode_fit": fit}) == " (step 7.4 ms + 0.26 ms/GB of KV: 3,846 GB/s)"
    assert bench_grpo.fit_note({"decode_fit": None}) == ""


def test_timed_steps_draw_the_same_lengths_whatever_the_warm_up():
    """Every framework's timed step k draws the lengths of step k; ours' extra warm-ups draw others, and only the
    first warm-up runs at the full length (no forced EOS)."""
    import types

    class Engine:
        def __init__(self):
            self.forced = []

        def generate(self, model, prompt_ids, prompt_mask, params, eos, pad, forced_lengths=None):
            self.forced.append(forced_lengths)

    args = types.SimpleNamespace(lognormal_median=0.25, lognormal_sigma=1.0)
    ids = torch.zeros(64, 4, dtype=torch.long)
    for warmup in (1, 2, 3):
        engine = Engine()
        sampler = bench_grpo.ForcedLengths(engine, args, 64, warmup)
        for _ in range(warmup + 2):
            sampler.generate(None, ids, ids, None, 0, 0)
        assert engine.forced[0] is None  # the full-length warm-up
        for k, forced in enumerate(engine.forced[warmup:], start=1):
            drawn = bench_grpo.draw_lengths(64, 64, k, args)
            assert torch.equal(forced, torch.where(drawn >= 64, 65, drawn))
        for forced in engine.forced[1:warmup]:  # later warm-ups: drawn lengths, not the timed steps' ones
            assert forced is not None and not torch.equal(forced, engine.forced[warmup])
    no_full = Engine()  # a later point of the length: its warm-up runs drawn lengths too
    sampler = bench_grpo.ForcedLengths(no_full, args, 64, 1, full=0)
    sampler.generate(None, ids, ids, None, 0, 0)
    assert no_full.forced[0] is not None
