"""The RLHF pipeline's shared code: config, data, models, run folders, training helpers."""

import os

# torch's OpenMP threads spin while they wait for work (300,000 iterations by default). On
# cores shared with another busy process the spinning threads take the CPU from the ones
# computing: two threads sampled 41 tokens/s there instead of 245 alone. A short spin (3,000)
# keeps 88% of the quiet speed and 119 tokens/s beside the busy process
# (bench/results/threads.md). Set before torch loads its OpenMP runtime (every entry point
# imports this package first); a wait policy or spin count the user exported wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "3000")
