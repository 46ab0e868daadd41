"""Distance to the machine's limit, measured in its own process (our venv).

1. Generation: tokens/s of our ``pipeline.text.generate`` vs a bare Hugging Face
   ``model.generate`` on the same model, prompts, batch, length and sampling settings.
2. Matmul peak: fp32 GFLOP/s of square matmuls at the benchmark's thread count, the ceiling
   the PPO train phase's achieved FLOP/s is compared with.

    .venv/bin/python bench/limits.py --policy DIR --prompts FILE --out FILE \
        [--batch 16 --response-length 32 --threads 2 --repeats 3 --matmul 2048]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--policy", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--response-length", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--matmul", type=int, default=2048)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from pipeline.config import ModelConfig
    from pipeline.models import load_policy
    from pipeline.text import generate, pad_prompts

    torch.manual_seed(0)
    model, tok = load_policy(ModelConfig(), name_or_path=args.policy)
    model.eval()
    prompts = json.loads(Path(args.prompts).read_text())[: args.batch]
    n = args.response_length

    def ours() -> int:
        out = generate(model, tok, prompts, max_new_tokens=n, temperature=args.temperature,
                       batch_size=args.batch)
        return sum(len(r) for r in out)

    ids, mask = pad_prompts(prompts, tok.pad_token_id)

    @torch.no_grad()
    def hf() -> int:
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                             temperature=args.temperature, top_k=0, top_p=1.0,
                             max_new_tokens=n, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        return int(out[:, ids.shape[1]:].numel())

    size = args.matmul
    a = torch.randn(size, size)
    b = torch.randn(size, size)

    def matmul_rate() -> float:
        t0 = time.perf_counter()
        a @ b
        return 2 * size ** 3 / (time.perf_counter() - t0)

    # Interleaved, and the matmul peak sampled between the generation runs: a few slow
    # seconds on a shared VM then cannot land on one side only, or set the whole ceiling.
    ours(), hf(), matmul_rate()  # warm-up
    timings: dict[str, dict[str, list]] = {"ours": {"rates": [], "secs": []},
                                           "hf": {"rates": [], "secs": []}}
    rates: list[float] = []
    for _ in range(args.repeats):
        for name, fn in (("ours", ours), ("hf", hf)):
            t0 = time.perf_counter()
            tokens = fn()
            dt = time.perf_counter() - t0
            timings[name]["secs"].append(dt)
            timings[name]["rates"].append(tokens / dt)
        rates += [matmul_rate() for _ in range(3)]

    def summary(name: str) -> dict:
        t = timings[name]
        return {"tokens_per_s_median": statistics.median(t["rates"]),
                "tokens_per_s_max": max(t["rates"]), "seconds": t["secs"]}

    res_ours, res_hf = summary("ours"), summary("hf")
    result = {
        "generation": {"ours": res_ours, "hf": res_hf, "batch": args.batch, "max_new_tokens": n,
                       "temperature": args.temperature,
                       "ours_vs_hf": res_ours["tokens_per_s_median"] / res_hf["tokens_per_s_median"]},
        "matmul": {"size": size, "gflops_max": max(rates) / 1e9,
                   "gflops_median": statistics.median(rates) / 1e9},
        "threads": torch.get_num_threads(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
