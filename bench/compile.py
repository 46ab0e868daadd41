"""torch.compile against eager for a PPO minibatch's forward + backward on this CPU.

    .venv/bin/python bench/compile.py     # ~10 min on 2 quiet cores; bench/results/compile.*

The packaged SmolLM2-135M-Instruct with the default LoRA adapter (r 16, every linear layer),
in training mode, on random tokens of a PPO minibatch's shape (4 rows x 54 columns, the
default run's prompt plus response); the loss is the mean log-sum-exp of the response
positions' logits, so the output head and its backward are in the pass. Three versions, each
timed as the median of ``--repeats`` calls after two warm-ups:

- eager, as every stage runs today;
- ``torch.compile(dynamic=False)``: one graph for this shape, recompiled for any other;
- ``torch.compile(dynamic=True)``: one graph with symbolic sizes, then timed again on a
  second shape (4 x 60) to show whether a new sequence length costs a recompile.

Compile time is the first call's wall time with an empty inductor cache (a fresh temporary
folder), the cost a run pays once per process and graph. Numerics: the loss's and the adapter
gradients' largest relative difference from eager, since fused kernels round differently and
so move a sampled trajectory as a thread count does.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

from bench.common import timed, write_results  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--columns", type=int, default=54)
    p.add_argument("--prompt", type=int, default=20, help="columns before the response")
    p.add_argument("--out", default=str(RESULTS / "compile"))
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    import torch

    torch.set_num_threads(args.threads)
    from pipeline.config import Config
    from pipeline.models import apply_lora, load_policy

    cfg = Config()
    base, _ = load_policy(cfg.model, seed=0)
    model = apply_lora(base, cfg.ppo.lora)
    model.train()
    generator = torch.Generator().manual_seed(0)

    def batch(columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(100, 10_000, (args.rows, columns), generator=generator)
        return ids, torch.ones_like(ids)

    def step(m, ids, attention) -> tuple[float, list[torch.Tensor]]:
        logits = m(input_ids=ids, attention_mask=attention).logits
        loss = logits[:, args.prompt:].float().logsumexp(-1).mean()
        loss.backward()
        grads = [q.grad.detach().clone() for q in model.parameters() if q.requires_grad]
        model.zero_grad(set_to_none=True)
        return float(loss.detach()), grads

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    shape = batch(args.columns)
    second = batch(args.columns + 6)
    eager_loss, eager_grads = step(model, *shape)
    rows = [{"version": "eager", "compile_s": 0.0,
             "step_ms": timed(lambda: step(model, *shape), args.repeats),
             "loss_rel_diff": 0.0, "grad_rel_diff": 0.0}]
    for dynamic in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(model, dynamic=dynamic)
        t = time.perf_counter()
        loss, grads = step(compiled, *shape)
        row = {"version": f"torch.compile(dynamic={dynamic})",
               "compile_s": time.perf_counter() - t,
               "step_ms": timed(lambda m=compiled: step(m, *shape), args.repeats),
               "loss_rel_diff": abs(loss - eager_loss) / abs(eager_loss),
               "grad_rel_diff": max(rel(g, e) for g, e in zip(grads, eager_grads))}
        if dynamic:
            t = time.perf_counter()
            step(compiled, *second)
            row["second_shape_first_call_s"] = time.perf_counter() - t
            row["second_shape_step_ms"] = timed(lambda m=compiled: step(m, *second), args.repeats)
        rows.append(row)
    eager_second = timed(lambda: step(model, *second), args.repeats)

    when = _dt.datetime.now().isoformat(timespec="seconds")
    result = {"when": when, "torch": torch.__version__, "threads": args.threads,
              "machine": platform.processor() or platform.machine(),
              "shape": [args.rows, args.columns], "second_shape": [args.rows, args.columns + 6],
              "eager_second_shape_step_ms": eager_second, "rows": rows}
    lines = [
        "# torch.compile vs eager: a PPO minibatch's forward + backward (SmolLM2-135M, LoRA r 16)",
        "",
        f"{when}; torch {torch.__version__}; {args.threads} threads; {args.rows} x "
        f"{args.columns} tokens (second shape {args.rows} x {args.columns + 6}); median of "
        f"{args.repeats} calls after 2 warm-ups; compile time with an empty inductor cache.",
        "",
        "| version | compile s | step ms | speed-up | loss rel. diff | grad rel. diff |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['version']} | {r['compile_s']:.0f} | {r['step_ms']:.0f} | "
                     f"{rows[0]['step_ms'] / r['step_ms']:.2f}x | {r['loss_rel_diff']:.1e} | "
                     f"{r['grad_rel_diff']:.1e} |")
    dyn = rows[-1]
    lines += [
        "",
        f"Second shape: eager {eager_second:.0f} ms; dynamic graph's first call "
        f"{dyn['second_shape_first_call_s']:.1f} s, then {dyn['second_shape_step_ms']:.0f} ms.",
        "",
        "Command:",
        "",
        "```",
        ".venv/bin/python bench/compile.py",
        "```",
        "",
    ]
    write_results(args.out, result, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
