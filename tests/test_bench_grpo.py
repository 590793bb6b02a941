"""scripts/bench_grpo.py, the script behind the README's GRPO-step figures: its equal-tokens rule and
its TRL lower bounds, on the CPU with a tiny model."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_grpo  # noqa: E402

TINY = ["--layers", "2", "--hidden", "64", "--experts", "4", "--top-k", "2", "--vocab", "512", "--prompt-len", "16",
        "--device", "cpu"]


def test_long_tailed_point_gets_the_fixed_points_tokens_and_a_profile(tmp_path):
    out = bench_grpo.main(["--frameworks", "ours_megablocks", *TINY, "--prompts", "4", "--lengths", "32", "--reps", "2",
                           "--length-dist", "fixed", "lognormal", "--equal-tokens", "--profile", "5",
                           "--json", str(tmp_path / "b.json"), "--workdir", str(tmp_path / "work")])
    fixed, tailed = out["results"]["ours_megablocks"]["points"]
    assert (fixed["dist"], tailed["dist"]) == ("fixed", "lognormal")
    # median 8 of 32 tokens, sigma 1, clipped: the mean drawn length is ~11.7, so ~11 prompts carry the
    # 4 x 8 x 32 = 1,024 tokens of the fixed point
    assert fixed["settings"]["prompts"] == 4 and 10 <= tailed["settings"]["prompts"] <= 12
    assert fixed["completion_tokens"] == 4 * 8 * 32
    # prompt + completion tokens per second counts the 16-token prompts too
    assert fixed["total_tok_s"] == pytest.approx(fixed["completion_tok_s"] * (32 + 16) / 32, rel=0.05)
    assert tailed["completion_tokens"] == pytest.approx(fixed["completion_tokens"], rel=0.15)
    assert fixed["cudnn_attention"] is False  # the default; `ours_megablocks_cudnn` allows it
    # the default, which on a CPU never offloads; `ours_megablocks_no_offload` sets false
    assert fixed["offload_reference"] == fixed["offload_optimizer"] == "auto"
    assert fixed["reference_offloaded"] == tailed["reference_offloaded"] == fixed["optimizer_offloaded"] == 0
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
    # 5 decode steps 10 ms apart, then 20 ms apart: the fastest 2-step window is 10 ms per step
    times = [0.0, 0.01, 0.02, 0.03, 0.05, 0.07]
    step = {"rollout_s": 0.5, "step_times": times, "rollout_peak_GiB": 10.0, "step_s": 0.9}
    got = bench_grpo.trl_bounds([step], length=106, n=6, rows=4, kv_per_token=2**28, window=2)
    # the 100 tokens still to come cost at least 10 ms each after the 0.5 s measured
    assert got["rollout_s_lower"] == pytest.approx(0.5 + 100 * 0.01)
    assert got["step_s_lower"] == got["rollout_s_lower"]
    # and each of the 4 rows still appends 100 tokens x 0.25 GiB of KV
    assert got["peak_GiB_lower"] == pytest.approx(10.0 + 4 * 100 * 0.25)
    assert got["decode_step_ms_floor"] == pytest.approx(10.0)
