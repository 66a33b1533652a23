"""Tiny models in the layouts of modern Hub models, built locally in seconds: byte-level BPE tokenizers
with special tokens and chat templates, no pad token, and reward models whose tokenizer is not the policy's.
They are saved with save_pretrained and loaded by path, the calls a Hub id takes."""

from __future__ import annotations

import json
import math
from pathlib import Path

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama-3-like: the template writes the BOS itself, and the tokenizer adds one too.
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# A judge's own template, of another family: Zephyr-style role tags.
ZEPHYR = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def questions(root: Path) -> list[str]:
    """The questions of the shipped SFT set (its prompts are rendered `user : <question> assistant :`)."""
    rows = [json.loads(line) for line in (root / "data" / "sft.jsonl").read_text().splitlines()]
    return [r["prompt"].removeprefix("user : ").removesuffix(" assistant :") for r in rows]


def conversational_sft(root: Path, dest: Path, n: int = 600) -> Path:
    """The shipped SFT set's short answers (a dozen words at most, so that a tiny model's answers end within
    a few dozen tokens) in TRL's conversational prompt/completion format, as JSONL."""
    rows = [json.loads(line) for line in (root / "data" / "sft.jsonl").read_text().splitlines()]
    short = [(q, r) for q, r in zip(questions(root), rows) if len(r["completion"].split()) <= 12][:n]
    with open(dest, "w") as f:
        for q, r in short:
            f.write(
                json.dumps(
                    {
                        "prompt": [{"role": "user", "content": q}],
                        "completion": [{"role": "assistant", "content": r["completion"].strip()}],
                    }
                )
                + "\n"
            )
    return dest


def bpe_tokenizer(texts: list[str], specials: list[str], template: str, eos: str, bos: str | None = None):
    """A byte-level BPE tokenizer trained on `texts`, with `specials` as special tokens and no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    if bos:  # the tokenizer adds a BOS to every text, as Llama's does
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, core.token_to_id(bos))]
        )
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos, bos_token=bos, model_max_length=1024)
    tok.chat_template = template
    return tok


def chat_policy(dest: Path, texts: list[str], kind: str = "qwen2", dtype=None, head_dim: int = 16) -> Path:
    """An untrained causal LM with a chat tokenizer: `qwen2` (ChatML, eos <|im_end|>, a second stop id
    <|endoftext|> in its generation config) or `llama3` (BOS added by template and tokenizer, eos <|eot_id|>);
    saved in `dtype` (default float32), as a Hub model is in its own. Width 64 in heads of `head_dim` (vLLM's CPU
    attention takes 64, not 16)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if kind == "qwen2":
        tok = bpe_tokenizer(texts, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML, "<|im_end|>")
        cls, config_cls = Qwen2ForCausalLM, Qwen2Config
    else:
        specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        tok = bpe_tokenizer(texts, specials, LLAMA3, "<|eot_id|>", bos="<|begin_of_text|>")
        cls, config_cls = LlamaForCausalLM, LlamaConfig
    heads = 64 // head_dim
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=heads)
    config = config_cls(
        vocab_size=len(tok),
        num_key_value_heads=min(2, heads),
        max_position_embeddings=1024,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=True,
        **shape,
    )
    model = cls(config)
    stops = [tok.eos_token_id] + ([tok.convert_tokens_to_ids("<|endoftext|>")] if kind == "qwen2" else [])
    model.generation_config = GenerationConfig(eos_token_id=stops, bos_token_id=tok.bos_token_id)
    model.to(dtype or torch.float32).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def answering_policy(dest: Path, vocab: int, shape: dict, answer_tokens: int, tie: bool = True) -> Path:
    """A Qwen2-layout chat policy of any width and number of vocabulary rows over a byte-level BPE of a few
    hundred tokens (Qwen's 151,936 rows also outnumber its tokenizer's tokens), answering like a trained model
    without training: random weights, shaped so that the output rows of the tokenizer's tokens give logits of
    spread 5 and the other rows next to none (it samples real tokens), the MLPs strong enough that the next token
    is not the last one again (tied rows), and the end-of-turn row set so that an answer ends before
    `answer_tokens` about as often as not (a real run's mix of finished and cut answers): measured at hidden 64,
    25-50% of answers end before 48 or 256 tokens; at Qwen2-0.5B's 24 layers almost none do. `shape`: Qwen2Config's
    hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, ..."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    root = Path(__file__).resolve().parents[1]
    texts = questions(root)[:2000] + (root / "data" / "pretrain.txt").read_text().splitlines()[:2000]
    tok = bpe_tokenizer(texts, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML, "<|im_end|>")
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab,
        max_position_embeddings=4096,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=tie,
        **shape,
    )
    model = Qwen2ForCausalLM(config)
    real, hidden, spread = len(tok), shape["hidden_size"], 5.0
    with torch.no_grad():
        # Each MLP a strong random map (pre-activations of spread 2, outputs 10x an embedding's length), so that
        # the last hidden state is the layers' work more than the input token's: with tied rows, a weak stack
        # would make the next token the last one again.
        inner = shape["intermediate_size"]
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight.normal_(0, 2 / math.sqrt(hidden))
            layer.mlp.up_proj.weight.normal_(0, 2 / math.sqrt(hidden))
            layer.mlp.down_proj.weight.normal_(0, 10 * spread / math.sqrt(hidden * inner))
        out = model.get_output_embeddings().weight
        out.normal_(0, 0.02 / math.sqrt(hidden))  # the rows no token of the tokenizer has: logits near 0
        out[:real].normal_(0, spread / math.sqrt(hidden))  # the final norm's output has length sqrt(hidden)
        out[tok.eos_token_id] = 0
        for _ in range(3):  # the row is also the token's input embedding, which the prompts hold: settle both
            out[tok.eos_token_id] = _end_row(model, tok, 1 / (1.5 * answer_tokens))
    model.generation_config = GenerationConfig(eos_token_id=[tok.eos_token_id], bos_token_id=None)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def _end_row(model, tok, rate: float):
    """The end-of-turn row that makes the model end an answer with probability `rate` at each token, on average
    over answers it samples: a direction the last hidden states share, scaled (by bisection) to that rate."""
    import torch

    torch.manual_seed(0)
    states = []
    for question in ("tell me about the sea .", "describe a city .", "what is music ?", "write about a garden ."):
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt"
        )
        prompt = prompt if isinstance(prompt, torch.Tensor) else prompt["input_ids"]
        ids = model.generate(  # full-length answers: the end-of-turn token suppressed while measuring its odds
            prompt,
            do_sample=True,
            max_new_tokens=48,
            num_return_sequences=4,
            pad_token_id=0,
            suppress_tokens=[tok.eos_token_id],
        )
        states.append(model.model(input_ids=ids).last_hidden_state[:, prompt.shape[1] - 1 : -1].flatten(0, 1))
    hidden = torch.cat(states)
    rows = model.get_output_embeddings().weight
    others = torch.cat([hidden @ rows[i : i + 4096].T for i in range(0, len(rows), 4096)], 1)
    others[:, tok.eos_token_id] = -math.inf
    log_z, direction = others.logsumexp(1), hidden.mean(0) / hidden.mean(0).norm()
    lo, hi = 0.0, 100.0
    for _ in range(60):  # the mean end probability rises with the scale: the hidden states lean along `direction`
        c = (lo + hi) / 2
        lo, hi = (c, hi) if torch.sigmoid(c * hidden @ direction - log_z).mean() < rate else (lo, c)
    return c * direction


def chat_judge(dest: Path, texts: list[str], hidden: int = 32, layers: int = 1) -> Path:
    """A GPT-NeoX sequence-classification reward model with its own byte-level tokenizer and a Zephyr-style
    chat template (neither the policy's tokens nor its template)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification

    torch.manual_seed(1)
    tok = bpe_tokenizer(texts, ["</s>", "<|user|>", "<|assistant|>", "<|system|>"], ZEPHYR, "</s>")
    config = GPTNeoXConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(4, hidden // 64),
        num_labels=1,
        max_position_embeddings=4096,
        pad_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    GPTNeoXForSequenceClassification(config).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def conversational_prompts(root: Path, dest: Path, split: str, n: int, system: bool = False) -> Path:
    """A shipped prompt set as a parquet file of `messages` conversations (a system turn on every other)."""
    import datasets

    rows = [json.loads(line) for line in (root / "data" / "prompts" / f"{split}.jsonl").read_text().splitlines()][:n]
    convs = []
    for i, r in enumerate(rows):
        turns = [{"role": "user", "content": r["prompt"]}]
        if system and i % 2:
            turns.insert(0, {"role": "system", "content": "answer in short sentences ."})
        convs.append({"id": r["id"], "messages": turns})
    datasets.Dataset.from_list(convs).to_parquet(str(dest))
    return dest
