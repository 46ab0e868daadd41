"""The reward-model stage on a tiny SFT model: learning, handoff, refusals, the K-way loss."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.models import load_reward_backbone, load_tokenizer
from pipeline.rundir import MANIFEST, atomic_write_json, read_manifest
from stages import reward, sft

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
QUICK = REPO / "configs" / "quick.yaml"

SFT_ARGS = ["sft.max_steps=2", "sft.eval_size=8", "sft.num_samples=0",
            "model.scratch.hidden_size=32", "model.scratch.intermediate_size=64"]
# Short responses and prompts keep every RM run to a few seconds on one thread.
RM_ARGS = ["run.threads=1", "run.device=cpu", "tracking.progress=false",
           "data.max_prompt_tokens=48", "rm.max_seq_len=64", "rm.max_new_tokens=8",
           "rm.norm_samples=8", "rm.eval_size=16", "rm.log_every=5"]

FILLER = ("the", "a", "cat", "runs", "blue", "over", "quiet", "river", "stone", "idea",
          "light", "small", "word", "slowly", "green", "house")


def toy_rows(n_prompts: int, seed: int = 0) -> list[dict]:
    """K=3 responses ranked by how often "good" appears (2 > 1 > 0) amid random filler."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_prompts):
        responses, ranks = [], []
        for goods in rng.sample([0, 1, 2], 3):
            words = [rng.choice(FILLER) for _ in range(6)]
            for _ in range(goods):
                words.insert(rng.randrange(len(words) + 1), "good")
            responses.append(" ".join(words))
            ranks.append(2 - goods)
        rows.append({"prompt": f"Say something about item {i}.", "responses": responses,
                     "ranks": ranks})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rm_config(root: Path, name: str, sft_dir: Path, *extra: str):
    return load_config(QUICK, [f"run.root={root}", f"run.name={name}",
                               f"rm.sft={sft_dir}", *SFT_ARGS, *RM_ARGS, *extra])


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rm_runs")
    path = sft.run(load_config(QUICK, [f"run.root={root}", "run.name=t", "run.threads=1",
                                       "tracking.progress=false", *SFT_ARGS]))
    torch.set_num_threads(1)
    return path


@pytest.fixture(scope="module")
def toy_rm(sft_dir: Path) -> Path:
    data = write_jsonl(sft_dir.parents[1] / "toy.jsonl", toy_rows(80))
    return reward.run(rm_config(sft_dir.parents[1], "toy", sft_dir, f"rm.data={data}",
                                "rm.max_steps=60", "rm.lr=3e-3", "rm.warmup_ratio=0"))


def with_label_parent(sft_dir: Path, name: str, tokenizer_sha: str | None = None) -> Path:
    """A finished-looking label stage for run ``name`` holding toy rows with gold scores."""
    folder = sft_dir.parents[1] / name / "label"
    folder.mkdir(parents=True)
    rows = toy_rows(24, seed=1)
    for row in rows:
        row["gold_scores"] = [-float(r) for r in row["ranks"]]
    write_jsonl(folder / "data.jsonl", rows)
    manifest = read_manifest(sft_dir) | {"stage": "label", "parents": {}}
    if tokenizer_sha is not None:
        manifest["tokenizer_sha256"] = tokenizer_sha
    atomic_write_json(folder / MANIFEST, manifest)
    return folder


def test_learns_separable_preference(sft_dir: Path, toy_rm: Path) -> None:
    m = read_manifest(toy_rm)["metrics"]
    assert m["eval_accuracy_after"] >= 0.8, m
    assert m["eval_accuracy_after"] > m["eval_accuracy_before"]
    assert m["eval_margin_after"] > m["eval_margin_before"]
    # The ECE is the count-weighted gap between accuracy and confidence of the stored bins,
    # which hold every held-out pair.
    bins = read_manifest(toy_rm)["extras"]["calibration"]
    assert sum(b["count"] for b in bins) == m["eval_pairs"]
    gaps = sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins)
    assert m["eval_ece_after"] == pytest.approx(gaps / m["eval_pairs"], rel=1e-9)
    assert all(b["confidence"] >= 0.5 for b in bins if b["count"])  # sigmoid(|gap|)
    assert "eval_accuracy_gold_after" not in m  # the toy rows carry no gold scores

    trained = load_file(str(toy_rm / "model" / "model.safetensors"))
    base = load_file(str(sft_dir / "model" / "model.safetensors"))
    cfg = load_config(QUICK, SFT_ARGS)
    tok = load_tokenizer(str(sft_dir / "model"), cfg.model)
    init = load_reward_backbone(str(sft_dir / "model"), cfg.model, tok, seed=cfg.run.seed)
    assert not torch.allclose(trained["score.weight"], init.score.weight.detach())
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        assert not torch.allclose(trained[name], base[name]), name

    rows = [json.loads(line) for line in (toy_rm / "metrics.jsonl").read_text().splitlines()]
    logged = {k for r in rows for k in r}
    assert {"train/loss", "train/accuracy", "train/margin", "train/lr", "eval/accuracy",
            "eval/ece", "norm/mean", "norm/std"} <= logged


def test_normalized_score_of_sft_samples_is_mean_0_std_1_as_ppo_reads_it(
        sft_dir: Path, toy_rm: Path, monkeypatch) -> None:
    """The bias and scale set on the SFT policy's own samples, applied the way PPO scores a
    rollout (left-padded prompt, right-padded response, the reward at the last response
    token, then CompositeReward), give those samples mean 0 and std 1."""
    from accelerate import Accelerator

    from pipeline.config import PPOConfig, RewardComponent
    from pipeline.models import load_policy, load_reward_model
    from pipeline.text import eos_ids
    from stages.composite import CompositeReward, RewardSpec
    from stages.ppo import rollout_tensors
    from stages.scoring import ScoreModel, joined_inputs, sequence_scores

    cfg = rm_config(sft_dir.parents[1], "norm", sft_dir, "rm.norm_samples=12")
    tok = load_tokenizer(str(sft_dir / "model"), cfg.model)
    policy, _ = load_policy(cfg.model, name_or_path=str(sft_dir / "model"))
    scorer = ScoreModel(load_reward_model(toy_rm / "model", cfg.model, tok))
    sampled = []
    real_generate = reward.generate

    def recording_generate(model, tok, prompts, **kwargs):
        responses = real_generate(model, tok, prompts, **kwargs)
        sampled.append((prompts, responses))
        return responses

    monkeypatch.setattr(reward, "generate", recording_generate)
    torch.manual_seed(0)
    norm, raw = reward.normalization(scorer, policy, tok, cfg, Accelerator(cpu=True))
    assert norm.samples == 12 and raw["norm_std"] > 0
    (prompts, responses), = sampled
    query, query_mask, response, mask, has_eos, _ = rollout_tensors(
        prompts, responses, tok.pad_token_id, sorted(eos_ids(tok, policy)))
    assert query_mask.min() == 0  # prompts of different lengths: left padding is exercised
    ppo_cfg = PPOConfig(rewards=[RewardComponent(type="model")], reward_clip=100.0,
                        missing_eos_penalty=0.0)
    fn = CompositeReward(RewardSpec.from_config(ppo_cfg, norm),
                         lambda ids, att: sequence_scores(scorer, ids, att))
    score, _, parts = fn(*joined_inputs(query, query_mask, response, mask), [""] * 12,
                         [""] * 12, [{}] * 12, has_eos)
    assert parts["rm_raw"].mean().item() == pytest.approx(raw["norm_mean"], abs=1e-5)
    assert score.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert score.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)


def test_normalization_travels_with_the_model(toy_rm: Path, tmp_path: Path) -> None:
    """The bias and scale are in the model's config.json: a copy of model/ loaded elsewhere,
    with only transformers, gives the normalized rewards this stage computed."""
    from pipeline.hub import NORMALIZATION_KEY, load_reward_scorer

    extras = read_manifest(toy_rm)["extras"]
    stored = json.loads((toy_rm / "model" / "config.json").read_text())[NORMALIZATION_KEY]
    assert stored["bias"] == extras["norm_bias"] and stored["scale"] == extras["norm_scale"]
    assert stored["samples"] == extras["norm_samples"] and extras["norm_scale"] != 1.0
    elsewhere = shutil.copytree(toy_rm / "model", tmp_path / "elsewhere")
    samples = [json.loads(line) for line in (toy_rm / "samples.jsonl").read_text().splitlines()]
    prompts, responses = [s["prompt"] for s in samples], [s["response"] for s in samples]
    scorer = load_reward_scorer(elsewhere)
    assert scorer.raw(prompts, responses) == pytest.approx([s["reward"] for s in samples],
                                                           abs=1e-4)
    ours = [s["normalized_reward"] for s in samples]
    assert scorer(prompts, responses) == pytest.approx(ours, abs=1e-4)
    # The card's snippet, run as written (pointed at the copy), agrees too.
    card = (toy_rm / "model" / "README.md").read_text()
    assert f"`{NORMALIZATION_KEY}`" in card and "pipeline_tag: text-classification" in card
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(snippet.replace(repr(str(toy_rm / "model")), repr(str(elsewhere))), "card",
                 "exec"), namespace)
    assert [namespace["reward"](p, r) for p, r in zip(prompts, responses)] == pytest.approx(
        ours, abs=1e-4)


def test_manifest_files_and_label_parent(sft_dir: Path) -> None:
    with_label_parent(sft_dir, "lab")
    path = reward.run(rm_config(sft_dir.parents[1], "lab", sft_dir, "rm.max_steps=2",
                                "rm.eval_size=8"))
    manifest = read_manifest(path)
    assert manifest["status"] == "complete" and manifest["stage"] == "rm"
    assert set(manifest["parents"]) == {"sft", "label"}
    assert Path(manifest["parents"]["sft"]["path"]) == sft_dir
    assert manifest["tokenizer_sha256"] == read_manifest(sft_dir)["tokenizer_sha256"]

    m = manifest["metrics"]
    for key in ("eval_accuracy", "eval_accuracy_gold", "eval_margin", "eval_ece"):
        assert f"{key}_before" in m and f"{key}_after" in m, key
    for key in ("train_seconds", "train_rows", "eval_rows", "norm_mean", "norm_std", "steps"):
        assert key in m, key
    assert m["train_rows"] == 16 and m["eval_rows"] == 8 and m["steps"] == 2

    extras = manifest["extras"]
    assert extras["norm_samples"] == 8
    assert math.isclose(extras["norm_bias"], -m["norm_mean"])
    assert math.isclose(extras["norm_scale"], 1 / m["norm_std"])
    assert len(extras["calibration"]) == 10

    assert {p.name for p in path.iterdir()} == {"config.yaml", "metrics.jsonl", "samples.jsonl",
                                                "manifest.json", "model"}
    assert not list((path / "model").glob("*.bin"))
    model = AutoModelForSequenceClassification.from_pretrained(path / "model")
    assert model.config.num_labels == 1
    samples = [json.loads(line) for line in (path / "samples.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "response", "rank", "gold_rank", "reward"} <= set(samples[0])


def test_refuses_tokenizer_mismatch(sft_dir: Path) -> None:
    with_label_parent(sft_dir, "badlabel", tokenizer_sha="0" * 64)
    with pytest.raises(PipelineError, match="different tokenizer"):
        reward.run(rm_config(sft_dir.parents[1], "badlabel", sft_dir))

    # An SFT copy whose manifest no longer describes its model's tokenizer.
    copy = sft_dir.parents[1] / "copy" / "sft"
    shutil.copytree(sft_dir, copy)
    manifest = read_manifest(copy) | {"tokenizer_sha256": "f" * 64}
    atomic_write_json(copy / MANIFEST, manifest)
    data = write_jsonl(sft_dir.parents[1] / "few.jsonl", toy_rows(4))
    with pytest.raises(PipelineError, match="rm.sft: .*different tokenizer"):
        reward.run(rm_config(sft_dir.parents[1], "copy", copy, f"rm.data={data}"))
    assert not (sft_dir.parents[1] / "copy" / "rm").exists()


def test_resume_matches_uninterrupted(sft_dir: Path, toy_rm: Path) -> None:
    root = sft_dir.parents[1]
    args = [f"rm.data={root / 'toy.jsonl'}", "rm.max_steps=12", "rm.save_every=10",
            "rm.lr=3e-3"]
    whole = read_manifest(reward.run(rm_config(root, "whole", sft_dir, *args)))
    # A run killed after its step-10 checkpoint (mid second epoch) leaves no manifest.
    killed = reward.run(rm_config(root, "killed", sft_dir, *args))
    # The checkpoint's model/ is a plain sequence classifier with the weights it resumes.
    checkpoint = killed / "checkpoints" / "step-0000010"
    opened = AutoModelForSequenceClassification.from_pretrained(checkpoint / "model")
    saved = load_file(str(checkpoint / "reward.safetensors"))
    state = opened.state_dict()
    assert "model.score.weight" in saved
    assert all(torch.equal(state[k.removeprefix("model.")], v) for k, v in saved.items())
    (killed / MANIFEST).unlink()
    resumed = read_manifest(reward.run(rm_config(root, "killed", sft_dir, *args,
                                                 "run.resume=true")))
    for key in ("eval_accuracy_before", "eval_margin_after", "eval_ece_after", "norm_mean"):
        assert resumed["metrics"][key] == pytest.approx(whole["metrics"][key], rel=1e-5), key


def test_rm_seed_changes_the_model_and_keeps_the_heldout_prompts(sft_dir: Path,
                                                                 toy_rm: Path) -> None:
    """Ensemble members differ in rm.seed only: another initialisation and data order, the
    same held-out prompts; rm.seed = run.seed is the unset default, bit for bit."""
    root = sft_dir.parents[1]
    args = [f"rm.data={root / 'toy.jsonl'}", "rm.max_steps=4", "rm.lr=3e-3",
            "rm.norm_samples=0"]
    seed = rm_config(root, "x", sft_dir).run.seed
    runs = {name: reward.run(rm_config(root, f"seed-{name}", sft_dir, *args, *extra))
            for name, extra in [("unset", []), ("same", [f"rm.seed={seed}"]),
                                ("other", [f"rm.seed={seed + 7}"])]}

    def heldout(path: Path) -> list[str]:
        return [json.loads(line)["prompt"] for line in (path / "samples.jsonl").open()]

    def weights(path: Path) -> dict[str, torch.Tensor]:
        return load_file(str(path / "model" / "model.safetensors"))

    assert heldout(runs["unset"]) == heldout(runs["same"]) == heldout(runs["other"])
    unset, same, other = (weights(runs[k]) for k in ("unset", "same", "other"))
    assert all(torch.equal(unset[k], same[k]) for k in unset)
    assert not torch.equal(unset["score.weight"], other["score.weight"])


def test_k_way_loss_is_mean_over_prompts_of_mean_pair_loss() -> None:
    groups = [
        reward.Group("p", ("a", "b", "c"), ((1,), (2, 3), (4,)), ranks=(0, 1, 2)),
        reward.Group("q", ("a", "b"), ((5, 6), (7,)), ranks=(1, 0)),
        # A tie: responses 0 and 1 form no pair.
        reward.Group("r", ("a", "b", "c"), ((8,), (9,), (10, 11, 12)), ranks=(0, 0, 1)),
    ]
    batch = reward.collate(groups, pad_id=0)
    assert batch["input_ids"].shape == (8, 3)
    assert batch["attention_mask"].sum(1).tolist() == [1, 2, 1, 2, 1, 1, 1, 3]
    scores = torch.tensor([2.0, 0.5, -1.0, 0.3, 0.8, 0.1, -0.4, 0.6])

    def scorer(input_ids: torch.Tensor, attention_mask: torch.Tensor,
               groups: torch.Tensor) -> torch.Tensor:
        # Each prompt's responses are labelled as one group, so its tokens run once.
        assert groups.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
        # Garbage before the last real token: only the last one may be read.
        per_token = torch.randn(*input_ids.shape, 1)
        last = attention_mask.sum(1) - 1
        per_token[torch.arange(len(scores)), last, 0] = scores
        return per_token

    loss, stats = reward.ranked_loss(scorer, batch)

    def nll(d: float) -> float:
        return math.log1p(math.exp(-d))

    by_hand = [
        (nll(2.0 - 0.5) + nll(2.0 + 1.0) + nll(0.5 + 1.0)) / 3,
        nll(0.8 - 0.3),
        (nll(0.1 - 0.6) + nll(-0.4 - 0.6)) / 2,
    ]
    assert loss.item() == pytest.approx(sum(by_hand) / 3, rel=1e-6)
    assert stats["accuracy"].item() == pytest.approx(4 / 6)


def test_label_and_reward_model_under_two_process_ddp(sft_dir: Path) -> None:
    """Both stages shard their prompts over 2 gloo processes and gather every row once."""
    import os
    import subprocess
    import sys

    root = sft_dir.parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    common = ["--config", str(QUICK), f"run.root={root}", "run.name=ddp", *SFT_ARGS, *RM_ARGS]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"), "-m", "pipeline.cli"]
    shutil.copytree(sft_dir, root / "ddp" / "sft")
    for stage, extra in (("label", ["label.num_prompts=10", "label.k=3",
                                    "label.max_new_tokens=6"]),
                         ("rm", ["rm.eval_size=4", "rm.max_steps=2", "rm.batch_size=2"])):
        proc = subprocess.run([*launch, stage, *common, *extra], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=540)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert read_manifest(root / "ddp" / stage)["metrics"]["world_size"] == 2
    label = read_manifest(root / "ddp" / "label")["metrics"]
    rows = (root / "ddp" / "label" / "data.jsonl").read_text().splitlines()
    assert len(rows) == label["rows"] == 10 - label["skipped_prompts"]
    rm = read_manifest(root / "ddp" / "rm")
    # 4 held-out prompts with up to 3 responses: every pair counted once across processes.
    assert 0 < rm["metrics"]["eval_pairs"] <= 4 * 3
    assert rm["parents"]["label"]["path"] == str(root / "ddp" / "label")


def test_eval_best_of_n_picks_the_reward_models_favourite(sft_dir: Path, toy_rm: Path) -> None:
    """Best-of-4 in the eval stage: candidate 0 is the SFT sample itself, so per prompt its
    reward-model score is at least the SFT policy's; its KL is the analytic log 4 - 3/4."""
    from stages import evaluate

    cfg = rm_config(sft_dir.parents[1], "t", sft_dir, f"eval.reward_model={toy_rm}",
                    "eval.num_prompts=6", "eval.max_new_tokens=8", "eval.batch_size=6",
                    "eval.bootstrap=50", "eval.best_of_n=4", "eval.calibration_questions=2")
    results = json.loads((evaluate.run(cfg) / "results.json").read_text())
    torch.set_num_threads(1)
    assert results["best_of_n"] == 4
    assert results["calibration"]["num_questions"] == 2
    assert all(sum(b["count"] for b in p["bins"]) == 2
               for p in results["calibration"]["policies"].values())
    assert set(results["policies"]) == {"base", "sft", "bon"}
    bon = results["policies"]["bon"]
    assert bon["kl"] == {**bon["kl"], "mean": pytest.approx(math.log(4) - 0.75),
                         "reference": "sft"}
    samples = [json.loads(x) for x in
               (sft_dir.parents[1] / "t" / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6
    assert all(s["bon"]["rm"] >= s["sft"]["rm"] - 1e-6 for s in samples)
    assert any(s["bon"]["response"] != s["sft"]["response"] for s in samples)
    assert "bon_vs_sft" in results["win_rates"] and "ppo_vs_sft" not in results["win_rates"]
    # Best-of-n for n = 1..4 from the same candidates: n = 4 is the pick itself.
    curve = results["best_of_n_curve"]
    assert [p["n"] for p in curve] == [1, 2, 3, 4]
    assert [p["kl"] for p in curve] == [evaluate.best_of_n_kl(n) for n in range(1, 5)]
    assert curve[-1]["gold"] == pytest.approx(bon["gold"]["mean"])
    assert curve[-1]["rm"] == pytest.approx(bon["rm"]["mean"], abs=1e-6)
    assert all(a["rm"] <= b["rm"] + 1e-9 for a, b in zip(curve, curve[1:]))
