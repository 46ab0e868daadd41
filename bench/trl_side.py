"""The TRL 1.12.0 side of the PPO benchmark: runs inside .venv-trl112, never imports our code.

Builds TRL's experimental ``PPOTrainer`` from the folders the driver saved (policy = the SFT
folder, reference = a second copy of it, reward model and value model = the RM folder) and the
prompts the driver tokenized with our chat formatting, trains for ``total_episodes =
batch * (1 + updates)`` and writes one JSON file: wall-clock seconds of every update (a
TrainerCallback's on_step_end timestamps), the generation seconds and generated tokens of every
update (TRL's ``batch_generation`` wrapped with a timer), peak RSS and library versions.

    .venv-trl112/bin/python bench/trl_side.py --policy DIR --reward DIR --prompts FILE \
        --out FILE [--batch 16 --updates 4 --epochs 4 --response-length 32 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time

from trl_common import environment, lora_config, side_arguments


def main() -> int:
    p = argparse.ArgumentParser()
    side_arguments(p, updates=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--missing-eos-penalty", type=float, default=1.0)
    args = p.parse_args()

    t_process = time.time()
    import torch

    torch.set_num_threads(args.threads)
    import datasets
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo_module

    tok = AutoTokenizer.from_pretrained(args.policy)
    tok.padding_side = "left"
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id

    def causal_lm():
        return AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32)

    def scorer():
        return AutoModelForSequenceClassification.from_pretrained(
            args.reward, num_labels=1, dtype=torch.float32)

    # TRL's peft path adapts the policy only: its reference is the policy with the adapter
    # disabled, and the value model still trains in full.
    peft_config = lora_config(args)
    policy = causal_lm()
    ref_policy = None if peft_config else causal_lm()
    reward_model, value_model = scorer(), scorer()
    for m in (policy, ref_policy, reward_model, value_model):
        if m is None:
            continue
        m.config.pad_token_id = tok.pad_token_id

    with open(args.prompts) as f:
        prompts = json.load(f)
    dataset = datasets.Dataset.from_dict({"input_ids": prompts})

    # Time each update; the generation phase via a wrapper around TRL's batch_generation.
    marks: list[float] = []
    gen_seconds: list[float] = []
    gen_tokens: list[int] = []
    original_batch_generation = trl_ppo_module.batch_generation

    def timed_batch_generation(model, queries, *rest, **kw):
        t0 = time.perf_counter()
        query_responses, logits = original_batch_generation(model, queries, *rest, **kw)
        gen_seconds.append(time.perf_counter() - t0)
        gen_tokens.append(int(queries.shape[0] * (query_responses.shape[1] - queries.shape[1])))
        return query_responses, logits

    trl_ppo_module.batch_generation = timed_batch_generation

    class Timer(TrainerCallback):
        def on_train_begin(self, args_, state, control, **kw):
            marks.append(time.perf_counter())

        def on_step_end(self, args_, state, control, **kw):
            marks.append(time.perf_counter())

    total_updates = args.warmup + args.updates
    with tempfile.TemporaryDirectory(prefix="trl-ppo-") as out_dir:
        config = PPOConfig(
            output_dir=out_dir,
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=1,
            num_mini_batches=args.minibatches,
            num_ppo_epochs=args.epochs,
            total_episodes=args.batch * total_updates,
            local_rollout_forward_batch_size=args.batch,
            response_length=args.response_length,
            temperature=args.temperature,
            kl_coef=args.kl_coef,
            kl_estimator="k1",
            learning_rate=args.lr,
            stop_token="eos",
            missing_eos_penalty=args.missing_eos_penalty,
            num_sample_generations=0,
            bf16=args.precision == "bf16",
            fp16=False,
            gradient_checkpointing=False,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=args.seed,
        )
        trainer = PPOTrainer(
            args=config,
            processing_class=tok,
            model=policy,
            ref_model=ref_policy,
            reward_model=reward_model,
            train_dataset=dataset,
            value_model=value_model,
            callbacks=[Timer()],
            peft_config=peft_config,
        )
        t_setup = time.time() - t_process
        trainer.train()

    per_update = [b - a for a, b in zip(marks, marks[1:])]
    n_params = sum(p.numel() for p in policy.parameters())
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result = {
        "side": "trl",
        "update_seconds": per_update,
        "generate_seconds": gen_seconds,
        "generated_tokens": gen_tokens,
        "warmup": args.warmup,
        "setup_seconds": t_setup,
        "threads": torch.get_num_threads(),
        "policy_params": n_params,
        "trainable_params_policy_and_value": n_trainable,
        "lora_r": args.lora_r,
        "peak_rss_mb_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **environment(),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    if len(per_update) != total_updates:
        print(f"expected {total_updates} updates, timed {len(per_update)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
