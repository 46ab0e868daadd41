"""What the two TRL side scripts of the benchmark share: their common arguments, the peft LoRA
config, the versions and thread settings they record. Imports nothing of ours and nothing heavy
at import time (each side runs in its own venv, and parses arguments before loading torch)."""

from __future__ import annotations

import argparse
import os
import sys


def side_arguments(p: argparse.ArgumentParser, updates: int) -> None:
    """The models, prompts, output and PPO-loop settings both sides take from the driver."""
    p.add_argument("--policy", required=True)
    p.add_argument("--reward", required=True)
    p.add_argument("--prompts", required=True, help="JSON list of prompt token-id lists")
    p.add_argument("--out", required=True)
    p.add_argument("--updates", type=int, default=updates, help="timed updates (after the warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--minibatches", type=int, default=1)
    p.add_argument("--response-length", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=3e-6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="no", choices=["no", "bf16"],
                   help="autocast: TRL's bf16 flag (on CPU, torch's bf16 autocast)")
    p.add_argument("--lora-r", type=int, default=0,
                   help="train a peft LoRA adapter of this rank on the policy (0: full)")
    p.add_argument("--lora-alpha", type=int, default=32)


def lora_config(args: argparse.Namespace):
    """peft's LoraConfig of our LoRA rows (every linear layer, no dropout), or None."""
    if not args.lora_r:
        return None
    from peft import LoraConfig

    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")


def environment() -> dict:
    """The library versions and thread settings a side ran with."""
    import accelerate
    import datasets
    import torch
    import transformers
    import trl

    return {"versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                         "transformers": transformers.__version__, "trl": trl.__version__,
                         "datasets": datasets.__version__, "accelerate": accelerate.__version__},
            "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}}
