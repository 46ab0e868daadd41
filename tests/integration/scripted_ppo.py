"""The PPO stage with scripted rollouts: the launch target of the 2-process vs 1-process test.

Each response is a fixed function of its prompt (its last ordinary tokens, then EOS), so both
runs train on the same rollouts whatever the random streams of each process's sampler, and
every response has the same length, so a per-process token mean averaged over processes is the
global token mean. What is left to compare is the distributed part: whitening statistics,
reductions, gradient averaging, the KL controller and the Lagrange multiplier.

    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml \\
        -m tests.integration.scripted_ppo ppo key=value ...
"""

from __future__ import annotations

import sys

from pipeline import cli
from pipeline.text import eos_ids
from stages import ppo


def scripted_generate(model, tok, prompts, *, max_new_tokens: int, **_) -> list[list[int]]:
    stops = eos_ids(tok, model)
    responses = []
    for prompt in prompts:
        body = [t for t in prompt if t not in stops and t != tok.pad_token_id]
        responses.append(body[-(max_new_tokens - 1):] + [tok.eos_token_id])
    return responses


if __name__ == "__main__":
    ppo.generate = scripted_generate
    sys.exit(cli.main(sys.argv[1:]))
