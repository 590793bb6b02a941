"""Chat-template encoding: conversations to token ids, with labels only on assistant turns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1lightning.losses import IGNORE_INDEX  # the label SFT's loss skips; re-exported by r1lightning.data


def require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"tokenizer {name!r} has no chat template (set tokenizer.chat_template or use a chat model)")


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def row_messages(row: dict, system_prompt: str | None = None) -> list[dict]:
    """A row is either `messages` (a conversation) or `prompt` (+ `completion` for traces); `prompt` may
    itself be a list of messages (TRL's conversational format)."""
    if row.get("messages") is not None:
        msgs = list(row["messages"])
    elif isinstance(row.get("prompt"), list):
        msgs = list(row["prompt"])
        if row.get("completion") is not None:
            msgs.append({"role": "assistant", "content": row["completion"]})
    else:
        msgs = [{"role": "user", "content": row["prompt"]}]
        if row.get("completion") is not None:
            msgs.append({"role": "assistant", "content": row["completion"]})
    if system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def encode_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and labels that are IGNORE_INDEX except on assistant turns.

    Works for any template whose rendering of a conversation prefix is a token prefix of the whole
    (true for the common templates); each assistant turn is found as the tokens between the prompt
    for it (`add_generation_prompt=True`) and the conversation including it.
    """
    ids = _render(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    for j, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:j], add_generation_prompt=True)
        start, end = len(prefix), len(_render(tokenizer, messages[: j + 1], add_generation_prompt=False))
        if ids[:start] != prefix:
            raise ValueError("chat template is not prefix-consistent: cannot locate the assistant tokens")
        labels[start:end] = ids[start:end]
    return ids, labels


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The conversation up to (not including) the final assistant turn, ready for generation."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return _render(tokenizer, messages, add_generation_prompt=True)


@dataclass
class SFTCollator:
    """Right-pads (or packs) encoded examples. Top-level and picklable, so worker processes can use it."""

    pad_token_id: int
    max_length: int
    packing: bool = False

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if self.packing:
            return self._pack(examples)
        width = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    def _pack(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        # Examples are laid end to end in rows of max_length; position ids restart at every example
        # and no attention mask is passed, which transformers reads as "packed": attention stays
        # inside each example.
        rows: list[list[dict]] = [[]]
        used = 0
        for e in sorted(examples, key=lambda e: -len(e["input_ids"])):
            if used + len(e["input_ids"]) > self.max_length and rows[-1]:
                rows.append([])
                used = 0
            rows[-1].append(e)
            used += len(e["input_ids"])
        width = max(sum(len(e["input_ids"]) for e in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            at = 0
            for e in row:
                n = len(e["input_ids"])
                input_ids[i, at : at + n] = torch.tensor(e["input_ids"])
                labels[i, at : at + n] = torch.tensor(e["labels"])
                position_ids[i, at : at + n] = torch.arange(n)
                at += n
            # Padding continues the last example's positions so it is not read as a new sequence.
            if at < width:
                position_ids[i, at:] = torch.arange(n, n + width - at)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def left_pad(ids: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts for generation: ids [N, P] left-padded with `pad_token_id`, and their mask [N, P]."""
    width = max(len(x) for x in ids)
    prompt_ids = torch.full((len(ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        prompt_ids[i, width - len(x) :] = torch.tensor(x, dtype=torch.long)
        mask[i, width - len(x) :] = 1
    return prompt_ids, mask


def reward_prompt(row: dict, system_prompt: str | None = None):
    """The prompt as TRL hands it to reward functions: the message list the policy was prompted with for
    conversational rows (`messages`, or a list-valued `prompt`), else the `prompt` string itself."""
    if row.get("messages") is not None or isinstance(row.get("prompt"), list):
        msgs = row_messages(row, system_prompt)
        return msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs
    return row.get("prompt")


@dataclass
class PromptCollator:
    """Left-pads prompts for generation; every other column is passed through as a list, and `prompts`
    holds each row's prompt as reward functions receive it (`reward_prompt`)."""

    pad_token_id: int
    system_prompt: str | None = None

    def __call__(self, examples: list[dict]) -> dict:
        prompt_ids, prompt_mask = left_pad([e["prompt_ids"] for e in examples], self.pad_token_id)
        columns = {k: [e[k] for e in examples] for k in examples[0] if k != "prompt_ids"}
        prompts = [reward_prompt(e, self.system_prompt) for e in examples]
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "columns": columns, "prompts": prompts}
