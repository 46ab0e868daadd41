"""Generation on the default run's model against its limit, at the batch sizes the stages use.

    .venv/bin/python bench/generation.py    # ~8 min on 2 quiet cores; bench/results/generation.*

SmolLM2-135M-Instruct (the packaged model, fp32), chat-formatted prompts from
``data/wordnet/ppo.jsonl``, temperature 0.7 / 1.0 (label), at most 40 new tokens, stopping each
row at EOS. Three cases, each the batch one of the default's stages hands to the sampler:

- ``ppo``: 16 distinct prompts (``ppo.batch_size``);
- ``eval``: 32 distinct prompts (``eval.batch_size``);
- ``label``: 32 prompts x K = 8 samples = 256 rows (``label.batch_size`` x ``label.k``), where
  our sampler prefills each prompt once for its K rows.

For each, our ``pipeline.text.generate`` and Hugging Face ``model.generate`` (the same rows, the
same sampling), interleaved, ``--repeats`` runs each after a warm-up; tokens/s counts generated
tokens (the prefill's time included). The limit of a decoding step at batch B is the roofline
max(weight bytes / read bandwidth, 2 x parameters x B / matmul peak): every step reads all the
weights once and does a matrix-vector product per row. Both are measured here, at the same
thread count: the read bandwidth as the best of summing a 1 GiB fp32 tensor, the matmul peak as
the best 2048^2 matmul in the weights' dtype (``--dtype bfloat16``: half the bytes per step, and
on CPUs with AMX tiles several times the fp32 peak). KV-cache reads and the prefill are left out of the limit, so the
fraction of it reached is a lower bound on how close the decoding steps come; finished rows leave
our batch, which lowers the work per step and so, again, the fraction shown.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
DATA = ROOT / "data" / "wordnet" / "ppo.jsonl"

# name -> (distinct prompts, samples per prompt, temperature)
CASES = {"ppo": (16, 1, 0.7), "eval": (32, 1, 0.7), "label": (32, 8, 1.0)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {list(CASES)}")
    p.add_argument("--out", default=str(RESULTS / "generation"))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights dtype the model is sampled in (model.dtype) [float32]")
    p.add_argument("--profile-case", default="ppo",
                   help="case whose one call is profiled per operator ('' = none) [ppo]")
    args = p.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in [*args.cases, *([args.profile_case] if args.profile_case else [])]:
        if c not in CASES:
            p.error(f"unknown case {c!r}; choose from {list(CASES)}")
    return args


def best_rate(fn, repeats: int) -> float:
    fn()
    return max(fn() for _ in range(repeats))


def measure(model, tok, rows: list[list[int]], temperature: float, n: int,
            repeats: int) -> dict[str, list[tuple[int, int, float]]]:
    """(generated tokens, decoding steps, seconds) of each timed run of our sampler and of HF
    generate."""
    import torch

    from pipeline.text import generate, pad_prompts

    def ours() -> tuple[int, int, float]:
        t0 = time.perf_counter()
        out = generate(model, tok, rows, max_new_tokens=n, temperature=temperature,
                       batch_size=len(rows))
        return sum(len(r) for r in out), max(len(r) for r in out), time.perf_counter() - t0

    ids, mask = pad_prompts(rows, tok.pad_token_id)

    @torch.no_grad()
    def hf() -> tuple[int, int, float]:
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                             temperature=temperature, top_k=0, top_p=1.0,
                             max_new_tokens=n, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        dt = time.perf_counter() - t0
        new = out[:, ids.shape[1]:]
        # Rows that stopped are padded to the longest: count each up to its EOS.
        ends = (new == tok.eos_token_id).int()
        lengths = torch.where(ends.any(1), ends.argmax(1) + 1, new.shape[1])
        return int(lengths.sum()), new.shape[1], dt

    ours(), hf()  # warm-up
    runs: dict[str, list[tuple[int, int, float]]] = {"ours": [], "hf": []}
    for _ in range(repeats):
        runs["ours"].append(ours())
        runs["hf"].append(hf())
    return runs


def profile(model, tok, encoded: list[list[int]], case: str, n: int, top: int = 10) -> dict:
    """Self CPU time per operator of one call of our sampler on ``case``'s rows."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from pipeline.text import generate

    n_prompts, k, temperature = CASES[case]
    rows = [p for p in encoded[:n_prompts] for _ in range(k)]
    torch.manual_seed(0)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(model, tok, rows, max_new_tokens=n, temperature=temperature,
                 batch_size=len(rows))
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    ops = [{"name": e.key, "share": e.self_cpu_time_total / total, "calls": e.count}
           for e in events[:top]]
    ops.append({"name": "everything else", "share": 1 - sum(o["share"] for o in ops),
                "calls": sum(e.count for e in events[top:])})
    return {"case": case, "self_cpu_seconds": total / 1e6, "ops": ops}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from pipeline.config import ModelConfig
    from pipeline.data import load_prompts
    from pipeline.models import load_policy
    from pipeline.text import encode_prompt

    dtype = getattr(torch, args.dtype)
    model, tok = load_policy(ModelConfig(dtype=args.dtype))
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows_needed = max(n for n, _, _ in CASES.values())
    encoded = [encode_prompt(tok, p.prompt, 64) for p in load_prompts(str(DATA),
                                                                      limit=rows_needed)]

    big = torch.ones(256 * 1024 * 1024)  # 1 GiB of fp32

    def bandwidth() -> float:
        t0 = time.perf_counter()
        big.sum()
        return big.numel() * 4 / (time.perf_counter() - t0)

    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)

    def matmul() -> float:
        t0 = time.perf_counter()
        a @ b
        return 2 * 2048 ** 3 / (time.perf_counter() - t0)

    bw = best_rate(bandwidth, 5)
    peak = best_rate(matmul, 5)
    n = args.max_new_tokens
    result = {
        "command": " ".join([".venv/bin/python", "bench/generation.py", *(argv or sys.argv[1:])]),
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "loadavg_start": os.getloadavg()},
        "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": args.dtype,
        "model": ModelConfig().name_or_path, "params": n_params, "weight_bytes": weight_bytes,
        "read_bandwidth_gb_s": bw / 1e9, "matmul_peak_gflops": peak / 1e9,
        "max_new_tokens": n, "cases": {},
    }
    print(f"[generation] {n_params / 1e6:.1f}M params, read {bw / 1e9:.1f} GB/s, "
          f"matmul {peak / 1e9:.0f} GFLOP/s", flush=True)
    for case in args.cases:
        n_prompts, k, temperature = CASES[case]
        rows = [p for p in encoded[:n_prompts] for _ in range(k)]
        torch.manual_seed(0)
        runs = measure(model, tok, rows, temperature, n, args.repeats)
        batch = len(rows)
        step_s = max(weight_bytes / bw, 2 * n_params * batch / peak)
        limit = batch / step_s
        rec = {"prompts": n_prompts, "samples_per_prompt": k, "batch": batch,
               "temperature": temperature, "limit_tokens_per_s": limit,
               "limit_bound": "bandwidth" if weight_bytes / bw >= 2 * n_params * batch / peak
               else "compute"}
        for side, rs in runs.items():
            rates = [t / s for t, _, s in rs]
            # Each decoding step reads every weight however few rows are left in it, so the
            # time the run's own steps take at the bound is a second, tighter limit.
            step_fraction = [steps * step_s / s for _, steps, s in rs]
            rec[side] = {"tokens_per_s_median": statistics.median(rates),
                         "tokens_per_s": rates, "tokens": [t for t, _, _ in rs],
                         "steps": [st for _, st, _ in rs], "seconds": [s for _, _, s in rs],
                         "step_bound_fraction_median": statistics.median(step_fraction)}
        rec["ours_vs_hf"] = rec["ours"]["tokens_per_s_median"] / rec["hf"]["tokens_per_s_median"]
        rec["ours_fraction_of_limit"] = rec["ours"]["tokens_per_s_median"] / limit
        result["cases"][case] = rec
        print(f"[generation] {case} batch {batch}: ours {rec['ours']['tokens_per_s_median']:.0f}"
              f" tok/s, HF {rec['hf']['tokens_per_s_median']:.0f}, limit {limit:.0f} "
              f"({rec['limit_bound']})", flush=True)
    if args.profile_case:
        result["profile"] = profile(model, tok, encoded, args.profile_case, n)
    result["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    result["machine"]["loadavg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(out.with_suffix(".md").read_text())
    return 0


def markdown(r: dict) -> str:
    lines = [
        "# Generation on SmolLM2-135M-Instruct against its limit", "",
        f"{r['finished']}; torch {r['torch']}, {r['threads']} threads, "
        f"{r.get('dtype', 'float32')} weights; "
        f"{r['params'] / 1e6:.1f}M parameters = {r['weight_bytes'] / 1e6:.0f} MB of weights; "
        f"measured read bandwidth {r['read_bandwidth_gb_s']:.1f} GB/s, matmul peak "
        f"{r['matmul_peak_gflops']:.0f} GFLOP/s; at most {r['max_new_tokens']} new tokens, "
        f"median of the timed runs. Load average at the start "
        f"{r['machine']['loadavg_start'][0]:.2f}.", "",
        "| stage's batch | rows | ours tokens/s | HF generate tokens/s | ours / HF "
        "| limit tokens/s (bound) | ours / limit | ours' steps at the bound / its time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, c in r["cases"].items():
        shape = (f"{c['prompts']} prompts x {c['samples_per_prompt']}"
                 if c["samples_per_prompt"] > 1 else f"{c['prompts']} prompts")
        lines.append(f"| {case} ({shape}) | {c['batch']} | {c['ours']['tokens_per_s_median']:.0f} "
                     f"| {c['hf']['tokens_per_s_median']:.0f} | {c['ours_vs_hf']:.2f}x "
                     f"| {c['limit_tokens_per_s']:.0f} ({c['limit_bound']}) "
                     f"| {100 * c['ours_fraction_of_limit']:.0f}% "
                     f"| {100 * c['ours']['step_bound_fraction_median']:.0f}% |")
    lines += ["", "The limit counts decoding steps only (weights read once per step, a "
              "matrix-vector product per row), not the prefill or KV-cache reads, which the "
              "measured tokens/s include. Rows that reach EOS leave our batch, but a step "
              "reads every weight however few rows it has left: the last column is the time "
              "our run's own decoding steps would take at the bound, over the time it took.",
              ""]
    if r.get("profile"):
        lines += [f"Where the {r['profile']['case']} case's time goes (torch profiler, one call, "
                  "self CPU time by operator):", "", "| operator | share | calls |",
                  "|---|---|---|"]
        lines += [f"| {op['name']} | {100 * op['share']:.1f}% | {op['calls']} |"
                  for op in r["profile"]["ops"]]
        lines.append("")
    lines += ["Command:", "", "```", r["command"], "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
