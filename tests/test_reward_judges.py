"""Gold judges built from reward models, with tiny models saved locally in each format: their scores match a
direct forward pass, and unsafe checkpoints are refused unless params allow them."""

import json

import pytest
import torch

from rlhf.core.config import Judge
from rlhf.core.errors import UserError
from rlhf.judges import CallableJudge
from rlhf.judges.reward_models import load_model_judge, ultrarm_class
from rlhf.ml import models

WORDS = "user : describe the ocean forest city please . assistant the water is blue and deep a tree grows".split()
PROMPTS = ["user : describe the ocean please . assistant :", "user : describe the city . assistant :"] * 3
RESPONSES = [" the water is blue .", " a tree grows .", " the water is deep and blue and blue .", "", " city", " a"]


def tiny_llama_config(tok, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=tok.pad_token_id,
        **kw,
    )


def direct(model, tok, texts=None, pairs=None):
    """One text at a time, no padding: the score a judge's batching must reproduce."""
    out = []
    with torch.no_grad():
        for item in texts or pairs:
            enc = tok(*item, return_tensors="pt") if pairs else tok(item, return_tensors="pt")
            y = model(**enc)
            out.append(float(y if isinstance(y, torch.Tensor) else y.logits[0, 0]))
    return out


def test_llama_sequence_classifier_with_plain_and_chat_templates(tmp_path):
    from transformers import LlamaForSequenceClassification

    tok = models.build_tokenizer([" ".join(WORDS) + " human : assistant:"])
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_llama_config(tok, num_labels=1)).eval()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    judge = load_model_judge(Judge(type="hf", name=str(tmp_path), batch_size=4), "cpu")
    expected = direct(model, tok, texts=[f"Human: {p}\nAssistant: {r}" for p, r in zip(PROMPTS, RESPONSES)])
    assert judge.score(PROMPTS, RESPONSES) == pytest.approx(expected, abs=1e-5)
    chat = load_model_judge(Judge(type="hf", name=str(tmp_path), input="chat"), "cpu")
    texts = [f"user : {p} assistant : {r} " for p, r in zip(PROMPTS, RESPONSES)]
    assert chat.score(PROMPTS, RESPONSES) == pytest.approx(direct(model, tok, texts=texts), abs=1e-5)


def test_deberta_v2_classifier_scores_question_answer_pairs(tmp_path):
    from tokenizers import processors
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    tok = models.build_tokenizer([" ".join(WORDS) + " [cls] [sep]"])
    cls, sep = tok.convert_tokens_to_ids(["[cls]", "[sep]"])
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="[cls] $A [sep]", pair="[cls] $A [sep] $B:1 [sep]:1", special_tokens=[("[cls]", cls), ("[sep]", sep)]
    )
    config = DebertaV2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        pad_token_id=tok.pad_token_id,
        num_labels=1,
        type_vocab_size=2,
    )
    torch.manual_seed(0)
    model = DebertaV2ForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    judge = load_model_judge(Judge(type="hf", name=str(tmp_path), input="pair", batch_size=4), "cpu")
    got = judge.score(PROMPTS, RESPONSES)
    assert got == pytest.approx(direct(model, tok, pairs=list(zip(PROMPTS, RESPONSES))), abs=1e-5)
    assert len(set(got.round(6))) > 2  # the scores depend on the answer


def test_ultrarm_architecture_loads_with_its_own_module_names(tmp_path):
    tok = models.build_tokenizer([" ".join(WORDS) + " human: assistant:"])
    config = tiny_llama_config(tok)
    config.architectures = ["LlamaRewardModel"]
    torch.manual_seed(0)
    model = ultrarm_class()(config).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "regression_head.weight" in keys and "model.embed_tokens.weight" in keys  # UltraRM-13b's names
    judge = load_model_judge(Judge(type="ultrarm", name=str(tmp_path), batch_size=4), "cpu")
    expected = direct(model, tok, texts=[f"Human: {p}\nAssistant: {r}" for p, r in zip(PROMPTS, RESPONSES)])
    assert judge.score(PROMPTS, RESPONSES) == pytest.approx(expected, abs=1e-5)


def test_remote_code_and_pickle_weights_are_refused_unless_allowed(tmp_path):
    from transformers import LlamaForSequenceClassification

    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(
        json.dumps(
            {
                "model_type": "armo_custom",
                "architectures": ["ArmoRM"],
                "auto_map": {
                    "AutoConfig": "modeling.ArmoConfig",
                    "AutoModelForSequenceClassification": "modeling.ArmoRM",
                },
            }
        )
    )
    (remote / "modeling.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(UserError, match="needs its own remote code.*trust_remote_code: true") as err:
        load_model_judge(Judge(type="hf", name=str(remote)), "cpu")
    assert "\n" not in str(err.value)

    tok = models.build_tokenizer([" ".join(WORDS)])
    pickled = tmp_path / "pickled"
    model = LlamaForSequenceClassification(tiny_llama_config(tok, num_labels=1))
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")  # the old pickle format (transformers 5 writes none)
    tok.save_pretrained(pickled)
    with pytest.raises(UserError, match="only pickle weights.*allow_pickle: true"):
        load_model_judge(Judge(type="hf", name=str(pickled)), "cpu")
    judge = load_model_judge(Judge(type="hf", name=str(pickled), allow_pickle=True), "cpu")
    assert judge.score(PROMPTS[:2], RESPONSES[:2]).shape == (2,)


def word_count(prompts, responses):
    return [len(r.split()) for r in responses]


def test_python_callable_judge():
    judge = CallableJudge("tests.test_reward_judges:word_count")
    assert judge.score(PROMPTS[:3], RESPONSES[:3]).tolist() == [5, 4, 9]
    with pytest.raises(UserError, match="cannot import tests.test_reward_judges:nope"):
        CallableJudge("tests.test_reward_judges:nope")
