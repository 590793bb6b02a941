"""Training a scalar reward model (DeepSeek-R1 stage 4: helpfulness / harmlessness reward models).

Any transformers model becomes a reward model as `AutoModelForSequenceClassification` with one
label: the score is a linear head on the last non-pad token's hidden state. Two objectives:

- `bradley_terry`: preference pairs; -log sigmoid(r_chosen - r_rejected - margin) (InstructGPT,
  Llama 2's margin variant);
- `bce`: pointwise labels (e.g. safe = 1 / unsafe = 0); binary cross-entropy on the score as a logit.

Validation reports held-out pair accuracy (share of pairs with r_chosen > r_rejected) through
torchmetrics. At the end of fit the model is exported with `save_pretrained`; it loads in plain
transformers with `AutoModelForSequenceClassification.from_pretrained` and is usable as a reward
in any GRPO recipe (`r1lightning.rewards.reward_model`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from r1lightning.errors import UserError
from r1lightning.module import PolicyModule
from r1lightning.policy import Policy, count_parameters

log = logging.getLogger(__name__)

OBJECTIVES = ("bradley_terry", "bce")


# -- losses (pure functions) ---------------------------------------------------------------------
def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(r_c - r_r - m). chosen, rejected, margin: [B] scores."""
    diff = chosen.float() - rejected.float()  # [B]
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def pointwise_bce_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy with the score as a logit. scores [B], labels [B] in [0, 1]."""
    return F.binary_cross_entropy_with_logits(scores.float(), labels.float())


# -- the model -----------------------------------------------------------------------------------
class RewardModelSpec(Policy):
    """A `Policy` whose model is `AutoModelForSequenceClassification` with one label.

    Same arguments as `r1lightning.Policy` (a directory, a hub id or a config; `tokenizer: char`
    for the embedded one). A causal-LM checkpoint loads with a freshly initialised score head.
    """

    def build(self, tokenizer=None):
        from transformers import AutoModelForSequenceClassification

        tokenizer = tokenizer if tokenizer is not None else self.build_tokenizer()
        dtype = getattr(torch, self.dtype)
        if self.config is not None:
            config = self.model_config(tokenizer)
            config.num_labels = 1
            if self.attn_implementation:
                config._attn_implementation = self.attn_implementation
            model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
        else:
            self._check_exists(self.name_or_path, "policy.name_or_path")
            try:
                model = AutoModelForSequenceClassification.from_pretrained(
                    self.name_or_path, num_labels=1, dtype=dtype, revision=self.revision,
                    trust_remote_code=self.trust_remote_code, attn_implementation=self.attn_implementation,
                )  # fmt: skip
            except OSError as err:
                raise FileNotFoundError(f"policy.name_or_path: cannot load {self.name_or_path!r}: {str(err).splitlines()[0]}") from None
        if model.config.pad_token_id is None:
            # The score is read at the last non-pad token; transformers finds it through pad_token_id.
            model.config.pad_token_id = tokenizer.pad_token_id
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            raise ValueError(f"policy: tokenizer has {len(tokenizer)} tokens but the model's embedding has "
                             f"{model.get_input_embeddings().num_embeddings}")  # fmt: skip
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.moe_backend_in_effect = "transformers"
        log.info("reward model: %s, %.2fM parameters", type(model).__name__, count_parameters(model) / 1e6)
        return model, tokenizer


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[N] scalar scores of right- or left-padded sequences [N, T]."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.logits[:, 0]


class RewardModelModule(PolicyModule):
    def __init__(
        self,
        policy: RewardModelSpec,
        objective: str = "bradley_terry",
        center_rewards_coefficient: float = 0.0,
        **kwargs,
    ):
        """
        Args:
            policy: the network (`r1lightning.reward_model.RewardModelSpec`: a directory, hub id or
                config, as `r1lightning.Policy`).
            objective: `bradley_terry` (chosen / rejected pairs, an optional `margin` column) or
                `bce` (pointwise `label` in [0, 1]).
            center_rewards_coefficient: weight of mean((r_c + r_r)^2), which keeps scores near 0
                (comparable across checkpoints, ready for normalisation); 0 = off.
            kwargs: `PolicyModule` options (optimizer, warmup_steps, lr_schedule, export_dir, ...).
        """
        super().__init__(policy, **kwargs)
        if objective not in OBJECTIVES:
            raise UserError(f"model.objective: {objective!r} is not one of {', '.join(OBJECTIVES)}")
        self.save_hyperparameters(ignore=["policy", "optimizer"])
        self.is_moe, self.aux_coef = False, 0.0
        self.val_pair_accuracy = MeanMetric()
        self.val_margin = MeanMetric()
        self.val_bce_accuracy = MeanMetric()

    def configure_model(self) -> None:
        super().configure_model()
        self.is_moe, self.aux_coef = False, 0.0  # the load-balancing loss is not reported by classification heads

    def scores(self, input_ids, attention_mask) -> torch.Tensor:
        return sequence_scores(self.model, input_ids, attention_mask)

    def _pair_scores(self, batch):
        # chosen and rejected in one forward: [2B, T] -> [B], [B]
        scores = self.scores(batch["input_ids"], batch["attention_mask"])
        B = scores.shape[0] // 2
        return scores[:B], scores[B:]

    def training_step(self, batch, batch_idx):
        h = self.hparams
        if h.objective == "bradley_terry":
            chosen, rejected = self._pair_scores(batch)
            loss = bradley_terry_loss(chosen, rejected, batch.get("margin"))
            self.log("train/pair_accuracy", (chosen > rejected).float().mean(), on_step=True)
            self.log("train/score_gap", (chosen - rejected).detach().mean(), on_step=True)
            if h.center_rewards_coefficient:
                loss = loss + h.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
        else:
            scores = self.scores(batch["input_ids"], batch["attention_mask"])
            loss = pointwise_bce_loss(scores, batch["labels"])
            if h.center_rewards_coefficient:
                loss = loss + h.center_rewards_coefficient * (scores**2).mean()
        self.log("train/loss", loss.detach(), on_step=True, prog_bar=True)
        self.step_tokens = int(batch["attention_mask"].sum())
        return loss

    @torch.no_grad()
    def validation_step(self, batch, batch_idx):
        if self.hparams.objective == "bradley_terry":
            chosen, rejected = self._pair_scores(batch)
            self.val_pair_accuracy.update((chosen > rejected).double())
            self.val_margin.update((chosen - rejected).double())
        else:
            scores = self.scores(batch["input_ids"], batch["attention_mask"])
            self.val_bce_accuracy.update(((scores > 0).double() == (batch["labels"] > 0.5).double()).double())

    def on_validation_epoch_start(self):
        for m in (self.val_pair_accuracy, self.val_margin, self.val_bce_accuracy):
            m.set_dtype(torch.float64)

    def on_validation_epoch_end(self):
        if self.hparams.objective == "bradley_terry":
            self.log("val/pair_accuracy", self.val_pair_accuracy.compute(), prog_bar=True)
            self.log("val/score_gap", self.val_margin.compute())
        else:
            self.log("val/label_accuracy", self.val_bce_accuracy.compute(), prog_bar=True)
        for m in (self.val_pair_accuracy, self.val_margin, self.val_bce_accuracy):
            m.reset()

    def on_save_checkpoint(self, checkpoint):
        pass  # `r1lightning export` rebuilds causal LMs; the end-of-fit export below is the RM's

    def on_fit_end(self):
        if self.hparams.export_dir:
            path = export_reward_model(self.model, self.tokenizer, self.hparams.export_dir, self.trainer.is_global_zero)
            if path is not None:
                log.info("exported the reward model (save_pretrained) to %s", Path(path).resolve())


def export_reward_model(model, tokenizer, directory, is_global_zero: bool = True) -> Path | None:
    """`save_pretrained` of a sequence-classification model; under FSDP every rank calls it (the
    shards are gathered), rank 0 writes."""
    from transformers import AutoModelForSequenceClassification

    from r1lightning.policy import export_pretrained
    from r1lightning.strategies import full_state_dict

    state = full_state_dict(model)
    if not is_global_zero:
        return None
    if state is not None:
        with torch.device("meta"):
            plain = AutoModelForSequenceClassification.from_config(model.config)
        plain.load_state_dict(state, strict=True, assign=True)
        plain.tie_weights()
        model = plain.eval()
    return export_pretrained(model, tokenizer, directory)
