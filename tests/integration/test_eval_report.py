"""Eval and report on a tiny chain: SFT -> rule-only PPO (with snapshots) -> eval -> report."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.data import load_prompts
from pipeline.errors import PipelineError
from pipeline.rundir import MANIFEST
from stages import evaluate, ppo, report, sft
from tests.conftest import DATA, tiny_override_list

torch.set_num_threads(1)
CHROMIUM = Path("/usr/bin/chromium")
PLOTS = ("sft_loss", "ppo_objective", "ppo_policy", "ppo_value_function",
         "ppo_timing_and_throughput", "overoptimization", "calibration_probe")
PPO = ["ppo.num_updates=2", "ppo.batch_size=4", "ppo.num_minibatches=1", "ppo.ppo_epochs=1",
       "ppo.response_length=8", "ppo.gold_judge=", "ppo.snapshot_every=1", "ppo.num_prompts=16",
       "ppo.rewards=[{type: rule, name: no_headword}]"]
EVAL = ["eval.num_prompts=6", "eval.max_new_tokens=8", "eval.batch_size=6", "eval.bootstrap=200"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evalreport")
    cfg = load_config(None, [*tiny_override_list(root, name="er"), *PPO, *EVAL])
    sft.run(cfg)
    torch.set_num_threads(1)
    ppo.run(cfg)
    torch.set_num_threads(1)
    eval_dir = evaluate.run(cfg)
    torch.set_num_threads(1)
    run_dir = report.run(cfg)
    return {"cfg": cfg, "eval": eval_dir, "run": run_dir,
            "results": json.loads((eval_dir / "results.json").read_text())}


def test_results_have_every_policy_and_field(chain):
    res = chain["results"]
    assert set(res["policies"]) == {"base", "sft", "ppo"}
    for name, row in res["policies"].items():
        lo, hi = row["gold"]["ci95"]
        assert lo - 1e-9 <= row["gold"]["mean"] <= hi + 1e-9, (name, row["gold"])
        assert row["gold"]["n"] == 6
        assert 0 <= row["no_eos_frac"] <= 1 and 0 <= row["headword_violation_frac"] <= 1
        assert 0 <= row["length_violation_frac"] <= 1 and 0 <= row["cost_mean"] <= 1
        assert 0 < row["length_mean"] <= 8
        assert "rm" not in row  # no reward-model stage in this run
    assert "kl" not in res["policies"]["base"]
    assert res["policies"]["sft"]["kl"]["reference"] == "base"
    assert res["policies"]["ppo"]["kl"]["reference"] == "sft"
    for key in ("ppo_vs_sft", "sft_vs_base"):
        win = res["win_rates"][key]
        assert 0 <= win["mean"] <= 1
        assert win["ci95"][0] - 1e-9 <= win["mean"] <= win["ci95"][1] + 1e-9
    manifest = json.loads((chain["eval"] / MANIFEST).read_text())
    assert manifest["status"] == "complete" and set(manifest["parents"]) == {"sft", "ppo"}
    assert manifest["metrics"]["win_rate_ppo_vs_sft"] == res["win_rates"]["ppo_vs_sft"]["mean"]
    samples = [json.loads(x) for x in (chain["eval"] / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and {"base", "sft", "ppo"} <= set(samples[0])
    assert samples[0]["reference"] and "gold" in samples[0]["ppo"]


def test_results_and_report_label_the_ppo_estimator(chain):
    assert chain["results"]["ppo_algorithm"] == {
        "advantage_estimator": "gae", "samples_per_prompt": 1, "kl_in": "reward",
        "critic": True, "label": "gae"}
    text = (chain["run"] / "report.html").read_text()
    assert ("Advantage estimator: gae (1 response per prompt, KL in the reward, with a critic)"
            in text)
    assert "<td>PPO (gae)</td>" in text


def test_eval_reports_every_term_ppo_optimized(chain):
    """The terms of PPO's reward (here the no_headword rule alone, weight 1) per policy, as
    PPO's manifest recorded them, with the score PPO trained on: the rule minus the
    missing-EOS penalty; and the report's table of them."""
    res = chain["results"]
    assert [t["key"] for t in res["reward_spec"]["terms"]] == ["rule/no_headword"]
    penalty = chain["cfg"].ppo.missing_eos_penalty
    for name, row in res["policies"].items():
        terms = row["reward_terms"]
        assert set(terms) == {"rule/no_headword", "score"}, name
        # The rule is -1 on a definition that uses its word: minus the violation rate.
        assert terms["rule/no_headword"] == pytest.approx(-row["headword_violation_frac"])
        assert terms["score"] == pytest.approx(terms["rule/no_headword"]
                                               - penalty * row["no_eos_frac"])
    text = (chain["run"] / "report.html").read_text()
    assert "<th>rule/no_headword (weight 1)</th><th>score PPO trained on</th>" in text


def test_overoptimization_has_sft_snapshot_and_final_points(chain):
    points = chain["results"]["overoptimization"]
    # SFT (kl 0), the snapshot after update 1 (snapshot_every=1, none at the last update), final.
    assert [p["policy"] for p in points] == ["sft", "snapshot", "ppo"]
    assert [p["update"] for p in points] == [0, 1, 2]
    assert points[0]["kl"] == 0.0
    assert points[-1]["gold"] == pytest.approx(chain["results"]["policies"]["ppo"]["gold"]["mean"])
    assert all(p["rm"] is None for p in points)


def test_calibration_probe_per_policy(chain):
    cal = chain["results"]["calibration"]
    assert cal["num_questions"] == 6 and set(cal["policies"]) == {"base", "sft", "ppo"}
    for row in cal["policies"].values():
        assert 0.25 <= row["mean_confidence"] <= 1
        assert len(row["bins"]) == chain["cfg"].eval.calibration_bins
        assert sum(b["count"] for b in row["bins"]) == 6
        # Accuracy and ECE are what the bins (which hold every question) say they are.
        bins = [b for b in row["bins"] if b["count"]]
        assert row["accuracy"] == pytest.approx(sum(b["count"] * b["accuracy"] for b in bins) / 6)
        assert row["ece"] == pytest.approx(
            sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / 6)


def eval_of_chain(chain: dict, root: Path, name: str, *overrides: str) -> tuple:
    """(config, results) of an eval, with ``overrides``, of the chain's SFT and PPO stages."""
    run = chain["cfg"].run_dir
    cfg = load_config(None, [*tiny_override_list(root, name=name), *EVAL, *overrides,
                             f"eval.sft={run / 'sft'}", f"eval.ppo={run / 'ppo'}"])
    results = json.loads((evaluate.run(cfg) / "results.json").read_text())
    torch.set_num_threads(1)
    return cfg, results


def test_no_calibration_probe_with_zero_questions(chain, tmp_path):
    cfg, results = eval_of_chain(chain, tmp_path, "noprobe", "eval.calibration_questions=0")
    assert results["calibration"]["num_questions"] == 0
    assert results["calibration"]["policies"] == {}
    assert set(results["policies"]) == {"base", "sft", "ppo"}
    html = (report.run(cfg) / "report.html").read_text()
    assert "The calibration probe did not run." in html


def test_eval_without_the_base_model(chain, tmp_path):
    cfg, results = eval_of_chain(chain, tmp_path, "nobase", "eval.base=false")
    assert set(results["policies"]) == {"sft", "ppo"}
    assert "kl" not in results["policies"]["sft"]
    assert not any("base" in key for key in results["win_rates"])
    assert set(results["calibration"]["policies"]) == {"sft", "ppo"}
    # Each policy samples from the same seed: dropping the base row changes no other row.
    for name in ("sft", "ppo"):
        assert results["policies"][name]["gold"] == chain["results"]["policies"][name]["gold"]
    assert results["overoptimization"] == chain["results"]["overoptimization"]
    assert "PPO" in (report.run(cfg) / "report.html").read_text()


def test_multiple_choice_builder():
    examples = load_prompts(DATA / "eval.jsonl", limit=20)
    questions = evaluate.multiple_choice(examples, seed=3)
    assert len(questions) == 20
    for ex, q in zip(examples, questions):
        assert len(q.options) == 4 and len(set(q.options)) == 4
        assert q.options.count(ex.reference) == 1
        assert q.options[q.answer] == ex.reference
        # The letter in the prompt labels the true definition.
        assert f"\n{'ABCD'[q.answer]}. {ex.reference}\n" in q.prompt
        others = {e.reference for e in examples} - {ex.reference}
        assert set(q.options) - {ex.reference} <= others
    assert questions == evaluate.multiple_choice(examples, seed=3)
    assert questions != evaluate.multiple_choice(examples, seed=4)
    # Answers are spread over the letters, not always in one place.
    assert len({q.answer for q in questions}) > 1
    with pytest.raises(ValueError):
        evaluate.multiple_choice(examples[:3], seed=0)


def test_letter_tokens_match_answer_after_assistant_header(chain):
    from pipeline.models import load_tokenizer

    tok = load_tokenizer(str(chain["run"] / "sft" / "model"), chain["cfg"].model)
    head = tok.apply_chat_template([{"role": "user", "content": "Q"}],
                                   add_generation_prompt=True, tokenize=False)
    ids = evaluate.letter_token_ids(tok)
    for letter, variants in zip(evaluate.LETTERS, ids):
        full = tok(head + letter, add_special_tokens=False)["input_ids"]
        prompt = tok(head, add_special_tokens=False)["input_ids"]
        assert full[len(prompt)] in variants


def test_report_html_has_every_plot(chain):
    path = chain["run"] / "report.html"
    text = path.read_text()
    for name in PLOTS:
        assert re.search(rf'data-plot="{name}"[^>]*src="data:image/png;base64,', text), name
    assert "No reward-model stage in this run." in text
    assert "<script" not in text and "http://" not in text and "https://" not in text
    # Sample text is escaped: no raw markup from prompts (they contain quotes).
    assert "Define the word &quot;" in text


def policy_rows(text: str, name: str) -> int:
    return len(re.findall(rf'<tr data-policy="{name}">', text))


def test_report_html_has_config_lineage_curves_and_every_policy(chain):
    """The content the screenshot test also checks, read from the file (no browser needed)."""
    text = (chain["run"] / "report.html").read_text()
    # Configuration and model: the settings that differ from the defaults, per stage.
    assert '<h2 id="config">Configuration and model</h2>' in text
    assert "<td>ppo.num_updates</td><td>2</td><td>100</td>" in text
    assert "<td>model.init</td><td>scratch</td><td>pretrained</td>" in text
    assert "randomly initialized Llama-style model" in text
    assert 'href="ppo/config.yaml"' in text
    # Lineage: links to each stage's folder and model, and what it consumed.
    for stage in ("sft", "ppo", "eval"):
        assert f'<a href="{stage}/">{stage}/</a>' in text, stage
    assert '<a href="sft/model/">model/</a>' in text and "none (random init)" in text
    # Samples: every policy of the eval results, for every prompt shown.
    samples = (chain["eval"] / "samples.jsonl").read_text().splitlines()
    for name in chain["results"]["policies"]:
        assert policy_rows(text, name) == len(samples), name
    assert text.count('<tbody class="prompt">') == len(samples)
    # Curves: every group with a changing curve is plotted; the constant ones are listed.
    rows = report.read_metrics(chain["run"] / "ppo" / "metrics.jsonl")
    keys = report.curve_keys(rows)
    assert len(keys) > 20
    for title, group in report.group_curves(keys):
        changing = [k for k in group if len(report.series(rows, k)[1]) == 1
                    or len(set(report.series(rows, k)[1])) > 1]
        slug = f"ppo_{title.lower().replace(' ', '_')}"
        assert (f'data-plot="{slug}"' in text) == bool(changing), title
        for key in set(group) - set(changing):
            assert re.search(rf"Constant over the run:[^<]*{re.escape(key)} = ", text), key


def test_report_shows_a_policy_it_has_never_heard_of(chain, tmp_path):
    """Policies are read from the eval results: a new one (here a copy of PPO named dpo)
    gets its results row, win rate and samples with no change to the report."""
    run = tmp_path / "er"
    for stage in ("sft", "ppo", "eval"):
        shutil.copytree(chain["run"] / stage, run / stage,
                        ignore=shutil.ignore_patterns("model", "snapshots", "checkpoints"))
    results = json.loads((run / "eval" / "results.json").read_text())
    results["policies"]["dpo"] = results["policies"]["ppo"]
    results["win_rates"]["dpo_vs_sft"] = results["win_rates"]["ppo_vs_sft"]
    (run / "eval" / "results.json").write_text(json.dumps(results))
    rows = [json.loads(x) for x in (run / "eval" / "samples.jsonl").read_text().splitlines()]
    for row in rows:
        row["dpo"] = {**row["ppo"], "response": f"dpo says {row['word']}"}
    (run / "eval" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = report.build(run)
    assert "<h2 id=\"eval\">Evaluation: base vs SFT vs PPO vs DPO</h2>" in text
    assert "<td>DPO vs SFT</td>" in text
    assert policy_rows(text, "dpo") == len(rows)
    assert f"dpo says {rows[0]['word']}" in text


def test_eval_refuses_an_unfinished_optional_parent(tmp_path, tiny_sft_run):
    from pipeline.errors import PipelineError

    shutil.copytree(tiny_sft_run, tmp_path / "half" / "sft")
    (tmp_path / "half" / "ppo").mkdir()
    cfg = load_config(None, [*tiny_override_list(tmp_path, name="half"), *EVAL])
    with pytest.raises(PipelineError, match="eval.ppo"):
        evaluate.run(cfg)
    assert not (tmp_path / "half" / "eval" / MANIFEST).exists()


def test_report_without_eval_says_so(tmp_path, tiny_sft_run):
    shutil.copytree(tiny_sft_run, tmp_path / "solo" / "sft")
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=solo"])
    text = (report.run(cfg) / "report.html").read_text()
    assert 'data-plot="sft_loss"' in text
    assert "No PPO stage in this run." in text and "No eval stage in this run" in text


def make_rm_stage(cfg, sft_model: Path) -> Path:
    """A finished rm stage in ``cfg``'s run: the SFT model with a fresh score head, and a
    normalization (raw + 100) * 2 that shows in every score it is applied to."""
    from pipeline.models import load_reward_backbone, load_tokenizer, tokenizer_sha256
    from pipeline.rundir import StageDir

    rm_stage = StageDir(cfg, "rm")
    rm_stage.start()
    tok = load_tokenizer(str(sft_model), cfg.model)
    model = load_reward_backbone(str(sft_model), cfg.model, tok)
    model.save_pretrained(rm_stage.path / "model")
    tok.save_pretrained(rm_stage.path / "model")
    bins = [{"lo": 0.5, "hi": 0.6, "count": 3, "confidence": 0.55, "accuracy": 0.6}]
    return rm_stage.finish(metrics={"eval_accuracy_before": 0.5, "eval_accuracy_after": 0.7},
                           extras={"norm_bias": 100.0, "norm_scale": 2.0, "norm_samples": 8,
                                   "calibration": bins},
                           tokenizer_sha256=tokenizer_sha256(tok))


def test_eval_with_reward_model_and_report(chain, tmp_path):
    """A run with an rm stage: normalized RM scores per policy and per overoptimization point,
    and the report's reward-model section (accuracy bars and its reliability diagram)."""
    for stage in ("sft", "ppo"):
        shutil.copytree(chain["run"] / stage, tmp_path / "withrm" / stage)
    cfg = load_config(None, [*tiny_override_list(tmp_path, name="withrm"), *EVAL,
                             "eval.num_prompts=4"])
    make_rm_stage(cfg, tmp_path / "withrm" / "sft" / "model")
    results = json.loads((evaluate.run(cfg) / "results.json").read_text())
    torch.set_num_threads(1)
    for row in results["policies"].values():
        # (raw + 100) * 2: the normalization of the rm manifest was applied.
        assert row["rm"]["mean"] > 100 and row["rm"]["n"] == 4
    assert all(p["rm"] is not None for p in results["overoptimization"])
    text = (report.run(cfg) / "report.html").read_text()
    assert re.search(r'data-plot="rm_accuracy"[^>]*src="data:image/png;base64,', text)


def test_eval_scores_with_the_reward_model_ppo_borrowed(chain, tmp_path):
    """A PPO run that trained against another run's reward model (ppo.reward_model=...) and
    has no rm/ of its own: eval scores with that model and runs best-of-N, and refuses once
    the model has changed since PPO used it."""
    from pipeline.files import atomic_write_json, file_sha256

    cfg_rm = load_config(None, [*tiny_override_list(tmp_path, name="rmrun")])
    rm_dir = make_rm_stage(cfg_rm, chain["run"] / "sft" / "model")
    for stage in ("sft", "ppo"):
        shutil.copytree(chain["run"] / stage, tmp_path / "borrow" / stage)
    manifest_path = tmp_path / "borrow" / "ppo" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["parents"]["reward_model"] = {"path": str(rm_dir),
                                           "manifest_sha256": file_sha256(rm_dir / MANIFEST)}
    atomic_write_json(manifest_path, manifest)
    cfg = load_config(None, [*tiny_override_list(tmp_path, name="borrow"), *EVAL,
                             "eval.num_prompts=4", "eval.best_of_n=2"])
    results = json.loads((evaluate.run(cfg) / "results.json").read_text())
    torch.set_num_threads(1)
    assert results["reward_model"] == str(rm_dir)
    assert results["best_of_n"] == 2 and "bon" in results["policies"]
    assert all(row["rm"]["mean"] > 100 for row in results["policies"].values())

    rm_manifest = json.loads((rm_dir / MANIFEST).read_text())
    rm_manifest["metrics"]["eval_accuracy_after"] = 0.9
    atomic_write_json(rm_dir / MANIFEST, rm_manifest)
    shutil.rmtree(tmp_path / "borrow" / "eval")
    with pytest.raises(PipelineError, match=r"eval\.reward_model: PPO .* has changed"):
        evaluate.run(cfg)


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def test_report_renders_in_headless_chromium(chain, tmp_path):
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("/usr/bin/chromium is missing: .ci/run installs it before the tests")
        pytest.skip("/usr/bin/chromium is not installed (apt-get install chromium)")
    from PIL import Image

    url = (chain["run"] / "report.html").resolve().as_uri()
    shot = tmp_path / "shot.png"
    _chromium(f"--screenshot={shot}", "--window-size=1200,3000", url, tmp=tmp_path)
    assert shot.is_file(), "chromium wrote no screenshot"
    image = Image.open(shot).convert("L")
    assert image.size == (1200, 3000)
    lo, hi = image.getextrema()
    assert hi - lo > 100, "blank screenshot"
    # Plots are drawn images: many distinct grey levels, unlike a page of text alone.
    assert sum(1 for n in image.histogram() if n) > 50

    dom = _chromium("--dump-dom", "--virtual-time-budget=5000", url, tmp=tmp_path).stdout
    assert "<h1>RLHF report" in dom
    assert 'data-broken' not in re.sub(r"onerror=\"[^\"]*\"", "", dom)
    for name in PLOTS:
        assert re.search(rf'<img[^>]*data-plot="{name}"', dom), name
    # The config section and every policy's samples are in the rendered page.
    assert re.search(r'<h2 id="config">Configuration and model</h2>', dom)
    assert "<td>ppo.num_updates</td><td>2</td><td>100</td>" in dom
    samples = (chain["eval"] / "samples.jsonl").read_text().splitlines()
    for name in chain["results"]["policies"]:
        assert policy_rows(dom, name) == len(samples), name
