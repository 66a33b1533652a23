"""Reward models as gold judges: any Hugging Face sequence-classification RM, and UltraRM's architecture.

Input is built from the conversation and the response, never from the policy's rendering, one of three ways
(`label.judge.input`): a plain `template` ("Human: {prompt}\\nAssistant: {response}", UltraRM's format)
filled in turn by turn, the judge tokenizer's own `chat` template, or a (question, answer) `pair` for
DeBERTa-style RMs (the last user turn). Texts are scored in length-sorted batches, so a batch wastes little
padding, in half precision on a GPU. Safety: remote code runs only with `trust_remote_code: true`, and
weights load from safetensors unless `allow_pickle: true`.
"""

from __future__ import annotations

import numpy as np

from rlhf.core.config import Judge
from rlhf.core.errors import UserError
from rlhf.core.prompts import last_user_turn, messages_of, text_length


def ultrarm_class():
    """UltraRM-13b's model (openbmb/UltraRM-13b): a LlamaModel with a bias-free `regression_head`, the reward
    read at the last non-pad token. It has no AutoModel mapping, so it is defined here."""
    import torch
    from transformers import LlamaModel, LlamaPreTrainedModel

    class LlamaRewardModel(LlamaPreTrainedModel):
        def __init__(self, config):
            super().__init__(config)
            self.model = LlamaModel(config)
            self.regression_head = torch.nn.Linear(config.hidden_size, 1, bias=False)
            self.post_init()

        def forward(self, input_ids, attention_mask=None, **_):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            rewards = self.regression_head(hidden).squeeze(-1)
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            last = mask.cumsum(1).argmax(1)  # the last non-pad position of each (right-padded) row
            return rewards.gather(1, last[:, None]).squeeze(1)

    return LlamaRewardModel


class ModelJudge:
    def __init__(self, spec: Judge, model, tok, dev: str):
        self.spec, self.model, self.tok, self.best = spec, model.eval(), tok, spec.best
        self.dev = dev

    def inputs(self, prompts: list, responses: list[str]) -> dict:
        s, tok = self.spec, self.tok
        kw = {"truncation": True, "max_length": s.max_length, "padding": True, "return_tensors": "pt"}
        if s.input == "pair":
            return tok([last_user_turn(p) for p in prompts], responses, **kw)
        if s.input == "chat":
            texts = [
                tok.apply_chat_template([*messages_of(p), {"role": "assistant", "content": r}], tokenize=False)
                for p, r in zip(prompts, responses)
            ]
            return tok(texts, add_special_tokens=False, **kw)
        return tok([fill_template(s.template, p, r) for p, r in zip(prompts, responses)], **kw)

    def score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        import torch

        order = length_order(prompts, responses)
        scores = np.empty(len(prompts), dtype=np.float64)
        for start in range(0, len(order), self.spec.batch_size):
            idx = order[start : start + self.spec.batch_size]
            batch = self.inputs([prompts[i] for i in idx], [responses[i] for i in idx]).to(self.dev)
            with torch.no_grad():
                out = self.model(**batch, use_cache=False)  # a KV cache would only hold memory
            out = out if isinstance(out, torch.Tensor) else out.logits[:, 0]
            scores[idx] = out.float().cpu().numpy()
        return scores


def fill_template(template: str, prompt, response: str) -> str:
    """A `template` judge's text: each earlier (user, answer) exchange and then this one, each through the
    template, one per line; a system turn leads as its own line."""
    turns, text, question = messages_of(prompt), [], None
    for m in turns:
        if m["role"] == "system":
            text.append(m["content"])
        elif m["role"] == "user":
            question = m["content"]
        elif question is not None:  # an earlier answer
            text.append(template.format(prompt=question, response=m["content"]))
            question = None
    return "\n".join([*text, template.format(prompt=question, response=response)])


def length_order(prompts: list, responses: list[str]) -> np.ndarray:
    """The order a model judge scores in: by length, so that a batch wastes little padding (stable)."""
    return np.argsort([text_length(p) + len(r) for p, r in zip(prompts, responses, strict=True)], kind="stable")


def load_model_judge(spec: Judge, dev: str) -> ModelJudge:
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    name = spec.name
    check_judge(spec)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=spec.trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise UserError(
                f"label.judge: {name} needs its own remote code to load; set "
                "label.judge.trust_remote_code: true if you trust it"
            ) from None
        raise UserError(f"label.judge: cannot load {name} ({e})") from None
    except OSError as e:
        raise UserError(f"label.judge.name: cannot load {name} ({str(e).splitlines()[0]})") from None
    kw = {"use_safetensors": not spec.allow_pickle or None, "trust_remote_code": spec.trust_remote_code}
    if dev.startswith("cuda"):  # half precision on a GPU
        kw["dtype"] = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        cls = ultrarm_class() if spec.type == "ultrarm" else AutoModelForSequenceClassification
        model, info = cls.from_pretrained(name, config=config, output_loading_info=True, **kw)
    except OSError as e:
        raise UserError(f"label.judge.name: cannot load {name} ({str(e).splitlines()[0]})") from None
    if info["missing_keys"]:  # e.g. a base LM's checkpoint: its reward head would be random
        raise UserError(
            f"label.judge.name: {name} lacks weights the judge needs ({', '.join(sorted(info['missing_keys'])[:3])}): "
            "not a reward model of this type"
        )
    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=spec.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"  # UltraRM and most RMs read the last non-pad token
    if spec.input == "chat" and not tok.chat_template:
        raise UserError(f"label.judge.input: {name} has no chat template; use input: template")
    model.config.pad_token_id = tok.pad_token_id
    return ModelJudge(spec, model.to(dev), tok, dev)


def check_judge(spec: Judge) -> None:
    """What can be checked of a local model judge without loading it (run before the first step): the
    checks of models.check_local_model, and a reward-model architecture rather than, say, a causal LM
    that would load with a random head."""
    from rlhf.ml.models import check_local_model

    config = check_local_model(spec.name, "label.judge", spec.trust_remote_code, spec.allow_pickle)
    arch = (config.get("architectures") or [""])[0]  # may be absent: the load then checks the weights
    if spec.type == "ultrarm" and config and (config.get("model_type") != "llama" or arch.endswith("ForCausalLM")):
        raise UserError(
            f"label.judge.type: ultrarm needs a Llama reward model with a regression_head; {spec.name} "
            f"is a {arch or config.get('model_type')}"
        )
    if spec.input == "chat" and config and not _has_chat_template(spec.name):
        raise UserError(f"label.judge.input: chat, but {spec.name} has no chat template; use input: template or pair")
    if spec.type == "hf" and arch and "auto_map" not in config and not arch.endswith("ForSequenceClassification"):
        raise UserError(
            f"label.judge.name: {spec.name} is a {arch}, not a sequence-classification reward model "
            "(for UltraRM's architecture use label.judge.type: ultrarm)"
        )


def _has_chat_template(folder: str) -> bool:
    """A local model's tokenizer names a chat template (tokenizer_config.json, or chat_template.jinja beside it)."""
    from transformers import AutoTokenizer

    return bool(AutoTokenizer.from_pretrained(folder).chat_template)
