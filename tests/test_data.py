import json

import datasets
import pytest

from r1lightning.data import IGNORE_INDEX, DataError, PromptDataModule, TraceDataModule, load_rows

ROWS = [
    {"prompt": "What is 1+2?", "completion": "<think>1+2=3\n</think><answer>3</answer>", "answer": "3", "level": 1},
    {"prompt": "What is 4+5?", "completion": "<think>4+5=9\n</think><answer>9</answer>", "answer": "9", "level": 2},
    {"prompt": "What is 7+8?", "completion": "<think>7+8=15\n</think><answer>15</answer>", "answer": "15", "level": 3},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(params=["jsonl", "parquet", "disk"])
def data_file(request, tmp_path):
    if request.param == "jsonl":
        return str(write_jsonl(tmp_path / "d.jsonl", ROWS))
    ds = datasets.Dataset.from_list(ROWS)
    if request.param == "parquet":
        ds.to_parquet(str(tmp_path / "d.parquet"))
        return str(tmp_path / "d.parquet")
    ds.save_to_disk(str(tmp_path / "d"))
    return str(tmp_path / "d")


def test_three_formats_load_the_same_rows(data_file):
    rows = load_rows(data_file, any_of=(("prompt", "messages"),))
    assert rows.to_list() == ROWS


def test_trace_module_supervises_only_the_assistant(data_file, char_tokenizer):
    dm = TraceDataModule(train_files=data_file, batch_size=3, max_length=64)
    dm.connect(char_tokenizer)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 3
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        text = char_tokenizer.decode(ids[mask == 1])
        supervised = char_tokenizer.decode(labels[labels != IGNORE_INDEX])
        assert text.startswith("<|user|>What is ") and text.endswith(supervised)
        assert supervised.startswith("<think>") and supervised.endswith("</answer><|end|>")
        assert (labels[mask == 0] == IGNORE_INDEX).all()


def test_packing_keeps_examples_apart(tmp_path, char_tokenizer):
    dm = TraceDataModule(train_files=str(write_jsonl(tmp_path / "d.jsonl", ROWS * 2)), batch_size=6, max_length=128, packing=True)
    dm.connect(char_tokenizer)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert "attention_mask" not in batch
    starts = (batch["position_ids"] == 0).sum().item()
    assert starts == 6  # six examples, each restarting its positions
    assert batch["input_ids"].shape[1] <= 128


def test_seeded_shuffle_is_reproducible(tmp_path, char_tokenizer):
    path = str(write_jsonl(tmp_path / "d.jsonl", ROWS * 4))

    def order(seed):
        dm = TraceDataModule(train_files=path, batch_size=12, max_length=64, seed=seed)
        dm.connect(char_tokenizer)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))["input_ids"].tolist()

    assert order(1) == order(1)
    assert order(1) != order(2)


def test_prompt_module_passes_extra_columns(data_file, char_tokenizer):
    dm = PromptDataModule(train_files=data_file, batch_size=3)
    dm.connect(char_tokenizer)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch["columns"]["answer"]) == ["15", "3", "9"]
    assert sorted(batch["columns"]["level"]) == [1, 2, 3]
    # Left-padded: every prompt ends with the generation prompt in the last column.
    assert (batch["prompt_ids"][:, -1] == char_tokenizer.convert_tokens_to_ids("<|assistant|>")).all()
    assert (batch["prompt_mask"][:, -1] == 1).all()


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \n', "d.jsonl:2: invalid JSON"),
        ('{"prompt": "a", "answer": "1"}\n{"question": "b"}\n', "d.jsonl:2: missing field, need one of 'prompt', 'messages'"),
        ('{"prompt": 3}\n', "d.jsonl:1: field 'prompt' must be a string, got int"),
        ('[1, 2]\n', "d.jsonl:1: expected a JSON object"),
        ("", "d.jsonl: no rows (empty file)"),
    ],
)
def test_malformed_jsonl_names_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_rows(str(path), any_of=(("prompt", "messages"),))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_answer_and_missing_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    with pytest.raises(DataError, match=r"d.jsonl:2: missing field 'answer'"):
        load_rows(str(path), required=("answer",))
    with pytest.raises(DataError, match=r"nope.jsonl: file not found"):
        load_rows(str(tmp_path / "nope.jsonl"))


def test_overlong_rows_are_counted_and_all_overlong_is_an_error(tmp_path, char_tokenizer, caplog):
    rows = ROWS + [{"prompt": "x" * 300, "completion": "y", "answer": "1"}]
    dm = TraceDataModule(train_files=str(write_jsonl(tmp_path / "d.jsonl", rows)), batch_size=1, max_length=64)
    dm.connect(char_tokenizer)
    dm.setup("fit")
    assert len(dm.train_rows) == 3 and dm.skipped_rows == 1
    assert "skipped 1 of 4 rows longer than max_length=64" in caplog.text
    dm = PromptDataModule(train_files=str(write_jsonl(tmp_path / "e.jsonl", rows[3:])), max_length=64)
    dm.connect(char_tokenizer)
    with pytest.raises(DataError, match="e.jsonl: row 0: every row is longer than max_length=64"):
        dm.setup("fit")


def test_tokenizer_without_chat_template(tmp_path, char_tokenizer):
    char_tokenizer.chat_template = None
    dm = PromptDataModule(train_files=str(write_jsonl(tmp_path / "d.jsonl", ROWS)))
    dm.connect(char_tokenizer)
    with pytest.raises(ValueError, match="has no chat template"):
        dm.setup("fit")


def test_parquet_and_dataset_dir_errors_name_the_row_and_field(tmp_path):
    bad = datasets.Dataset.from_list([{"prompt": "a", "answer": "1"}, {"prompt": None, "answer": "2"}])
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad.parquet: row 1: missing field, need one of 'prompt', 'messages'"):
        load_rows(str(tmp_path / "bad.parquet"), any_of=(("prompt", "messages"),))
    datasets.Dataset.from_list([{"prompt": 5}]).to_parquet(str(tmp_path / "typed.parquet"))
    with pytest.raises(DataError, match=r"typed.parquet: row 0: field 'prompt' must be a string, got int"):
        load_rows(str(tmp_path / "typed.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"dd: is a DatasetDict \(train\); point at one split's directory"):
        load_rows(str(tmp_path / "dd"))
    datasets.Dataset.from_list([{"prompt": "a"}]).select([]).to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(DataError, match=r"empty.parquet: no rows"):
        load_rows(str(tmp_path / "empty.parquet"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"junk.parquet: not a readable Parquet file"):
        load_rows(str(tmp_path / "junk.parquet"))
