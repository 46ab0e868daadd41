"""PPO benchmark: our PPO stage vs TRL 1.12.0's PPOTrainer on the same tiny models.

One shared setup per model size (random Llama over our tokenizer's vocabulary, saved as an SFT
stage folder; a reward model on the same backbone saved as an RM stage folder; the first N
prompts of data/wordnet/ppo.jsonl chat-formatted by our encoder), then, per repetition, one
subprocess per side in a fixed interleaved order: ours (full), TRL (full), ours (LoRA). Every
side gets the same batch, response length, temperature, PPO epochs, minibatches, KL coefficient
and torch thread count. The first update of every run is a warm-up and is not counted.

    make bench                                   # full run, bench/results/ppo_vs_trl.{json,md}
    .venv/bin/python bench/ppo_vs_trl.py --quick # smoke run, bench/results/smoke.{json,md}

See bench/README.md for how to read the results.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
DATA = ROOT / "data" / "wordnet" / "ppo.jsonl"

# name -> scratch Llama sizes (None: the packaged pretrained SmolLM2-135M-Instruct, the default
# run's model). The 49k-token vocabulary (tied embedding) dominates the small ones.
SIZES = {
    "tiny": dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64),
    "5m": dict(hidden_size=96, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384),
    "20m": dict(hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=4,
                intermediate_size=1024),
    "135m": None,
}
MAX_PROMPT_TOKENS = 64
SIDES = ("ours", "trl", "ours_lora", "trl_lora", "ours_rloo", "trl_rloo")
LABELS = {"ours": "ours, full", "trl": "TRL 1.12, full", "ours_lora": "ours, LoRA r=16",
          "trl_lora": "TRL 1.12, LoRA r=16 (peft)", "ours_rloo": "ours, RLOO, full",
          "trl_rloo": "TRL RLOOTrainer (current trl), full"}
# The TRL row each of ours is compared with (a LoRA row with TRL's LoRA row where one ran).
REFERENCE = {"ours": "trl", "trl": "trl", "ours_lora": "trl_lora", "trl_lora": "trl_lora",
             "ours_rloo": "trl_rloo", "trl_rloo": "trl_rloo"}


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny model, 1 rep, 1 timed update, short responses")
    p.add_argument("--reps", type=int, default=None, help="repetitions per side [3; quick 1]")
    p.add_argument("--updates", type=int, default=None,
                   help="timed updates per run, after 1 warm-up [3; quick 1]")
    p.add_argument("--sizes", default=None, help=f"comma list of {sorted(SIZES)} [5m,20m; quick tiny]")
    p.add_argument("--threads", type=int, default=2, help="torch / OMP threads of every side [2]")
    p.add_argument("--batch", type=int, default=None, help="rollout batch [16; quick 4]")
    p.add_argument("--response-length", type=int, default=None,
                   help="new tokens per response [32; quick 8]")
    p.add_argument("--epochs", type=int, default=None, help="PPO epochs [4; quick 1]")
    p.add_argument("--minibatches", type=int, default=1, help="PPO minibatches per epoch [1]")
    p.add_argument("--k", type=int, default=4,
                   help="RLOO rows: samples per prompt; batch / k prompts per update [4]")
    p.add_argument("--sides", default="ours,trl,ours_lora",
                   help=f"comma list of {list(SIDES)}, run in this order [ours,trl,ours_lora]")
    p.add_argument("--no-lora", action="store_true", help="skip our LoRA row")
    p.add_argument("--precision", default="no", choices=["no", "bf16"],
                   help="autocast of every side: ppo.mixed_precision for ours, TRL's bf16 [no]")
    p.add_argument("--workdir", default=None, help="keep the setup and runs here (default: temp)")
    p.add_argument("--out", default=None,
                   help="results file stem [bench/results/ppo_vs_trl; quick bench/results/smoke]")
    p.add_argument("--ours-python", default=str(ROOT / ".venv" / "bin" / "python"))
    p.add_argument("--trl-python", default=str(ROOT / ".venv-trl112" / "bin" / "python"))
    args = p.parse_args(argv)
    quick = args.quick
    defaults = dict(reps=(1, 3), updates=(1, 3), sizes=("tiny", "5m,20m"), batch=(4, 16),
                    response_length=(8, 32), epochs=(1, 4))
    for key, (q, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, q if quick else full)
    if args.out is None:
        args.out = str(RESULTS / ("smoke" if quick else "ppo_vs_trl"))
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in args.sizes:
        if s not in SIZES:
            p.error(f"unknown size {s!r}; choose from {sorted(SIZES)}")
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    for s in args.sides:
        if s not in SIDES:
            p.error(f"unknown side {s!r}; choose from {list(SIDES)}")
    if args.no_lora:
        args.sides = [s for s in args.sides if not s.endswith("_lora")]
    if any(s.endswith("rloo") for s in args.sides) and args.batch % args.k:
        p.error(f"--batch {args.batch} must be a multiple of --k {args.k} for the RLOO rows")
    args.warmup = 1
    return args


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1", "WANDB_MODE": "disabled",
        "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
        "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "",
        "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRL_EXPERIMENTAL_SILENCE": "1",
    })
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def run_child(cmd: list[str], log: Path, threads: int) -> dict:
    """Run one side to completion; its wall seconds and its own peak RSS (wait4's rusage)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(threads), stdout=f,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.time() - t0
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{cmd[0]} ... failed (exit {proc.returncode}); log {log}:\n{tail}")
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


# --------------------------------------------------------------------------------------------
# Shared setup (our venv: our tokenizer, our stage folders)
# --------------------------------------------------------------------------------------------


def build_setup(size: str, work: Path, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from pipeline.config import ModelConfig, load_config
    from pipeline.data import load_prompts
    from pipeline.models import (
        build_scratch,
        load_policy,
        load_reward_backbone,
        load_tokenizer,
        save_pretrained_atomic,
        tokenizer_sha256,
    )
    from pipeline.rundir import StageDir
    from pipeline.text import encode_prompt

    s = SIZES[size]
    overrides = [f"run.root={work}", f"run.name={size}", "run.overwrite=true"]
    if s is None:
        cfg = load_config(None, overrides)
        policy, tok = load_policy(cfg.model)
        c = policy.config
        s = dict(hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
                 num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                 intermediate_size=c.intermediate_size)
        base_model = cfg.model.name_or_path
    else:
        overrides += ["model.init=scratch", "model.scratch.max_position_embeddings=256",
                      *[f"model.scratch.{k}={v}" for k, v in s.items()]]
        cfg = load_config(None, overrides)
        tok = load_tokenizer("smollm2-135m-instruct", ModelConfig())
        policy = build_scratch(cfg.model, tok, seed=0)
        base_model = f"scratch-{size}"

    sft = StageDir(cfg, "sft")
    sft.start()
    save_pretrained_atomic(policy, tok, sft.path / "model")
    tok = load_tokenizer(str(sft.path / "model"), ModelConfig())  # what PPO will load
    sha = tokenizer_sha256(tok)
    sft.finish(metrics={}, base_model=base_model, tokenizer_sha256=sha)

    reward = load_reward_backbone(str(sft.path / "model"), ModelConfig(), tok, seed=1)
    rm = StageDir(cfg, "rm")
    rm.start()
    save_pretrained_atomic(reward, tok, rm.path / "model")
    rm.finish(metrics={}, base_model=base_model, tokenizer_sha256=sha,
              parents=None, extras={"norm_bias": 0.0, "norm_scale": 1.0, "norm_samples": 0})

    n_prompts = args.batch * (args.warmup + args.updates)
    prompts = load_prompts(str(DATA), limit=n_prompts)
    encoded = [encode_prompt(tok, p.prompt, MAX_PROMPT_TOKENS) for p in prompts]
    prompts_file = work / size / "prompts.json"
    prompts_file.write_text(json.dumps(encoded))

    n_params = sum(p.numel() for p in policy.parameters())
    embedding = policy.get_input_embeddings().weight.numel()
    return {
        "size": size, "scratch": s, "vocab": len(tok), "policy_params": n_params,
        "embedding_params": embedding, "non_embedding_params": n_params - embedding,
        "reward_params": sum(p.numel() for p in reward.parameters()),
        "sft_dir": str(sft.path), "rm_dir": str(rm.path),
        "policy_dir": str(sft.path / "model"), "reward_dir": str(rm.path / "model"),
        "prompts_file": str(prompts_file), "num_prompts": len(encoded),
        "prompt_tokens": {"min": min(map(len, encoded)), "max": max(map(len, encoded)),
                          "mean": sum(map(len, encoded)) / len(encoded)},
        "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
    }


# --------------------------------------------------------------------------------------------
# The sides
# --------------------------------------------------------------------------------------------


def ours_cmd(setup: dict, work: Path, name: str, args, lora: bool, rloo: bool) -> list[str]:
    over = [
        f"run.root={work / setup['size'] / 'runs'}", f"run.name={name}", "run.overwrite=true",
        f"run.threads={args.threads}", "run.device=cpu", "run.seed=0",
        "tracking.progress=false", "tracking.wandb=false", "tracking.tensorboard=false",
        f"data.ppo={DATA}", f"data.max_prompt_tokens={MAX_PROMPT_TOKENS}",
        f"ppo.policy={setup['sft_dir']}", f"ppo.reward_model={setup['rm_dir']}",
        "ppo.rewards=[{type: model}]",
        f"ppo.num_updates={args.warmup + args.updates}", f"ppo.batch_size={args.batch}",
        f"ppo.num_minibatches={args.minibatches}", f"ppo.ppo_epochs={args.epochs}",
        f"ppo.num_prompts={setup['num_prompts']}",
        f"ppo.response_length={args.response_length}", "ppo.temperature=0.7",
        "ppo.top_k=0", "ppo.top_p=1.0", "ppo.kl_coef=0.05", "ppo.adaptive_kl=false",
        "ppo.missing_eos_penalty=1.0", "ppo.lr=3e-6", "ppo.critic_lr=3e-6",
        "ppo.forward_batch_size=0", "ppo.gold_judge=", "ppo.sample_every=0",
        "ppo.save_every=0", "ppo.snapshot_every=0", "ppo.gradient_checkpointing=false",
        "ppo.ptx_coef=0", "ppo.critic_warmup_updates=0",
        f"ppo.lora.enabled={'true' if lora else 'false'}",
        f"ppo.mixed_precision={args.precision}",
    ]
    if lora:
        over += ["ppo.lora.r=16", "ppo.lora.alpha=32", "ppo.lr=2e-4", "ppo.critic_lr=2e-4"]
    if rloo:
        # The same responses per update: batch / k prompts, each sampled k times.
        over += ["ppo.advantage_estimator=rloo", f"ppo.samples_per_prompt={args.k}",
                 f"ppo.batch_size={args.batch // args.k}"]
    return [args.ours_python, "-m", "pipeline.cli", "ppo", *over]


def run_ours(setup: dict, work: Path, rep: int, args, side: str) -> dict:
    lora, rloo = side == "ours_lora", side == "ours_rloo"
    name = f"{'lora' if lora else 'rloo' if rloo else 'full'}-r{rep}"
    cmd = ours_cmd(setup, work, name, args, lora, rloo)
    proc = run_child(cmd, work / "logs" / f"{setup['size']}-ours-{name}.log", args.threads)
    path = work / setup["size"] / "runs" / name / "ppo"
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    manifest = json.loads((path / "manifest.json").read_text())
    stamps = [r["time"] for r in rows]
    timed = rows[args.warmup:]
    return {
        **proc,
        "update_seconds": [b - a for a, b in zip(stamps[args.warmup - 1:], stamps[args.warmup:])],
        "update_seconds_core": [r["time/update"] for r in timed],
        "generate_seconds": [r["time/generate"] for r in timed],
        "score_seconds": [r["time/score"] for r in timed],
        "train_seconds": [r["time/train"] for r in timed],
        "generated_tokens": [r["perf/tokens_per_s"] * r["time/generate"] for r in timed],
        "response_length": [r["response/length"] for r in timed],
        "no_eos_fraction": [r["response/no_eos_fraction"] for r in timed],
        "trainable_params": manifest["metrics"].get("trainable_params"),
        "total_params": manifest["metrics"].get("total_params"),
        "command": shlex.join(cmd),
    }


def run_trl(setup: dict, work: Path, rep: int, args, lora: bool) -> dict:
    name = f"trl{'-lora' if lora else ''}-r{rep}"
    out = work / setup["size"] / f"{name}.json"
    cmd = [args.trl_python, str(BENCH / "trl_side.py"), "--policy", setup["policy_dir"],
           "--reward", setup["reward_dir"], "--prompts", setup["prompts_file"], "--out", str(out),
           "--batch", str(args.batch), "--updates", str(args.updates),
           "--warmup", str(args.warmup), "--epochs", str(args.epochs),
           "--minibatches", str(args.minibatches),
           "--response-length", str(args.response_length), "--temperature", "0.7",
           "--kl-coef", "0.05", "--lr", "3e-6", "--missing-eos-penalty", "1.0",
           "--threads", str(args.threads), "--precision", args.precision]
    if lora:
        # Our LoRA row's settings: r 16, alpha 32, every linear layer, its learning rate.
        cmd[cmd.index("--lr") + 1] = "2e-4"
        cmd += ["--lora-r", "16", "--lora-alpha", "32"]
    proc = run_child(cmd, work / "logs" / f"{setup['size']}-{name}.log", args.threads)
    res = json.loads(out.read_text())
    w = args.warmup
    return {
        **proc,
        "update_seconds": res["update_seconds"][w:],
        "generate_seconds": res["generate_seconds"][w:],
        "generated_tokens": res["generated_tokens"][w:],
        "setup_seconds": res["setup_seconds"],
        "versions": res["versions"],
        "threads": res["threads"],
        "command": shlex.join(cmd),
    }


def run_trl_rloo(setup: dict, work: Path, rep: int, args) -> dict:
    out = work / setup["size"] / f"trl-rloo-r{rep}.json"
    cmd = [args.ours_python, str(BENCH / "trl_rloo_side.py"), "--policy", setup["policy_dir"],
           "--reward", setup["reward_dir"], "--prompts", setup["prompts_file"], "--out", str(out),
           "--prompts-per-update", str(args.batch // args.k), "--k", str(args.k),
           "--updates", str(args.updates), "--warmup", str(args.warmup),
           "--epochs", str(args.epochs), "--minibatches", str(args.minibatches),
           "--response-length", str(args.response_length), "--temperature", "0.7",
           "--kl-coef", "0.05", "--lr", "3e-6", "--threads", str(args.threads)]
    proc = run_child(cmd, work / "logs" / f"{setup['size']}-trl-rloo-r{rep}.log", args.threads)
    res = json.loads(out.read_text())
    w = args.warmup
    return {**proc, "update_seconds": res["update_seconds"][w:],
            "generate_seconds": res["generate_seconds"][w:],
            "generated_tokens": res["generated_tokens"][w:],
            "setup_seconds": res["setup_seconds"], "versions": res["versions"],
            "threads": res["threads"], "command": shlex.join(cmd)}


def run_limits(setup: dict, work: Path, args) -> dict:
    out = work / setup["size"] / "limits.json"
    cmd = [args.ours_python, str(BENCH / "limits.py"), "--policy", setup["policy_dir"],
           "--prompts", setup["prompts_file"], "--out", str(out), "--batch", str(args.batch),
           "--response-length", str(args.response_length), "--threads", str(args.threads),
           "--repeats", "1" if args.quick else "3", "--matmul", "1024" if args.quick else "2048"]
    run_child(cmd, work / "logs" / f"{setup['size']}-limits.log", args.threads)
    return json.loads(out.read_text())


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


def pooled(runs: list[dict], key: str) -> list[float]:
    return [x for r in runs for x in r.get(key, [])]


def summarize_side(runs: list[dict]) -> dict:
    upd = pooled(runs, "update_seconds")
    gen_s, gen_tok = pooled(runs, "generate_seconds"), pooled(runs, "generated_tokens")
    out = {
        "updates_timed": len(upd),
        "s_per_update_median": statistics.median(upd),
        "s_per_update_min": min(upd),
        "s_per_update_max": max(upd),
        "updates_per_s": 1.0 / statistics.median(upd),
        "rollout_tokens_per_s": sum(gen_tok) / sum(gen_s),
        "generate_s_median": statistics.median(gen_s),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "peak_rss_mb_per_run": [r["peak_rss_mb"] for r in runs],
        "wall_s_per_run": [r["wall_s"] for r in runs],
    }
    for phase in ("score", "train"):
        values = pooled(runs, f"{phase}_seconds")
        if values:
            out[f"{phase}_s_median"] = statistics.median(values)
    if "score_s_median" in out:
        total = out["generate_s_median"] + out["score_s_median"] + out["train_s_median"]
        out["phase_split"] = {p: out[f"{p}_s_median"] / total
                              for p in ("generate", "score", "train")}
    return out


def flops_figure(setup: dict, ours: dict, limits: dict, args, lora: bool) -> dict:
    """Achieved FLOP/s of our score and train phases vs the measured matmul peak.

    Counts the work PPO needs, not what an implementation happens to do: the trunk runs on
    every position of the padded batch but the last (batch * (longest prompt + response length
    - 1): the state after the final token predicts and values nothing), the LM head (the tied
    embedding matrix) only on the response positions whose log-probs are used; critic and RM
    trunks on the same positions (their embedding is a lookup, their head a vector). Train:
    6 * FLOPs-per-token terms per pass (4 with LoRA: frozen weights need no weight gradient;
    the adapters' own FLOPs are ignored), policy + critic, times PPO epochs, less the forward
    of epoch 1's first minibatch, which is the evaluation forward. Score: 2 * the same for policy,
    reference, critic and RM. Attention score FLOPs are ignored.
    """
    positions = args.batch * (setup["prompt_tokens"]["max"] + args.response_length - 1)
    responses = args.batch * args.response_length
    n_trunk = setup["policy_params"] - setup["embedding_params"]
    n_head = setup["embedding_params"]
    n_critic = setup["reward_params"] - setup["embedding_params"]
    policy_pass = positions * n_trunk + responses * n_head
    critic_pass = positions * n_critic
    minibatches = args.minibatches
    per_pass = 4 if lora else 6
    train_flops = (args.epochs * per_pass - 2 / minibatches) * (policy_pass + critic_pass)
    score_flops = 2 * (2 * policy_pass + 2 * critic_pass)
    tokens = positions
    n_policy = setup["policy_params"]
    peak = limits["matmul"]["gflops_max"] * 1e9
    train_rate = train_flops / ours["train_s_median"]
    score_rate = score_flops / ours["score_s_median"]
    both = (train_flops + score_flops) / (ours["train_s_median"] + ours["score_s_median"])
    return {
        "tokens_per_forward": tokens, "policy_params": n_policy, "critic_compute_params": n_critic,
        "train_gflop_per_update": train_flops / 1e9, "score_gflop_per_update": score_flops / 1e9,
        "train_gflops": train_rate / 1e9, "score_gflops": score_rate / 1e9,
        "score_and_train_gflops": both / 1e9,
        "matmul_peak_gflops": peak / 1e9,
        "train_fraction_of_peak": train_rate / peak,
        "score_and_train_fraction_of_peak": both / peak,
    }


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket",
                               "Socket(s)", "L2 cache", "L3 cache", "Flags"):
                v = value.strip()
                if key.strip() == "Flags":
                    v = " ".join(f for f in v.split() if f.startswith(("avx", "amx", "fma")))
                info[key.strip()] = v
    except (OSError, subprocess.SubprocessError):
        pass
    with contextlib.suppress(OSError):
        info["loadavg_start"] = os.getloadavg()
    return info


def ours_versions(python: str) -> dict:
    code = ("import json,torch,transformers,accelerate,peft;print(json.dumps({'torch':"
            "torch.__version__,'transformers':transformers.__version__,'accelerate':"
            "accelerate.__version__,'peft':peft.__version__}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-500:]}


def trl_reference(sides: dict, side: str) -> dict | None:
    """The TRL row a side is compared with: its own kind where TRL ran one, else TRL full PPO."""
    return sides.get(REFERENCE[side]) or sides.get("trl")


def fmt_rows(size_result: dict) -> list[str]:
    sides = size_result["sides"]
    lines = ["| side | median s/update [min–max] | updates/s vs TRL | rollout tokens/s "
             "| peak RSS MB (vs TRL) | phase split gen/score/train |",
             "|---|---|---|---|---|---|"]
    for side in SIDES:
        s = sides.get(side)
        if s is None:
            continue
        trl = trl_reference(sides, side)
        ratio = f"{trl['s_per_update_median'] / s['s_per_update_median']:.2f}x" if trl else "–"
        rss = f"{s['peak_rss_mb']:.0f}"
        if trl:
            rss += f" ({s['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x)"
        split = s.get("phase_split")
        split = ("/".join(f"{100 * split[p]:.0f}%" for p in ("generate", "score", "train"))
                 if split else f"gen {s['generate_s_median']:.2f}s")
        lines.append(f"| {LABELS[side]} | {s['s_per_update_median']:.2f} "
                     f"[{s['s_per_update_min']:.2f}–{s['s_per_update_max']:.2f}] | {ratio} "
                     f"| {s['rollout_tokens_per_s']:.0f} | {rss} | {split} |")
    return lines


def write_markdown(result: dict, path: Path) -> None:
    a = result["settings"]
    precision = "bf16 autocast" if a.get("precision") == "bf16" else "fp32"
    trl = result["versions"].get("trl_side", {}).get("trl", "1.12.0")
    rloo = result["versions"].get("trl_rloo_side", {}).get("trl")
    lines = [f"# PPO: ours vs TRL {trl}" + (f"; RLOO: ours vs TRL {rloo}" if rloo else "")
             + (" (SMOKE RUN, not a result)" if a["quick"] else ""), "",
             f"{result['finished']}; {result['machine'].get('Model name', '?')}, "
             f"{result['machine'].get('cpu_count')} CPUs; threads {a['threads']} per side "
             f"(torch.set_num_threads + OMP_NUM_THREADS); batch {a['batch']}, "
             f"{a['response_length']} new tokens at T=0.7, {a['epochs']} PPO epochs x "
             f"{a['minibatches']} minibatch(es), KL coef 0.05 fixed, {precision}, "
             f"{a['reps']} reps x {a['updates']} timed "
             f"updates per side (+{a['warmup']} warm-up each), order {' / '.join(a['order'])}.",
             ""]
    load = result["machine"].get("loadavg_start", [0.0])[0]
    if load > 0.5:
        lines += [f"**Warning**: the 1-minute load average was {load:.2f} when the benchmark "
                  "started: something else was running, and on 2 cores that distorts "
                  "multi-threaded timings badly.", ""]
    for size, r in result["sizes"].items():
        st = r["setup"]
        lines += [f"## {size}: {st['policy_params'] / 1e6:.2f}M parameters "
                  f"({st['embedding_params'] / 1e6:.2f}M tied embedding, "
                  f"{st['non_embedding_params'] / 1e6:.2f}M in the blocks; "
                  f"hidden {st['scratch']['hidden_size']}, {st['scratch']['num_layers']} layers); "
                  f"prompts {st['prompt_tokens']['min']}–{st['prompt_tokens']['max']} tokens", ""]
        lines += fmt_rows(r)
        lines.append("")
        g = r["limits"]["generation"]
        f = r.get("flops")
        lines += [
            f"- Generation ({g['batch']} x {g['max_new_tokens']} tokens): our "
            f"`pipeline.text.generate` {g['ours']['tokens_per_s_median']:.0f} tokens/s vs HF "
            f"`model.generate` {g['hf']['tokens_per_s_median']:.0f} tokens/s "
            f"(ours/HF {g['ours_vs_hf']:.2f}x).",
        ]
        if f:
            ours_row = r["sides"][f["side"]]
            lines.append(
                f"- Train phase: {f['train_gflop_per_update']:.1f} GFLOP/update in "
                f"{ours_row['train_s_median']:.2f} s ({LABELS[f['side']]}) = "
                f"{f['train_gflops']:.1f} GFLOP/s; "
                f"score+train {f['score_and_train_gflops']:.1f} GFLOP/s; fp32 matmul peak "
                f"({r['limits']['matmul']['size']}^2, {a['threads']} threads) "
                f"{f['matmul_peak_gflops']:.1f} GFLOP/s: train at "
                f"{100 * f['train_fraction_of_peak']:.0f}% of peak.")
        lines.append("")
    lines += ["Command:", "", "```", result["command"], "```", "",
              "Raw numbers: " + Path(result["json"]).name + ". How to read: bench/README.md.", ""]
    path.write_text("\n".join(lines))


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    for python in (args.ours_python, args.trl_python):
        if not Path(python).exists():
            raise SystemExit(f"{python} missing: run `make install bench-setup` first")
    sys.path.insert(0, str(ROOT))
    os.environ.update({k: v for k, v in child_env(args.threads).items()
                       if k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM",
                                "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")})
    keep = args.workdir is not None
    work = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    work.mkdir(parents=True, exist_ok=True)
    order = args.sides
    started = time.time()
    command = shlex.join([os.path.relpath(sys.executable, ROOT)
                          if sys.executable.startswith(str(ROOT)) else sys.executable,
                          os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])])
    result = {
        "command": command,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {"quick": args.quick, "reps": args.reps, "updates": args.updates,
                     "warmup": args.warmup, "sizes": args.sizes, "threads": args.threads,
                     "batch": args.batch, "response_length": args.response_length,
                     "epochs": args.epochs, "minibatches": args.minibatches,
                     "precision": args.precision,
                     "temperature": 0.7,
                     "kl_coef": 0.05, "order": order, "data": str(DATA.relative_to(ROOT)),
                     "max_prompt_tokens": MAX_PROMPT_TOKENS,
                     "stop": "both sides stop each row at EOS (ours: generation stops when "
                             "every row has; TRL: stop_token='eos', HF generate likewise), "
                             "truncate after it and subtract 1.0 from responses without it"},
        "versions": {"ours_side": ours_versions(args.ours_python)},
        "sizes": {},
    }
    try:
        for size in args.sizes:
            t0 = time.time()
            print(f"[bench] {size}: setup in {work}", flush=True)
            setup = build_setup(size, work, args)
            print(f"[bench] {size}: {setup['policy_params'] / 1e6:.2f}M params; limits", flush=True)
            limits = run_limits(setup, work, args)
            runs: dict[str, list[dict]] = {side: [] for side in order}
            for rep in range(args.reps):
                for side in order:
                    t1 = time.time()
                    if side == "trl_rloo":
                        res = run_trl_rloo(setup, work, rep, args)
                        result["versions"]["trl_rloo_side"] = res["versions"]
                    elif side.startswith("trl"):
                        res = run_trl(setup, work, rep, args, lora=side == "trl_lora")
                        result["versions"]["trl_side"] = res["versions"]
                    else:
                        res = run_ours(setup, work, rep, args, side)
                    runs[side].append(res)
                    med = statistics.median(res["update_seconds"])
                    print(f"[bench] {size} rep {rep} {side}: {med:.2f} s/update, "
                          f"peak RSS {res['peak_rss_mb']:.0f} MB, wall {time.time() - t1:.0f}s",
                          flush=True)
            sides = {side: summarize_side(r) for side, r in runs.items()}
            size_result = {"setup": setup, "limits": limits, "sides": sides, "runs": runs,
                           "seconds": time.time() - t0}
            for side, s in sides.items():
                trl = trl_reference(sides, side)
                if trl is not None:
                    s["updates_per_s_vs_trl"] = s["updates_per_s"] / trl["updates_per_s"]
                    s["peak_rss_vs_trl"] = s["peak_rss_mb"] / trl["peak_rss_mb"]
            ours_side = next((x for x in ("ours", "ours_lora") if x in sides), None)
            if ours_side is not None:
                size_result["flops"] = {"side": ours_side,
                                        **flops_figure(setup, sides[ours_side], limits, args,
                                                     lora=ours_side == "ours_lora")}
            result["sizes"][size] = size_result
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    result["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    result["total_seconds"] = time.time() - started
    with contextlib.suppress(OSError):
        result["machine"]["loadavg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result["json"] = str(out.with_suffix(".json"))
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())
    print(f"[bench] done in {result['total_seconds']:.0f}s: {out.with_suffix('.json')}, "
          f"{out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
