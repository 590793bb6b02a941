from transformers import AutoTokenizer

from r1lightning.data import IGNORE_INDEX, encode_conversation, encode_prompt
from r1lightning.tokenizer import build_char_tokenizer


def test_round_trip_every_printable_char(char_tokenizer):
    text = "What is 457+386? <think>7+6=13\n</think><answer>843</answer> ~!@#$%^&*()_{}|:\"<>"
    ids = char_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert char_tokenizer.decode(ids) == text
    # One token per character, except the four reasoning tags which are one token each.
    tags = ["<think>", "</think>", "<answer>", "</answer>"]
    assert len(ids) == len(text) - sum(len(t) - 1 for t in tags)


def test_tags_are_single_tokens_and_survive_skip_special(char_tokenizer):
    ids = char_tokenizer("<think>1</think><answer>1</answer><|end|>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 7
    assert char_tokenizer.decode(ids, skip_special_tokens=True) == "<think>1</think><answer>1</answer>"


def test_deterministic_and_save_pretrained_loads_in_plain_transformers(tmp_path):
    a, b = build_char_tokenizer(), build_char_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    a.save_pretrained(tmp_path)
    c = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|user|>What is 1+2?<|end|><|assistant|>"
    assert c(text, add_special_tokens=False)["input_ids"] == a(text, add_special_tokens=False)["input_ids"]
    assert c.chat_template == a.chat_template and c.pad_token_id == a.pad_token_id == 0


def test_chat_template_masks_everything_but_the_assistant_turn(char_tokenizer):
    msgs = [{"role": "user", "content": "What is 12+34?"}, {"role": "assistant", "content": "<think>2+4=6\n1+3=4\n</think><answer>46</answer>"}]
    ids, labels = encode_conversation(char_tokenizer, msgs)
    assert len(ids) == len(labels)
    supervised = [t for t, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert char_tokenizer.decode(supervised) == "<think>2+4=6\n1+3=4\n</think><answer>46</answer><|end|>"
    prompt = encode_prompt(char_tokenizer, msgs)
    assert char_tokenizer.decode(prompt) == "<|user|>What is 12+34?<|end|><|assistant|>"
    # The first supervised position is exactly where the prompt ends.
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt) and labels[len(prompt)] == ids[len(prompt)]


def test_multi_turn_supervises_every_assistant_turn(char_tokenizer):
    msgs = [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
    ]
    ids, labels = encode_conversation(char_tokenizer, msgs)
    assert char_tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX]) == "b<|end|>d<|end|>"
