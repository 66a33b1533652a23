"""RLOO through TRL's RLOOTrainer: k samples per prompt, each one's baseline the mean reward of the
other k-1; the reward is the proxy RM's score with a KL penalty (beta) to the round's reference. TRL
samples its rollouts itself with `generate`; with `generate.backend: vllm` the round's Sampler does (its vLLM
runs in another environment, which TRL's own vLLM modes cannot reach), on the weights of that moment."""

from __future__ import annotations

from rlhf.ml.cotrain import CoTrainMixin


def update(u) -> dict:
    import numpy as np
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer
    from trl.trainer.utils import add_fused_lm_head

    from rlhf.ml import models
    from rlhf.ml.chat import stop_ids

    up, s = u.cfg.update_policy, u.cfg.rollouts()

    stops = set(stop_ids(u.tok, u.policy.generation_config))

    def proxy_reward(prompts, completions, completion_ids, **_):
        # Scored as the RM was trained, prompt + completion + eos, where the completion ended (TRL's text has
        # no eos); one cut at max_completion_length without, less the penalty (update_policy.unfinished).
        done = np.array([any(t in stops for t in ids) for ids in completion_ids])
        scores = u.proxy(prompts, completions, done)
        return (scores - (up.missing_eos_penalty * ~done if up.unfinished == "penalty" else 0)).tolist()

    args = models.train_args(
        RLOOConfig,
        u.cfg,
        u.seed,
        u.scratch,
        beta=up.rloo.beta,
        num_train_epochs=up.rloo.epochs,
        learning_rate=up.rloo.learning_rate,
        per_device_train_batch_size=up.batch_size,
        num_generations=up.k,
        max_completion_length=s.max_new_tokens,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        logging_steps=10,
        mask_truncated_completions=up.unfinished == "drop",
    )
    rollouts = (SamplerRollouts,) if s.backend == "vllm" else ()
    u.trainer = trainer = models.trainer(
        type("CoTrainRLOO", (*rollouts, CoTrainMixin, RLOOTrainer), {"aux": u.aux, "sampler": u.sample, "s": s}),
        u.checkpoints,
        model=u.policy,
        reward_funcs=proxy_reward,
        args=args,
        processing_class=u.tok,
        train_dataset=Dataset.from_list([{"prompt": p} for p in u.prompts]),
    )
    if trainer.beta:  # TRL would reload the policy's own checkpoint as the reference: use the round's
        add_fused_lm_head(u.ref, temperature=trainer.temperature)  # as TRL prepares its own reference
        trainer.ref_model = _prepared_reference(trainer, u.ref)
        peft = getattr(trainer.model, "peft_config", {})
        if "ref" in peft:  # the adapter copy TRL keeps as a reference would go unused, and be saved
            trainer.model.delete_adapter("ref")
    result = trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {
        "train_loss": result.training_loss,
        "reward_first": rewards[0] if rewards else None,
        "reward_last": rewards[-1] if rewards else None,
    }


class SamplerRollouts:
    """RLOOTrainer's rollouts from the round's Sampler (`sampler`, with the rollouts' sampling `s`): TRL hands
    over the tokenised prompts, each repeated per sample, and takes each one's completion ids, ended by the
    stop id it reached, as its own generate gives them. The sampler serves the policy's current weights."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
        return self.sampler.sample_ids(prompt_ids, 1, self.s, self.s.max_new_tokens).response_ids


def _prepared_reference(trainer, ref):
    """The reference prepared as RLOOTrainer prepares its own: sharded like the policy under DeepSpeed or FSDP
    (TRL's helpers), else placed for inference."""
    from trl.models.utils import prepare_deepspeed, prepare_fsdp

    if trainer.is_deepspeed_enabled:
        return prepare_deepspeed(ref, trainer.accelerator)
    if trainer.is_fsdp_enabled:
        return prepare_fsdp(ref, trainer.accelerator)
    return trainer.accelerator.prepare_model(ref, evaluation_mode=True)
