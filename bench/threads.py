"""Generation throughput by thread setting, alone and beside another CPU-bound process.

Each case runs in a fresh process (OpenMP reads its settings when torch loads): SmolLM2-135M,
the label stage's shape (4 prompts x K = 8 samples, 24 new tokens, temperature 1.0), threads
1 or 2, and ``OMP_WAIT_POLICY`` unset (the OpenMP runtime's default: idle threads spin before
they sleep) or PASSIVE (idle threads sleep at once, the pipeline's default). "busy" starts a
one-thread matmul loop beside it first: a neighbour such as another stage, a test suite or a
browser. Cases are interleaved over ``--repeats``; the median tokens/s is reported.

    .venv/bin/python bench/threads.py --out bench/results/threads.json [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[1]))
sys.path.insert(0, sys.argv[2])
from pipeline.config import load_config
from pipeline.models import load_policy
from pipeline.text import encode_prompt, generate
cfg = load_config(sys.argv[2] + "/configs/default.yaml").model
model, tok = load_policy(cfg)
lines = open(sys.argv[2] + "/data/wordnet/ppo.jsonl").read().splitlines()[:4]
prompts = [encode_prompt(tok, json.loads(l)["prompt"], 48) for l in lines for _ in range(8)]
torch.manual_seed(0)
generate(model, tok, prompts[:8], max_new_tokens=4, temperature=1.0, batch_size=8)
t = time.perf_counter()
out = generate(model, tok, prompts, max_new_tokens=24, temperature=1.0, batch_size=32)
print(json.dumps({"tokens_per_s": sum(map(len, out)) / (time.perf_counter() - t)}))
"""

NEIGHBOUR = r"""
import torch
torch.set_num_threads(1)
a = torch.randn(1024, 1024)
while True:
    a @ a
"""


def run_case(threads: int, wait: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if wait and wait.startswith("spin="):
        env["GOMP_SPINCOUNT"] = wait[len("spin="):]
    elif wait:
        env["OMP_WAIT_POLICY"] = wait
    env["OMP_NUM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, "-c", WORKER, str(threads), str(ROOT)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--repeats", type=int, default=3)
    # GOMP_SPINCOUNT values to try with the default wait policy (idle threads spin this many
    # iterations, then sleep).
    p.add_argument("--spin", type=int, nargs="*", default=[])
    args = p.parse_args()
    cases = [(1, None), (2, None), (2, "PASSIVE")] + [(2, f"spin={n}") for n in args.spin]
    rates: dict[str, list[float]] = {}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for busy in (False, True):
            neighbour = None
            if busy:
                neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR],
                                             env={**os.environ, "OMP_NUM_THREADS": "1"})
                time.sleep(2)
            try:
                for threads, wait in cases:
                    key = f"{'busy' if busy else 'alone'} threads={threads} wait={wait or 'default'}"
                    rates.setdefault(key, []).append(run_case(threads, wait))
            finally:
                if neighbour is not None:
                    neighbour.kill()
                    neighbour.wait()
    loads.append(os.getloadavg()[0])
    result = {"command": "python bench/threads.py " + " ".join(sys.argv[1:]),
              "cpus": os.cpu_count(), "load_average_start_end": loads,
              "tokens_per_s": {k: round(statistics.median(v), 1) for k, v in rates.items()},
              "runs": {k: [round(x, 1) for x in v] for k, v in rates.items()}}
    for k, v in result["tokens_per_s"].items():
        print(f"{k:40s} {v:7.1f} tokens/s")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
