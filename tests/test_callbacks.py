"""Stage callbacks: reference refresh, rejection sampling (filters, resume, atomic writes, 2 ranks)."""

import copy
import json
import os
import re
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from r1lightning.callbacks import ReferenceModelRefresh, RejectionFilters, RejectionSampling, refresh_reference
from r1lightning.callbacks import _common as files_module  # write_table: where the dataset is written
from r1lightning.options import SamplingOptions
from r1lightning.rollout import Rollout, Sampler
from r1lightning.rollout.base import completion_mask_from_ids

# --------------------------------------------------------------------------- helpers


class StubSampler(Sampler):
    """Completions chosen by `fn(prompt_text, sample_index) -> (text, ended)`; `ended=False` leaves
    out the EOS (a truncated sample). Counts calls and can fail on a given call."""

    def __init__(self, tokenizer, fn, fail_on_call=None):
        self.tok, self.fn, self.fail_on_call = tokenizer, fn, fail_on_call
        self.calls = 0
        self.prompts_seen = []

    def generate(self, model, prompt_ids, prompt_mask, params, eos_token_id, pad_token_id):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash while sampling")
        prompts = self.tok.batch_decode(prompt_ids, skip_special_tokens=True)
        rows, index = [], 0
        for i, p in enumerate(prompts):
            index = index + 1 if i and prompts[i - 1] == p else 0  # rows are prompt-major, k per prompt
            self.prompts_seen.append(p)
            text, ended = self.fn(p, index)
            ids = self.tok(text, add_special_tokens=False)["input_ids"] + ([eos_token_id] if ended else [])
            rows.append(ids)
        width = max(len(r) for r in rows)
        completion_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            completion_ids[i, : len(r)] = torch.tensor(r)
        mask, truncated = completion_mask_from_ids(completion_ids, eos_token_id)
        return Rollout(prompt_ids, prompt_mask, completion_ids.masked_fill(mask == 0, pad_token_id), mask, truncated)


def addition_sample(prompt, j):
    """Sample j of `What is a+b?`: 0 correct; 1 correct but unformatted; 2 wrong; 3 = sample 0
    again (a duplicate); 4 correct but truncated (no EOS)."""
    a, b = map(int, re.search(r"(\d+)\+(\d+)", prompt).groups())
    good = f"<think>{a}+{b}</think><answer>{a + b}</answer>"
    return [(good, True), (f"the answer is \\boxed{{{a + b}}}", True), (f"<think>x</think><answer>{a + b + 1}</answer>", True),
            (good, True), (good, False)][j]  # fmt: skip


PROBLEMS = [(12, 34), (5, 7), (40, 2), (99, 1), (3, 3)]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"What is {a}+{b}?", "answer": str(a + b), "completion": "<think>gold</think>", "level": i}
            for i, (a, b) in enumerate(PROBLEMS)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_sft(tiny_moe_config):
    from r1lightning.policy import Policy
    from r1lightning.sft import SFTModule

    return SFTModule(Policy(config=tiny_moe_config, tokenizer="char"))  # model is built lazily; the stub never needs it


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


# --------------------------------------------------------------------------- reference refresh


class TiedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(3, 2)
        self.head = torch.nn.Linear(2, 3, bias=True)
        self.head.weight = self.embed.weight  # tied, as in tie_word_embeddings


def test_blend_is_alpha_policy_plus_one_minus_alpha_ref_and_tied_weights_blend_once():
    policy, ref = TiedNet(), TiedNet()
    with torch.no_grad():
        policy.embed.weight.fill_(1.0)
        policy.head.bias.fill_(2.0)
        ref.embed.weight.fill_(0.0)
        ref.head.bias.fill_(-2.0)
    refresh_reference(policy, ref, alpha=0.25)
    # 0.25*1 + 0.75*0 = 0.25 (applied twice it would be 0.4375); 0.25*2 + 0.75*(-2) = -1.0
    assert torch.allclose(ref.embed.weight, torch.full((3, 2), 0.25))
    assert torch.allclose(ref.head.weight, torch.full((3, 2), 0.25))
    assert torch.allclose(ref.head.bias, torch.full((3,), -1.0))
    refresh_reference(policy, ref, alpha=1.0)
    assert torch.equal(ref.head.bias, policy.head.bias) and torch.equal(ref.embed.weight, policy.embed.weight)


class ToyPolicy(L.LightningModule):
    """A policy + frozen reference, trained by SGD with lr 1 on loss = sum(w), so w drops by 1 per step."""

    def __init__(self, with_ref=True):
        super().__init__()
        self.model = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.constant_(self.model.weight, 10.0)
        self.ref_model = copy.deepcopy(self.model).requires_grad_(False) if with_ref else None

    def training_step(self, batch, batch_idx):
        return self.model.weight.sum() + 0 * batch.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=1.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(16, 1), batch_size=1)


class Recorder(L.Callback):
    def __init__(self):
        self.ref = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.ref.append((trainer.global_step, float(pl_module.ref_model.weight)))


def fit(module, callbacks, steps):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)  # fmt: skip
    trainer.fit(module)
    return trainer


def test_reference_is_refreshed_only_at_multiples_of_n():
    refresh, rec = ReferenceModelRefresh(every_n_steps=3), Recorder()
    fit(ToyPolicy(), [refresh, rec], steps=7)
    # The policy weight after step s is 10 - s; the reference follows it at steps 3 and 6 only.
    assert rec.ref == [(1, 10.0), (2, 10.0), (3, 7.0), (4, 7.0), (5, 7.0), (6, 4.0), (7, 4.0)]
    assert refresh.refreshed_at == [3, 6] and refresh.refreshes == 2


def test_blended_refresh_in_training():
    refresh, rec = ReferenceModelRefresh(every_n_steps=2, alpha=0.5), Recorder()
    fit(ToyPolicy(), [refresh, rec], steps=4)
    # step 2: 0.5*8 + 0.5*10 = 9; step 4: 0.5*6 + 0.5*9 = 7.5
    assert rec.ref == [(1, 10.0), (2, 9.0), (3, 9.0), (4, 7.5)]


def test_jumping_step_counter_still_refreshes():
    cb = ReferenceModelRefresh(every_n_steps=4)
    module = SimpleNamespace(model=torch.nn.Linear(1, 1), ref_model=torch.nn.Linear(1, 1))
    for step in (2, 4, 6, 8, 10, 12):  # mu = 2 optimizer steps per batch
        cb.on_train_batch_end(SimpleNamespace(global_step=step, loggers=[], callback_metrics={}, global_rank=0), module, None, None, 0)
    assert cb.refreshed_at == [4, 8, 12]
    cb2 = ReferenceModelRefresh(every_n_steps=4)
    for step in (3, 6, 9):  # mu = 3: multiples 4 and 8 are skipped over, not missed
        cb2.on_train_batch_end(SimpleNamespace(global_step=step, loggers=[], callback_metrics={}, global_rank=0), module, None, None, 0)
    assert cb2.refreshed_at == [6, 9]


def test_no_reference_warns_and_does_nothing():
    with pytest.warns(UserWarning, match="no reference model"):
        fit(ToyPolicy(with_ref=False), [ReferenceModelRefresh(every_n_steps=1)], steps=2)


# --------------------------------------------------------------------------- rejection sampling


def make_rs(prompt_file, output, tokenizer, **kwargs):
    args = dict(sampling=SamplingOptions(num_samples=5, max_new_tokens=32), batch_size=2)
    args.update(kwargs)
    rs = RejectionSampling(str(output), None if prompt_file is None else str(prompt_file), **args)
    rs.sampler = StubSampler(tokenizer, addition_sample)
    return rs


def test_keeps_exactly_the_passing_samples(prompt_file, tmp_path, tiny_moe_config):
    module = tiny_sft(tiny_moe_config)
    out = tmp_path / "traces.jsonl"
    rs = make_rs(prompt_file, out, module.tokenizer)
    stats = rs.run(None, module)
    rows = read_jsonl(out)
    # Per prompt only sample 0 passes every filter (3 is its duplicate, 4 was truncated).
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(i, 0) for i in range(5)]
    assert [r["completion"] for r in rows] == [f"<think>{a}+{b}</think><answer>{a + b}</answer>" for a, b in PROBLEMS]
    assert [r["answer"] for r in rows] == ["46", "12", "42", "100", "6"]
    assert rows[0]["prompt"] == "What is 12+34?" and rows[0]["level"] == 0
    assert rows[0]["scores"] == {"accuracy": 1.0, "format": 1.0} and rows[0]["source_step"] == 0
    assert rows[0]["source_init"] == "config:qwen3_moe" and rows[0]["source_model"] == "run@step0"
    assert rows[0]["sampling"]["num_samples"] == 5 and rows[0]["num_tokens"] == 12  # 4 tags + "12+34" + "46" + EOS
    assert (stats["sampled"], stats["passed"], stats["duplicates"], stats["kept"]) == (25, 10, 5, 5)
    assert stats["pass_rate"] == pytest.approx(10 / 25) and stats["prompts_covered"] == 1.0
    assert json.loads((tmp_path / "traces.jsonl.stats.json").read_text())["kept"] == 5


def test_filters_can_be_relaxed_without_resampling(prompt_file, tmp_path, tiny_moe_config):
    module = tiny_sft(tiny_moe_config)
    out = tmp_path / "traces.jsonl"
    make_rs(prompt_file, out, module.tokenizer).run(None, module)
    # Same samples (the manifest matches), other filters: no format requirement, keep duplicates
    # and truncated ones, but at most 3 per prompt -> samples 0, 1, 3.
    rs = make_rs(prompt_file, out, module.tokenizer, filters=RejectionFilters(require_format=False, dedup=False, drop_truncated=False, max_per_prompt=3))
    stats = rs.run(None, module)
    assert rs.sampler.calls == 0
    assert [r["sample_index"] for r in read_jsonl(out)] == [0, 1, 3] * 5
    assert stats["passed"] == 4 * 5
    # max_length counts tokens with the EOS: the traces for 12+34 and 99+1 are 12 long, those for
    # 5+7, 40+2, 3+3 are 10, 11, 9; "the answer is \\boxed{N}" is 23 or more.
    rs = make_rs(prompt_file, out, module.tokenizer, filters=RejectionFilters(require_format=False, max_length=11))
    rs.run(None, module)
    assert [(r["prompt_index"], r["sample_index"]) for r in read_jsonl(out)] == [(1, 0), (2, 0), (4, 0)]


def test_resumes_after_interruption_without_duplicates(prompt_file, tmp_path, tiny_moe_config):
    module = tiny_sft(tiny_moe_config)
    out = tmp_path / "traces.jsonl"
    rs = make_rs(prompt_file, out, module.tokenizer)
    rs.sampler.fail_on_call = 3  # 5 prompts in chunks of 2: chunks [0,1] and [2,3] finish, [4] crashes
    with pytest.raises(RuntimeError, match="simulated crash"):
        rs.run(None, module)
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "traces.jsonl.parts").glob("chunk-*")) == ["chunk-00000000.json", "chunk-00000002.json"]
    rs2 = make_rs(prompt_file, out, module.tokenizer)
    rs2.run(None, module)
    assert rs2.sampler.calls == 1 and set(rs2.sampler.prompts_seen) == {"What is 3+3?"}
    rows = read_jsonl(out)
    assert [r["prompt_index"] for r in rows] == [0, 1, 2, 3, 4]


def test_samples_of_other_weights_are_not_mixed_in(prompt_file, tmp_path, tiny_moe_config):
    module = tiny_sft(tiny_moe_config)
    module.configure_model()
    out = tmp_path / "traces.jsonl"
    make_rs(prompt_file, out, module.tokenizer).run(None, module)
    with torch.no_grad():
        next(module.model.parameters()).add_(1.0)
    rs = make_rs(prompt_file, out, module.tokenizer)
    rs.run(None, module)
    assert rs.sampler.calls == 3  # everything sampled again
    assert len(read_jsonl(out)) == 5


def test_validate_end_samples_a_finished_model(prompt_file, tmp_path, tiny_moe_config):
    """`r1lightning validate` + `when: validate_end`: traces from a model without training it."""
    from r1lightning.data import PromptDataModule
    from r1lightning.policy import Policy
    from r1lightning.sft import SFTModule

    module = SFTModule(Policy(config=tiny_moe_config, tokenizer="char"), val_max_new_tokens=4)
    out = tmp_path / "teacher.jsonl"
    rs = make_rs(None, out, module.tokenizer, when="validate_end")
    dm = PromptDataModule(train_files=str(prompt_file), val_files=str(prompt_file), batch_size=5)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[rs])
    trainer.validate(module, datamodule=dm)
    rows = read_jsonl(out)  # prompts default to the data module's training files
    assert [r["prompt_index"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["source_model"] == "config:qwen3_moe" and rs.sampler.calls == 3


class FlakyJson:
    """`json` whose dumps fails on the n-th call, after earlier rows were written."""

    def __init__(self, fail_at):
        self.n, self.fail_at = 0, fail_at

    def dumps(self, *a, **k):
        self.n += 1
        if self.n == self.fail_at:
            raise OSError("disk full (simulated)")
        return json.dumps(*a, **k)

    def __getattr__(self, name):
        return getattr(json, name)


def test_a_crash_while_writing_leaves_no_partial_file(prompt_file, tmp_path, tiny_moe_config, monkeypatch):
    module = tiny_sft(tiny_moe_config)
    out = tmp_path / "traces.jsonl"
    monkeypatch.setattr(files_module, "json", FlakyJson(fail_at=3))
    with pytest.raises(OSError, match="disk full"):
        make_rs(prompt_file, out, module.tokenizer).run(None, module)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    # A complete older dataset survives a failed rewrite untouched.
    monkeypatch.setattr(files_module, "json", json)
    make_rs(prompt_file, out, module.tokenizer).run(None, module)
    before = out.read_bytes()
    monkeypatch.setattr(files_module, "json", FlakyJson(fail_at=2))
    with pytest.raises(OSError):
        make_rs(prompt_file, out, module.tokenizer, filters=RejectionFilters(require_format=False)).run(None, module)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_parquet_output_loads_as_sft_data(prompt_file, tmp_path, tiny_moe_config):
    from r1lightning.data import TraceDataModule

    module = tiny_sft(tiny_moe_config)
    out = tmp_path / "traces.parquet"
    make_rs(prompt_file, out, module.tokenizer, filters=RejectionFilters(max_per_prompt=1)).run(None, module)
    dm = TraceDataModule(train_files=str(out), batch_size=5, max_length=64)
    dm.connect(module.tokenizer)
    dm.setup("fit")
    assert len(dm.train_rows) == 5
    batch = next(iter(dm.train_dataloader()))
    supervised = module.tokenizer.decode([t for t in batch["labels"][0].tolist() if t >= 0])
    assert supervised.startswith("<think>") and supervised.endswith("</answer><|end|>")


def _two_rank_worker(rank, world, init_file, prompt_file, out, calls_dir, lockstep):
    import torch.distributed as dist

    from r1lightning.module import PolicyModule
    from r1lightning.tokenizer import build_char_tokenizer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tok = build_char_tokenizer()
        module = SimpleNamespace(tokenizer=tok, model=None, device=torch.device("cpu"), policy=None,
                                 decode=lambda ids: tok.batch_decode(ids, skip_special_tokens=True))  # fmt: skip
        rs = RejectionSampling(out, prompt_file, sampling=SamplingOptions(num_samples=5), batch_size=2)
        rs.sampler = sampler = StubSampler(tok, addition_sample)
        module.generate = lambda ids, mask, params, sampler: sampler.generate(None, ids, mask, params, tok.eos_token_id, tok.pad_token_id)
        module.score = lambda rollout, columns, rewards, **context: PolicyModule.score(module, rollout, columns, rewards, **context)
        strategy = SimpleNamespace(barrier=lambda name=None: dist.barrier(), gather_for_rollout=lockstep)
        trainer = SimpleNamespace(global_rank=rank, world_size=world, global_step=7, loggers=[], callback_metrics={}, strategy=strategy)
        rs.run(trainer, module)
        with open(os.path.join(calls_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"prompts": sorted(set(sampler.prompts_seen)), "calls": sampler.calls}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("lockstep", [False, True], ids=["ddp", "fsdp-like"])
def test_two_ranks_split_the_prompts_and_rank0_merges(prompt_file, tmp_path, lockstep):
    out = tmp_path / "traces.jsonl"
    # fork: the children need nothing re-imported, which keeps the test to a second or two
    torch.multiprocessing.start_processes(_two_rank_worker, args=(2, str(tmp_path / "init"), str(prompt_file), str(out), str(tmp_path), lockstep),
                                         nprocs=2, start_method="fork")  # fmt: skip
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # chunks [0,1], [2,3], [4]: rank 0 takes the first and third, rank 1 the second ...
    assert seen[0]["prompts"] == sorted(["What is 12+34?", "What is 5+7?", "What is 3+3?"]) and seen[0]["calls"] == 2
    # ... and when generation is a collective it samples one throwaway chunk to match rank 0.
    assert seen[1]["prompts"] == sorted(["What is 40+2?", "What is 99+1?"] + (["What is 5+7?", "What is 12+34?"] if lockstep else []))
    assert seen[1]["calls"] == (2 if lockstep else 1)
    rows = read_jsonl(out)
    assert [r["prompt_index"] for r in rows] == [0, 1, 2, 3, 4] and rows[0]["source_step"] == 7
