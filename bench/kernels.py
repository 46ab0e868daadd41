"""Micro-benchmarks of the pieces that make our PPO step fast, each against the plain version.

    .venv/bin/python bench/kernels.py          # ~1 min; bench/results/kernels.{json,md}

Shapes are those of the 20M benchmark model (hidden 256, 49,152-token vocabulary) and of
SmolLM2-135M (hidden 576) for decoding: batch 16 x 32 response tokens (+1 for the logits
variant). Every row is the median of ``--repeats`` timed calls after 2 warm-up calls, at
``--threads`` torch threads. The two versions of each op are checked to agree before timing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import timed, write_results  # noqa: E402
from stages import ops  # noqa: E402

VOCAB = 49152


def autograd_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float):
    """The textbook version: autograd through scale, gather and logsumexp."""
    z = logits / temperature
    return torch.gather(z, -1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


def fwd_bwd(make, weights: torch.Tensor):
    def run():
        out = make()
        (out * weights).sum().backward()
    return run


def logprob_rows(repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 33, VOCAB, generator=g) * 3
    labels = torch.randint(0, VOCAB, (16, 33), generator=g)
    weights = torch.randn(16, 33, generator=g)
    leaf = logits.clone().requires_grad_(True)
    a = autograd_logprobs(leaf, labels, 0.7)
    b = ops.logprobs_from_logits(leaf, labels, 0.7)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    plain = timed(fwd_bwd(lambda: autograd_logprobs(leaf, labels, 0.7), weights), repeats)
    fused = timed(fwd_bwd(lambda: ops.logprobs_from_logits(leaf, labels, 0.7), weights), repeats)
    return [{"op": "log-prob of the sampled token, (16, 33, 49152) logits, T=0.7, fwd+bwd",
             "plain": "autograd: logits / T, gather - logsumexp", "plain_ms": plain,
             "ours": "ops.logprobs_from_logits (chunked, hand-written backward)",
             "ours_ms": fused}]


def head_rows(repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(512, 256, generator=g).requires_grad_(True)
    weight = (torch.randn(VOCAB, 256, generator=g) * 0.05).requires_grad_(True)
    labels = torch.randint(0, VOCAB, (512,), generator=g)
    weights = torch.randn(512, generator=g)
    workspace = ops.Workspace()

    def plain():
        logits = torch.nn.functional.linear(hidden, weight)
        return ops.logprobs_from_logits(logits, labels, 0.7)

    def ours():
        return ops.logprobs_from_hidden(hidden, weight, None, labels, 0.7, workspace)[0]

    torch.testing.assert_close(plain(), ours(), atol=1e-4, rtol=1e-4)
    for p in (hidden, weight):
        p.grad = None
    return [{"op": "output head + log-prob, 512 x 256 hidden -> 49152 vocab, fwd+bwd",
             "plain": "nn.functional.linear, then ops.logprobs_from_logits",
             "plain_ms": timed(fwd_bwd(plain, weights), repeats),
             "ours": "ops.logprobs_from_hidden (logits buffer reused as its gradient)",
             "ours_ms": timed(fwd_bwd(ours, weights), repeats)}]


def adam_rows(repeats: int) -> list[dict]:
    shapes = [(VOCAB, 256)] + [(256, 1024)] * 24 + [(256, 256)] * 32 + [(256,)] * 17
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    n = sum(p.numel() for p in params)
    times = {}
    for name, kwargs in (("for-loop", {"foreach": False}), ("foreach", {"foreach": True}),
                         ("fused", {"fused": True})):
        opt = torch.optim.Adam(params, lr=1e-6, eps=1e-5, **kwargs)
        times[name] = timed(opt.step, repeats)
    return [{"op": f"Adam step over {n / 1e6:.1f}M parameters (74 tensors)",
             "plain": f"per-parameter loop (foreach: {times['foreach']:.1f} ms)",
             "plain_ms": times["for-loop"], "ours": "torch.optim.Adam(fused=True)",
             "ours_ms": times["fused"]}]


def decode_rows(repeats: int) -> list[dict]:
    rows = []
    for width in (256, 576):
        head = torch.nn.Linear(width, VOCAB, bias=False)
        h = torch.randn(16, width)
        with torch.no_grad():
            torch.testing.assert_close(head(h), (head.weight @ h.t()).t(), atol=1e-4,
                                       rtol=1e-4)
            plain = timed(lambda head=head, h=h: head(h), repeats)
            ours = timed(lambda head=head, h=h: (head.weight @ h.t()).t().contiguous(), repeats)
        rows.append({"op": f"decoding step's output head, 16 rows, hidden {width} -> 49152",
                     "plain": "nn.Linear: (16, d) @ (d, V)", "plain_ms": plain,
                     "ours": "models.output_logits: (V, d) @ (d, 16)", "ours_ms": ours})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "kernels"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = (logprob_rows(args.repeats) + head_rows(args.repeats) + adam_rows(args.repeats)
            + decode_rows(args.repeats))
    for r in rows:
        r["speedup"] = r["plain_ms"] / r["ours_ms"]
    command = ".venv/bin/python bench/kernels.py" + (f" {' '.join(argv)}" if argv else "")
    result = {"started": _dt.datetime.now().isoformat(timespec="seconds"),
              "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": args.threads, "repeats": args.repeats,
              "command": command, "rows": rows}
    lines = ["# Kernels: ours vs the plain version", "",
             f"{result['started']}; torch {torch.__version__}; {args.threads} threads; median of "
             f"{args.repeats} calls after 2 warm-up calls.", "",
             "| op | plain | ms | ours | ms | speedup |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['plain']} | {r['plain_ms']:.1f} | {r['ours']} | "
              f"{r['ours_ms']:.1f} | {r['speedup']:.2f}x |" for r in rows]
    lines += ["", "Command:", "", "```", command, "```", ""]
    write_results(args.out, result, "\n".join(lines))


if __name__ == "__main__":
    main()
