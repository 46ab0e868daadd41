"""bf16 autocast against fp32 on this CPU, from a single matmul up to the default model.

    .venv/bin/python bench/precision.py      # ~2 min on 2 quiet cores; bench/results/precision_kernels.*

Three levels, each fp32 and bf16 autocast in turn (the median of ``--repeats`` calls after two
warm-ups), at
``--threads``:

- a 2048 x 2048 matmul (the machine's peak in each dtype);
- the weight matmuls of one decoding step at batch 16 (SmolLM2-135M's shapes, the output
  head's 49k x 576 included);
- a forward, and a forward + backward, of the packaged SmolLM2-135M-Instruct on 32 x 48 random
  tokens: full fine-tuning, every weight trainable, so autocast casts each weight once per pass.

What the stages gain is another matter (LoRA keeps the base weights frozen, so autocast
re-casts them on every call, and the shapes vary from batch to batch): bench/results/precision.md
has the stage-level figures.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

from bench.common import timed, write_results  # noqa: E402

# SmolLM2-135M: the per-layer weight shapes (out, in) of a decoding step, and the output head.
LAYER_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576),
                (576, 1536)]
LAYERS = 30
HEAD = (49152, 576)


def best(fn, repeats: int) -> float:
    """Seconds per call (the median after two warm-up calls)."""
    return timed(fn, repeats) / 1000.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "precision_kernels"))
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    from pipeline.config import ModelConfig
    from pipeline.models import load_policy

    rows: list[dict] = []

    def record(what: str, fp32: float, bf16: float, unit: str, work: float | None = None):
        row = {"what": what, "fp32_s": fp32, "bf16_s": bf16, "speedup": fp32 / bf16}
        if work is not None:
            row.update({"fp32_rate": work / fp32, "bf16_rate": work / bf16, "unit": unit})
        rows.append(row)
        print(f"[precision] {what}: fp32 {fp32 * 1e3:.1f} ms, bf16 {bf16 * 1e3:.1f} ms, "
              f"{fp32 / bf16:.2f}x", flush=True)

    a = torch.randn(2048, 2048)
    times = {}
    for dt in (torch.float32, torch.bfloat16):
        m = a.to(dt)
        times[dt] = best(lambda m=m: m @ m, args.repeats)
    record("matmul 2048 x 2048", times[torch.float32], times[torch.bfloat16], "GFLOP/s",
           2 * 2048 ** 3 / 1e9)

    x = torch.randn(16, 1536)
    for name, shapes in [("decoding step, 30 layers' weights, batch 16", LAYER_SHAPES * LAYERS),
                         ("decoding step, output head, batch 16", [HEAD])]:
        times = {}
        for dt in (torch.float32, torch.bfloat16):
            ws = [torch.randn(o, i, dtype=dt) for o, i in shapes]
            xs = {i: x[:, :i].to(dt).contiguous() for _, i in shapes}
            times[dt] = best(lambda ws=ws, xs=xs: [F.linear(xs[w.shape[1]], w) for w in ws],
                             args.repeats)
        weight_gb = sum(o * i for o, i in shapes) * 4 / 1e9
        record(name, times[torch.float32], times[torch.bfloat16], "GB/s of fp32 weights",
               weight_gb)

    model, _ = load_policy(ModelConfig())
    ids = torch.randint(0, 1000, (32, 48))

    def forward(bf16: bool):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(ids)

    def forward_backward(bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids).logits
        logits.float().mean().backward()
        model.zero_grad(set_to_none=True)

    for name, fn in [("SmolLM2-135M forward, 32 x 48 tokens", forward),
                     ("SmolLM2-135M forward + backward, 32 x 48 tokens", forward_backward)]:
        record(name, best(lambda fn=fn: fn(False), args.repeats),
               best(lambda fn=fn: fn(True), args.repeats), "tokens/s", 32 * 48)

    result = {"command": " ".join([".venv/bin/python", "bench/precision.py",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "finished": _dt.datetime.now().isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "loadavg": os.getloadavg()},
              "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    lines = ["# bf16 autocast against fp32: kernels", "",
             f"{result['finished']}; torch {result['torch']}, {result['threads']} threads, median "
             f"of {args.repeats} calls after 2 warm-ups; load average {result['machine']['loadavg'][0]:.2f}.", "",
             "| what | fp32 | bf16 | bf16 speed-up | fp32 rate | bf16 rate |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        rates = (f"| {r['fp32_rate']:.0f} {r['unit']} | {r['bf16_rate']:.0f} {r['unit']} |"
                 if "unit" in r else "| | |")
        lines.append(f"| {r['what']} | {r['fp32_s'] * 1e3:.1f} ms | {r['bf16_s'] * 1e3:.1f} ms "
                     f"| {r['speedup']:.2f}x {rates}")
    lines += ["", "Command:", "", "```", result["command"], "```", ""]
    write_results(args.out, result, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
