"""The RLHF pipeline's shared code: config, data, models, run folders, training helpers."""

import os

# torch's OpenMP threads spin while they wait for work. On cores shared with other jobs the
# spinning threads take the CPU from the ones computing: two threads then generated 16 tokens/s
# where one thread made 63 and two passive threads 73 (bench/results/threads.md). Set before
# torch loads its OpenMP runtime (every entry point imports this package first); a value the
# user exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
