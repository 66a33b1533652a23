"""TRL's RewardTrainer with this project's objectives: `bt` and `bt_margin` are TRL's own (a "margin"
column); `absolute` and `combined` also carry each response's gold score through the collator."""

from __future__ import annotations

import torch
from trl import RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

GOLD = ("chosen_gold", "rejected_gold")


class GoldCollator(DataCollatorForPreference):
    def torch_call(self, examples):
        out = super().torch_call(examples)
        if GOLD[0] in examples[0]:  # chosen rows first, then rejected: the order of input_ids
            out["gold"] = torch.tensor([e[GOLD[0]] for e in examples] + [e[GOLD[1]] for e in examples])
        return out


class ObjectiveRewardTrainer(RewardTrainer):
    def __init__(self, *, model, objective: str = "bt", **kw):
        self.objective = objective
        heads = model.config.id2label
        if objective == "combined":  # TRL insists on one output; the second head is ours: hidden from its check
            model.config.id2label = {0: heads[0]}
        try:
            super().__init__(
                model=model, data_collator=GoldCollator(pad_token_id=kw["processing_class"].pad_token_id), **kw
            )
        finally:
            model.config.id2label = heads

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "rejected_ids", "margin", *GOLD]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.objective in ("bt", "bt_margin"):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        gold = inputs.pop("gold").float()
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits
        absolute = logits[:, -1].float()  # the absolute head: the only one, or the second
        loss = torch.nn.functional.mse_loss(absolute, gold)
        if self.objective == "combined":
            chosen, rejected = torch.chunk(logits[:, 0].float(), 2)
            loss = loss - torch.nn.functional.logsigmoid(chosen - rejected).mean()
        return (loss, {"logits": logits}) if return_outputs else loss
