"""The PPO stage with scripted rollouts that differ within a prompt's group: the launch target
of the 2-process vs 1-process test of the group estimators.

The j-th response to a prompt in a rollout is its last ``max_new_tokens - 1 - 3j`` ordinary
tokens, then EOS: responses to one prompt differ in length and word count (so a length reward
gives the group baseline something to compare), and every process holds the same lengths, so
its token means average to the global ones.

    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml \\
        -m tests.integration.scripted_groups ppo key=value ...
"""

from __future__ import annotations

import sys
from collections import Counter

from pipeline import cli
from pipeline.text import eos_ids
from stages import ppo


def scripted_group_generate(model, tok, prompts, *, max_new_tokens: int,
                            **_) -> list[list[int]]:
    stops = eos_ids(tok, model)
    seen: Counter = Counter()
    responses = []
    for prompt in prompts:
        j = seen[tuple(prompt)]
        seen[tuple(prompt)] += 1
        body = [t for t in prompt if t not in stops and t != tok.pad_token_id]
        responses.append(body[-(max_new_tokens - 1 - 3 * j):] + [tok.eos_token_id])
    return responses


if __name__ == "__main__":
    ppo.generate = scripted_group_generate
    sys.exit(cli.main(sys.argv[1:]))
