import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from r1lightning import Policy
from r1lightning.policy import export_pretrained

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             max_position_embeddings=128)
ARCHS = {
    "qwen3_moe": dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, head_dim=16),
    "qwen2_moe": dict(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2": {},
    "llama": {},
}


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_builds_from_config_and_round_trips_through_save_pretrained(model_type, tmp_path):
    torch.manual_seed(0)
    policy = Policy(config={"model_type": model_type, **SMALL, **ARCHS[model_type]}, tokenizer="char")
    model, tok = policy.build()
    assert model.config.vocab_size == len(tok) and model.config.pad_token_id == tok.pad_token_id
    export_pretrained(model, tok, tmp_path / "export")

    # Loaded back through the policy and through plain transformers: identical logits.
    ours, our_tok = Policy(name_or_path=str(tmp_path / "export")).build()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    plain_tok = AutoTokenizer.from_pretrained(tmp_path / "export")
    text = "<|user|>What is 12 + 34?<|end|><|assistant|>"
    want = tok(text, add_special_tokens=False)["input_ids"]
    assert our_tok(text, add_special_tokens=False)["input_ids"] == want
    ids = torch.tensor([want])
    if type(plain_tok).__name__ == "Qwen2Tokenizer":
        # transformers (5.24) builds Qwen2Tokenizer for every qwen2 checkpoint whatever tokenizer_config.json
        # declares; it drops the spaces (export warns; tests/test_export_student.py). The project loads the
        # declared class, so everything else below still holds.
        assert model_type == "qwen2" and plain_tok(text, add_special_tokens=False)["input_ids"] != want
    else:
        assert plain_tok(text, add_special_tokens=False)["input_ids"] == want
    model.eval(), ours.eval(), plain.eval()
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(ours(ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(plain(ids).logits, expected, rtol=0, atol=0)


def test_export_is_atomic_and_replaces_an_old_export(tmp_path, tiny_moe_config):
    model, tok = Policy(config=tiny_moe_config, tokenizer="char").build()
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    export_pretrained(model, tok, target)
    assert not (target / "stale.txt").exists() and (target / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp directory left behind


def test_missing_model_path_names_the_path(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match=f"policy.init_args.name_or_path: path does not exist: {missing}"):
        Policy(name_or_path=missing, tokenizer="char").build()
    with pytest.raises(FileNotFoundError, match="policy.init_args.tokenizer: path does not exist: ./nope"):
        Policy(name_or_path=missing, tokenizer="./nope").build_tokenizer()


def test_bad_policy_arguments():
    with pytest.raises(ValueError, match="exactly one of"):
        Policy()
    with pytest.raises(ValueError, match="missing key `model_type`"):
        Policy(config={"hidden_size": 8})


@pytest.mark.parametrize("cudnn", [False, True, "auto"])
def test_cudnn_attention_flag_holds_through_forward_and_backward_and_is_restored(tmp_path, cudnn):
    """SDPA's cuDNN kernel is off while a policy trains (unless asked for; `auto` lets only GRPO's recurring
    micro-batch shapes have it), in the step and in backward (where checkpointed layers recompute
    attention), and the process's setting comes back after fit."""
    import lightning as L

    from r1lightning.data import TraceDataModule
    from r1lightning.sft import SFTModule
    from tests.test_strategies import TINY, write_data

    class Seen(L.Callback):
        def __init__(self):
            self.values = []

        def on_train_batch_start(self, *args):
            self.values.append(torch.backends.cuda.cudnn_sdp_enabled())

        def on_after_backward(self, *args):
            self.values.append(torch.backends.cuda.cudnn_sdp_enabled())

    traces, _ = write_data(tmp_path)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    seen = Seen()
    module = SFTModule(Policy(config=TINY, tokenizer="char", moe_backend="eager", cudnn_attention=cudnn), lr_schedule="constant")
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[seen])
    try:
        trainer.fit(module, TraceDataModule(train_files=str(traces), batch_size=4))
        assert seen.values == [cudnn is True] * 4
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
