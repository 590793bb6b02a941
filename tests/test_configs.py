"""Every YAML under configs/ parses with the real CLI, so a renamed argument breaks a test, not a user."""

from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

from r1lightning.cli import R1CLI

ROOT = Path(__file__).resolve().parents[1]
# Pipeline files (a top-level `stages:` list) are not LightningCLI configs: tests/test_pipeline.py
# checks each with `r1lightning pipeline --dry-run`, which parses every stage.
ALL = sorted((ROOT / "configs").rglob("*.yaml"))
CONFIGS = [p for p in ALL if "stages" not in (yaml.safe_load(p.read_text()) or {})]
PIPELINES = [p for p in ALL if p not in CONFIGS]
RECIPES = [p for p in CONFIGS if "model" in (yaml.safe_load(p.read_text()) or {})]
OVERLAYS = [p for p in CONFIGS if p not in RECIPES]


def parse(*files, extra=()):
    args = [a for f in files for a in ("-c", str(f))] + list(extra)
    return R1CLI(args=args, run=False)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_parses_and_instantiates(path, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    # Recipes that start from an exported checkpoint are checked with the embedded tokenizer.
    cfg = yaml.safe_load(path.read_text())
    extra = []
    policy = cfg["model"]["init_args"]["policy"]["init_args"]
    if policy.get("name_or_path") and not Path(policy["name_or_path"]).exists():
        extra = ["--model.init_args.policy.init_args.tokenizer", "char"]
    cli = parse(path, extra=extra)
    assert cli.model.__class__.__name__ == cfg["model"]["class_path"].rsplit(".", 1)[1]
    assert cli.datamodule.__class__.__name__ == cfg["data"]["class_path"].rsplit(".", 1)[1]


@pytest.mark.parametrize("path", OVERLAYS, ids=lambda p: str(p.relative_to(ROOT)))
def test_overlay_composes_with_the_quickstart(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    parse(ROOT / "configs/quickstart/sft.yaml", path)


def test_print_config_runs_again(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        R1CLI(args=["fit", "-c", "configs/quickstart/sft.yaml", "--print_config"])
    first = capsys.readouterr().out
    printed = tmp_path / "printed.yaml"
    printed.write_text(first)
    with pytest.raises(SystemExit):
        R1CLI(args=["fit", "-c", str(printed), "--print_config"])
    assert capsys.readouterr().out == first
    assert "num_experts: 8" in first


def test_unknown_key_is_one_clear_error(monkeypatch, capsys):
    from r1lightning.cli import main

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", "configs/quickstart/sft.yaml", "--model.init_args.warmup_step", "1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "r1lightning: error: command line: unknown argument `--model.init_args.warmup_step`, did you mean `warmup_steps`?")


def test_every_yaml_under_configs_is_checked():
    """Recipes and overlays here; pipeline files by tests/test_pipeline.py (their stages' composed configs,
    inline callbacks and overrides included, go through the same CLI)."""
    from tests.test_pipeline import PIPELINES as PIPELINES_CHECKED

    assert ALL and set(RECIPES) | set(OVERLAYS) | set(PIPELINES_CHECKED) == set(ALL)
    assert set(PIPELINES_CHECKED) == set(PIPELINES)


def test_option_groups_are_typed_and_partial_groups_keep_the_component_defaults(monkeypatch, tmp_path):
    from r1lightning.callbacks import BenchmarkEval, RejectionFilters, RejectionSampling
    from r1lightning.options import GRPOLossOptions, SamplingOptions

    monkeypatch.chdir(ROOT)
    cli = parse(ROOT / "configs/quickstart/grpo.yaml", extra=["--model.init_args.policy.init_args.tokenizer", "char"])
    assert cli.model.sampling == SamplingOptions(num_samples=8, max_new_tokens=48, temperature=1.0)
    assert cli.model.loss == GRPOLossOptions(beta=0.04, epsilon_low=0.2, epsilon_high=0.28)
    extra = tmp_path / "callbacks.yaml"
    extra.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "r1lightning.callbacks.BenchmarkEval", "init_args": {"benchmarks": [{"name": "heldout"}], "sampling": {"max_new_tokens": 16}}},
        {"class_path": "r1lightning.callbacks.RejectionSampling", "init_args": {"output": "t.jsonl", "sampling": {"temperature": 0.7},
                                                                                "filters": {"max_per_prompt": 1}}}]}}))
    cli = parse(ROOT / "configs/quickstart/sft.yaml", extra)
    bench = next(cb for cb in cli.trainer.callbacks if isinstance(cb, BenchmarkEval))
    rejection = next(cb for cb in cli.trainer.callbacks if isinstance(cb, RejectionSampling))
    # BenchmarkEval's defaults are R1's evaluation protocol; RejectionSampling's are k 4 at the policy's temperature.
    assert bench.sampling == SamplingOptions(num_samples=4, temperature=0.6, top_p=0.95, max_new_tokens=16)
    assert rejection.sampling == SamplingOptions(num_samples=4, temperature=0.7, max_new_tokens=64)
    assert rejection.filters == RejectionFilters(max_per_prompt=1)


def test_a_group_option_on_the_command_line(monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = parse(ROOT / "configs/quickstart/grpo.yaml",
                extra=["--model.init_args.policy.init_args.tokenizer", "char", "--model.init_args.sampling.temperature", "0.5"])
    assert cli.model.sampling.temperature == 0.5 and cli.model.sampling.num_samples == 8


def test_rewards_take_trl_s_bare_strings(monkeypatch):
    """TRL's `reward_funcs` form: a bare registered name or reward-model id in `rewards:` is that
    function with weight 1, next to the `{fn, weight}` form."""
    monkeypatch.chdir(ROOT)
    rewards = '["accuracy", {"fn": "format", "weight": 0.1}, "Skywork/Skywork-Reward-V2-Qwen3-0.6B"]'
    cli = parse(ROOT / "configs/quickstart/grpo.yaml", extra=["--model.init_args.rewards", rewards,
                                                              "--model.init_args.policy.init_args.tokenizer", "char"])
    got = [(r.fn, r.weight, type(r._callable).__name__) for r in cli.model.rewards.rewards]
    assert [g[:2] for g in got] == [("accuracy", 1.0), ("format", 0.1), ("Skywork/Skywork-Reward-V2-Qwen3-0.6B", 1.0)]
    assert got[2][2] == "RewardModelReward" and cli.model.rewards.rewards[2]._callable.model is None  # not loaded yet
