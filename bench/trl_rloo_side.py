"""The TRL side of the RLOO rows: current trl's ``RLOOTrainer`` (our venv), never our code.

Same models as the PPO rows (policy = the SFT folder, reward model = the RM folder, no critic),
the prompts the driver tokenized with our chat formatting (decoded back to text, which TRL
tokenizes again without a template), k samples per prompt, the same response length, sampling,
PPO epochs (``num_iterations``) and minibatches (``steps_per_generation``), a fixed KL
coefficient (``beta``). One update = one generation batch and its epochs x minibatches
optimizer steps; a TrainerCallback stamps every step, and ``_generate_single_turn`` is wrapped
with a timer. Writes one JSON file like ``trl_side.py``.

    .venv/bin/python bench/trl_rloo_side.py --policy DIR --reward DIR --prompts FILE --out FILE \
        [--prompts-per-update 4 --k 4 --updates 3 --epochs 4 --minibatches 1 --threads 2]
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
    side_arguments(p, updates=3)
    p.add_argument("--prompts-per-update", type=int, default=4)
    p.add_argument("--k", type=int, default=4, help="samples per prompt (num_generations)")
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
    from trl import RLOOConfig, RLOOTrainer

    tok = AutoTokenizer.from_pretrained(args.policy)
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(
        args.reward, num_labels=1, dtype=torch.float32)
    for m in (policy, reward_model):
        m.config.pad_token_id = tok.pad_token_id
    peft_config = lora_config(args)

    with open(args.prompts) as f:
        prompts = [tok.decode(ids) for ids in json.load(f)]
    dataset = datasets.Dataset.from_dict({"prompt": prompts})

    marks: list[float] = []
    gen_seconds: list[float] = []
    gen_tokens: list[int] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, args_, state, control, **kw):
            marks.append(time.perf_counter())

        def on_step_end(self, args_, state, control, **kw):
            marks.append(time.perf_counter())

    steps_per_update = args.epochs * args.minibatches
    completions = args.prompts_per_update * args.k
    total_updates = args.warmup + args.updates
    with tempfile.TemporaryDirectory(prefix="trl-rloo-") as out_dir:
        config = RLOOConfig(
            output_dir=out_dir,
            per_device_train_batch_size=completions // args.minibatches,
            gradient_accumulation_steps=1,
            steps_per_generation=args.minibatches,
            num_generations=args.k,
            num_iterations=args.epochs,
            max_steps=total_updates * steps_per_update,
            max_completion_length=args.response_length,
            temperature=args.temperature,
            top_k=0,
            top_p=1.0,
            beta=args.kl_coef,
            learning_rate=args.lr,
            disable_dropout=True,
            shuffle_dataset=False,
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
        trainer = RLOOTrainer(model=policy, reward_funcs=reward_model, args=config,
                              train_dataset=dataset, processing_class=tok,
                              reward_processing_classes=tok, callbacks=[Timer()],
                              peft_config=peft_config)
        original = trainer._generate_single_turn

        def timed(prompt_ids, *rest, **kw):
            t0 = time.perf_counter()
            out = original(prompt_ids, *rest, **kw)
            gen_seconds.append(time.perf_counter() - t0)
            gen_tokens.append(sum(len(ids) for ids in out))
            return out

        trainer._generate_single_turn = timed
        t_setup = time.time() - t_process
        trainer.train()

    # One update = one generation batch and its epochs x minibatches optimizer steps.
    ends = marks[::steps_per_update]
    per_update = [b - a for a, b in zip(ends, ends[1:])]
    result = {
        "side": "trl_rloo",
        "update_seconds": per_update,
        "generate_seconds": gen_seconds,
        "generated_tokens": gen_tokens,
        "warmup": args.warmup,
        "setup_seconds": t_setup,
        "threads": torch.get_num_threads(),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters()
                                if p.requires_grad),
        "lora_r": args.lora_r,
        "peak_rss_mb_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **environment(),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    if len(per_update) != total_updates or len(gen_seconds) != total_updates:
        print(f"expected {total_updates} updates and generations, timed {len(per_update)} and "
              f"{len(gen_seconds)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
