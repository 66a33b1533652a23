"""Write the shipped data of the offline default from data/world.json (deterministic).

    python data/make_data.py        # rewrites data/prompts/*.jsonl, data/sft.jsonl, data/pretrain.txt,
                                    # data/cotrain.jsonl, data/heldout.jsonl

Prompts are every (opener, topic, closer) combination, shuffled and split into disjoint sets:
`eval` (held out from everything), `label` (the label step's prompts) and `policy` (the policy
update's prompts). The SFT answers are deliberately mediocre so the round-0 policy starts well below
the judge's best: each sentence is on the asked topic with probability 0.55, about another topic
with 0.30 and about the pink elephant with 0.15, and an answer has 1-6 sentences.
"""

import itertools
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
MIX = {"on_topic": 0.55, "other_topic": 0.30, "forbidden": 0.15}


def sentence(rng: random.Random, world: dict, topic: str, kind: str) -> str:
    if kind == "forbidden":
        template = rng.choice(world["forbidden_sentences"])
        return template.format(big=rng.choice(world["big"]), noun=rng.choice(world["topics"][topic]["nouns"]))
    if kind == "other_topic":
        topic = rng.choice([t for t in world["topics"] if t != topic])
    nouns, adjectives = world["topics"][topic]["nouns"], world["topics"][topic]["adjectives"]
    noun, noun2 = rng.sample(nouns, 2)
    return rng.choice(world["sentence_templates"]).format(noun=noun, noun2=noun2, adj=rng.choice(adjectives))


def answer(rng: random.Random, world: dict, topic: str) -> str:
    kinds = rng.choices(list(MIX), weights=list(MIX.values()), k=rng.randint(1, 6))
    return " ".join(sentence(rng, world, topic, k) for k in kinds)


def main() -> None:
    world = json.loads((HERE / "world.json").read_text())
    rng = random.Random(1234)
    combos = list(itertools.product(world["prompt_openers"], world["topics"], world["prompt_closers"]))
    rng.shuffle(combos)
    prompts = [{"topic": t, "prompt": world["prompt_format"].format(opener=o, topic=t, closer=c)} for o, t, c in combos]
    splits = {"eval": prompts[:100], "label": prompts[100:300], "policy": prompts[300:]}
    # Prompt sets hold the user's question; the policy's chat template renders it as a dialogue turn. The
    # SFT, pre-training and co-training texts are already rendered (TRL's standard prompt/completion rows).
    dialogue = [{**p, "prompt": world["dialogue_format"].format(prompt=p["prompt"])} for p in prompts]
    for name, rows in splits.items():
        lines = [json.dumps({"id": f"{name}-{i:04d}", **r}) for i, r in enumerate(rows)]
        (HERE / "prompts" / f"{name}.jsonl").write_text("\n".join(lines) + "\n")

    train_prompts = dialogue[100:]  # the label and policy prompts
    sft = []
    for i in range(3000):
        p = rng.choice(train_prompts)
        sft.append(
            json.dumps(
                {"id": f"sft-{i:04d}", "prompt": p["prompt"], "completion": " " + answer(rng, world, p["topic"])}
            )
        )
    (HERE / "sft.jsonl").write_text("\n".join(sft) + "\n")

    # Plain text for the brief pre-training of the base model: dialogues, trained on every token. (Answers
    # alone taught a base that ignored the prompt, and SFT never recovered the topic from it.)
    lines = []
    for _ in range(4000):
        p = rng.choice(train_prompts)
        lines.append(p["prompt"] + " " + answer(rng, world, p["topic"]))
    (HERE / "pretrain.txt").write_text("\n".join(lines) + "\n")

    # The co-training set (update_policy.cotrain): more dialogues of the SFT distribution, so that mixing
    # it into a policy update pulls toward the model's priors. Its own generator leaves the files above as they were.
    aux_rng = random.Random(4321)
    aux = []
    for i in range(500):
        p = aux_rng.choice(train_prompts)
        aux.append(
            json.dumps(
                {
                    "id": f"cotrain-{i:04d}",
                    "prompt": p["prompt"],
                    "completion": " " + answer(aux_rng, world, p["topic"]),
                }
            )
        )
    (HERE / "cotrain.jsonl").write_text("\n".join(aux) + "\n")
    trained = set(lines) | {r["prompt"] + r["completion"] for r in map(json.loads, sft + aux)}
    heldout(world, train_prompts, trained)


def heldout(world: dict, train_prompts: list[dict], trained: set[str], n: int = 24) -> None:
    """data/heldout.jsonl (evaluate.heldout): general text the policy's NLL is measured on, n rows drawn as the
    pre-training text is (`text`, every token scored) and n as the co-training set is (`prompt`/`completion`,
    the completion scored), none equal to a row any step trains on. Drawn from the same sources by a generator
    of its own rather than cut out of pretrain.txt or cotrain.jsonl, so the files above, and so what the
    default run trains on and its numbers, stay as they were."""
    rng = random.Random(2468)
    rows = []
    for source in ("pretrain", "cotrain"):
        kept = 0
        while kept < n:
            p = rng.choice(train_prompts)
            reply = " " + answer(rng, world, p["topic"])
            if p["prompt"] + reply in trained:
                continue
            text = (
                {"text": p["prompt"] + reply} if source == "pretrain" else {"prompt": p["prompt"], "completion": reply}
            )
            rows.append(json.dumps({"id": f"heldout-{source}-{kept:02d}", "source": source, **text}))
            kept += 1
    (HERE / "heldout.jsonl").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
