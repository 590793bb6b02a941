import json

from r1lightning.tasks import AdditionTask


def test_trace_is_column_addition_with_carries():
    row = AdditionTask().row((457, 386))
    assert row == {
        "prompt": "What is 457+386?",
        "answer": "843",
        "completion": "<think>7+6=13\n5+8+1=14\n4+3+1=8\n</think><answer>843</answer>",
    }
    # A final carry produces the extra leading digit.
    assert AdditionTask().row((886, 531))["completion"].endswith("8+5+1=14\n</think><answer>1417</answer>")
    assert AdditionTask(digits=2, operands=3).row((13, 37, 71))["answer"] == "121"


def test_same_seed_same_files_different_seed_different(tmp_path):
    a = AdditionTask(seed=3, num_train=300, num_test=100).write(tmp_path / "a")
    b = AdditionTask(seed=3, num_train=300, num_test=100).write(tmp_path / "b")
    c = AdditionTask(seed=4, num_train=300, num_test=100).write(tmp_path / "c")
    assert a["train"].read_bytes() == b["train"].read_bytes()
    assert a["test"].read_bytes() == b["test"].read_bytes()
    assert a["train"].read_bytes() != c["train"].read_bytes()


def test_splits_are_disjoint_and_test_split_is_stable():
    small = AdditionTask(seed=0, num_train=500, num_test=200).splits()
    big = AdditionTask(seed=0, num_train=2000, num_test=200).splits()
    train = {r["prompt"] for r in big["train"]}
    test = {r["prompt"] for r in big["test"]}
    assert len(train) == 2000 and len(test) == 200 and not train & test
    # Growing the training set never changes the held-out problems.
    assert [r["prompt"] for r in small["test"]] == [r["prompt"] for r in big["test"]]


def test_answers_are_correct(tmp_path):
    paths = AdditionTask(num_train=50, num_test=20).write(tmp_path)
    for line in paths["train"].read_text().splitlines():
        row = json.loads(line)
        a, b = map(int, row["prompt"].removeprefix("What is ").removesuffix("?").split("+"))
        assert int(row["answer"]) == a + b
        assert f"<answer>{a + b}</answer>" in row["completion"]
