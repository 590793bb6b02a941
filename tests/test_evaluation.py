"""Benchmark metrics (pass@1 over k samples, cons@k, greedy) on fixed samples, in 1 and 2 processes."""

import json
import os
import re
from types import SimpleNamespace

import pytest
import torch

from r1lightning.callbacks import BenchmarkEval
from r1lightning.options import SamplingOptions
from r1lightning.evaluation import Benchmark, ConsAtK, PassAt1, PassAtK, answer_key, load_benchmark_rows, majority_vote
from tests.test_callbacks import StubSampler

# Three problems, k = 4 fixed samples each (sample 0 is also the greedy answer):
#   1+1=2: answers 2 3 3 2  -> correct 1 0 0 1, vote: tie 2:2, "2" came first -> right
#   2+2=4: answers 5 4.0 5 - -> correct 0 1 0 0, vote "5"                      -> wrong
#   3+3=6: answers 7 06 6 7  -> correct 0 1 1 0, vote: tie 2:2, "7" came first -> wrong
# pass@1 = (2/4 + 1/4 + 2/4) / 3 = 5/12; pass@4 = 3/3; cons@4 = 1/3; greedy = 1/3.
ANSWERS = {"1+1": ["2", "3", "3", "2"], "2+2": ["5", "4.0", "5", None], "3+3": ["7", "06", "6", "7"]}
EXPECTED = {"pass@1": 5 / 12, "pass@4": 1.0, "cons@4": 1 / 3, "greedy": 1 / 3}


def fixed_sample(prompt, j):
    ans = ANSWERS[re.search(r"\d\+\d", prompt).group()][j]
    return (f"<think>hm</think><answer>{ans}</answer>" if ans is not None else "I do not know", True)


@pytest.fixture
def bench_file(tmp_path):
    path = tmp_path / "bench.jsonl"
    rows = [{"problem": f"What is {a}+{a}?", "solution": f"... #### {2 * a}", "id": f"p{a}"} for a in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def stub_module():
    from r1lightning.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    module = SimpleNamespace(tokenizer=tok, device=torch.device("cpu"), decode=lambda ids: tok.batch_decode(ids, skip_special_tokens=True))
    module.generate = lambda ids, mask, params, sampler: sampler.generate(None, ids, mask, params, tok.eos_token_id, tok.pad_token_id)
    return module


def fake_trainer(tmp_path, rank=0, world=1, barrier=lambda name=None: None):
    return SimpleNamespace(global_rank=rank, world_size=world, global_step=5, loggers=[], callback_metrics={},
                           strategy=SimpleNamespace(barrier=barrier), log_dir=str(tmp_path), datamodule=None)  # fmt: skip


def make_eval(bench_file, tmp_path, **kwargs):
    bench = Benchmark("toy", path=str(bench_file), prompt_field="problem", answer_field="solution")
    cb = BenchmarkEval([bench], sampling=SamplingOptions(num_samples=4, temperature=0.6, top_p=0.95, max_new_tokens=32),
                       report_dir=str(tmp_path / "reports"), **kwargs)
    cb.sampler = StubSampler(stub_module().tokenizer, fixed_sample)
    return cb


def test_answer_keys_group_equal_answers():
    assert answer_key("0843") == answer_key("843") == "843"
    assert answer_key("0.5") == answer_key("1/2") == answer_key("\\frac{1}{2}") == answer_key("$\\frac{1}{2}$") == "1/2"
    assert answer_key("1,000.") == "1000"
    assert answer_key("\\text{ yes }") == "yes" and answer_key("x + 1") == "x+1"
    assert answer_key(None) is None and answer_key("  ") is None


def test_majority_vote_breaks_ties_by_first_appearance():
    assert majority_vote(["5", "7", "7", "5"]) == 0  # 2:2, "5" first
    assert majority_vote(["7", None, "5", "5"]) == 2  # 2:1
    assert majority_vote([None, "a", "b", "b", "a", "c"]) == 1  # 2:2:1, "a" first at 1
    assert majority_vote([None, None]) is None


def test_metrics_on_fixed_correctness():
    correct = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]])
    p1, pk, cons = PassAt1(), PassAtK(), ConsAtK()
    p1.update(correct[:2])
    p1.update(correct[2:])  # accumulates over batches
    pk.update(correct)
    cons.update(torch.tensor([1, 0, 0]))
    assert float(p1.compute()) == pytest.approx((0.5 + 0.25 + 0.0) / 3)
    assert float(pk.compute()) == pytest.approx(2 / 3)
    assert float(cons.compute()) == pytest.approx(1 / 3)


def test_gsm8k_style_file_is_renamed_and_the_final_number_taken(bench_file):
    rows = load_benchmark_rows(bench_file, prompt_field="problem", answer_field="solution")
    assert [(r["prompt"], r["answer"], r["id"]) for r in rows] == [("What is 1+1?", "2", "p1"), ("What is 2+2?", "4", "p2"), ("What is 3+3?", "6", "p3")]


def test_benchmark_eval_on_fixed_samples(bench_file, tmp_path):
    cb = make_eval(bench_file, tmp_path)
    metrics = cb.evaluate(fake_trainer(tmp_path), stub_module())
    for key, value in EXPECTED.items():
        assert metrics[f"bench/toy/{key}"] == pytest.approx(value), key
    report = json.loads((tmp_path / "reports" / "step-000005.json").read_text())
    assert report["benchmarks"]["toy"]["pass@1"] == pytest.approx(5 / 12) and report["benchmarks"]["toy"]["problems"] == 3
    records = [json.loads(line) for line in open(tmp_path / "reports" / "step-000005-toy.jsonl")]
    assert [(r["id"], r["vote"], r["cons"]) for r in records] == [("p1", 0, 1.0), ("p2", 0, 0.0), ("p3", 0, 0.0)]
    assert records[1]["correct"] == [0.0, 1.0, 0.0, 0.0]


def _ddp_worker(rank, world, init_file, bench_file, tmp):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cb = make_eval(bench_file, __import__("pathlib").Path(tmp))
        trainer = fake_trainer(tmp, rank, world, barrier=lambda name=None: dist.barrier())
        metrics = cb.evaluate(trainer, stub_module())
        # which problems this rank generated (its greedy call has one row per problem)
        with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
            json.dump({"metrics": metrics, "prompts": sorted(set(cb.sampler.prompts_seen))}, f)
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_single_process_values(bench_file, tmp_path):
    # fork: nothing to re-import in the children, so the test stays short
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(bench_file), str(tmp_path)),
                                         nprocs=2, start_method="fork")  # fmt: skip
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["prompts"] == ["What is 1+1?", "What is 3+3?"] and results[1]["prompts"] == ["What is 2+2?"]
    for res in results:  # every rank logs the reduced (global) value
        for key, value in EXPECTED.items():
            assert res["metrics"][f"bench/toy/{key}"] == pytest.approx(value), key
    records = [json.loads(line) for line in open(tmp_path / "reports" / "step-000005-toy.jsonl")]
    assert [r["id"] for r in records] == ["p1", "p2", "p3"]  # rank 0 gathered everyone's problems


def test_code_benchmark_is_scored_by_the_code_reward(tmp_path):
    path = tmp_path / "code.jsonl"
    test = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(0, 0) == 0\n"
    path.write_text(json.dumps({"prompt": "def add(a, b):\n", "test": test, "entry_point": "add"}) + "\n")
    bodies = ["    return a + b\n", "    return a - b\n", "    return a + b\n", "    return 3\n"]
    cb = BenchmarkEval([Benchmark("code", path=str(path))], sampling=SamplingOptions(num_samples=4), greedy=False, report_dir=str(tmp_path / "r"))
    cb.sampler = StubSampler(stub_module().tokenizer, lambda p, j: (bodies[j], True))
    metrics = cb.evaluate(fake_trainer(tmp_path), stub_module())
    # samples 0 and 2 pass; the vote (2 identical programs) is the correct one
    assert metrics == {"bench/code/pass@1": 0.5, "bench/code/pass@4": 1.0, "bench/code/cons@4": 1.0}


def test_synthetic_heldout_set_as_a_benchmark(tmp_path):
    from r1lightning.tasks import AdditionTask

    bench = Benchmark("addition", task=AdditionTask(digits=2, num_train=20, num_test=6), data_dir=str(tmp_path), limit=4)
    data = bench.load()
    assert data.kind == "math" and len(data.rows) == 4 and all(set(r) >= {"prompt", "answer"} for r in data.rows)
    # the run's own held-out files when no source is given
    dm = SimpleNamespace(files=lambda split: [str(AdditionTask(digits=2, num_train=20, num_test=6).directory(tmp_path) / "test.jsonl")])
    assert len(Benchmark("heldout").load(dm).rows) == 6


def test_throwaway_batches_keep_ranks_in_step(bench_file, tmp_path):
    from r1lightning.evaluation import evaluate_problems

    bench = Benchmark("toy", path=str(bench_file), prompt_field="problem", answer_field="solution").load()
    sampler = StubSampler(stub_module().tokenizer, fixed_sample)
    # A rank with no problems left still makes the greedy and the sampled call of one batch.
    records = evaluate_problems(stub_module(), bench, [], sampling=SamplingOptions(num_samples=4, temperature=0.6, top_p=0.95, max_new_tokens=8),
                                batch_size=2, sampler=sampler, min_batches=1)  # fmt: skip
    assert records == [] and sampler.calls == 2
    records = evaluate_problems(stub_module(), bench, [0, 1, 2], sampling=SamplingOptions(num_samples=4, temperature=0.6, top_p=0.95, max_new_tokens=8),
                                batch_size=2, sampler=sampler, min_batches=3)  # fmt: skip
    assert len(records) == 3 and sampler.calls == 2 + 6
