"""Config loading: defaults <- YAML <- dotted overrides, types, and errors reported all at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import (
    Config,
    ConfigError,
    RewardComponent,
    config_sha256,
    hub_repo_id,
    load_config,
    parse_override,
    to_dict,
    to_yaml,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_load():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.name_or_path == "smollm2-135m-instruct"
    assert cfg.sft.lr == 2e-4 and isinstance(cfg.sft.lr, float)
    assert [c.type for c in cfg.ppo.rewards] == ["model"]
    assert cfg.run_dir == Path("runs") / "default"


def test_yaml_then_overrides(tmp_path):
    f = write(tmp_path / "c.yaml", "sft:\n  lr: 0.1\n  batch_size: 3\nrun:\n  name: fromfile\n")
    cfg = load_config(f)
    assert (cfg.sft.lr, cfg.sft.batch_size, cfg.run.name) == (0.1, 3, "fromfile")
    cfg = load_config(f, ["sft.lr=0.5", "run.name=fromcli"])
    # The override wins over the file, the file over the defaults, untouched keys keep theirs.
    assert (cfg.sft.lr, cfg.sft.batch_size, cfg.run.name) == (0.5, 3, "fromcli")
    assert cfg.sft.epochs == Config().sft.epochs


def test_unquoted_no_is_the_precision_no(tmp_path):
    """YAML 1.1 reads `no` as false; mixed_precision=no (accelerate's spelling) still means no,
    while a string field that has no "no" choice still refuses a boolean."""
    f = write(tmp_path / "c.yaml", "sft:\n  mixed_precision: no\n")
    cfg = load_config(f, ["ppo.mixed_precision=no", "rm.mixed_precision=auto"])
    assert (cfg.sft.mixed_precision, cfg.ppo.mixed_precision) == ("no", "no")
    assert cfg.rm.mixed_precision == "auto"
    with pytest.raises(ConfigError, match="run.name=False: expected a string"):
        load_config(None, ["run.name=no"])


def test_nested_file_section_keeps_other_defaults(tmp_path):
    f = write(tmp_path / "c.yaml", "model:\n  scratch:\n    num_layers: 3\n")
    cfg = load_config(f)
    assert cfg.model.scratch.num_layers == 3
    assert cfg.model.scratch.hidden_size == Config().model.scratch.hidden_size
    assert cfg.model.name_or_path == Config().model.name_or_path


def test_dotted_overrides_nested_list_null_and_float():
    cfg = load_config(None, [
        "model.scratch.hidden_size=8",
        "model.scratch.num_heads=2",
        "model.scratch.num_kv_heads=1",
        "ppo.rewards=[{type: model}, {type: rule, name: no_headword, weight: 0.5}]",
        "sft.train_size=null",
        "label.num_prompts=7",
        "sft.lr=1e-4",
        "model.lora.target_modules=q_proj,v_proj",
        "run.resume=true",
    ])
    assert cfg.model.scratch.hidden_size == 8
    assert cfg.ppo.rewards == [RewardComponent(type="model"),
                               RewardComponent(type="rule", name="no_headword", weight=0.5)]
    assert all(isinstance(c, RewardComponent) for c in cfg.ppo.rewards)
    assert cfg.sft.train_size is None
    assert cfg.label.num_prompts == 7
    assert cfg.sft.lr == 1e-4 and isinstance(cfg.sft.lr, float)
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.run.resume is True


def test_float_from_yaml_file_without_dot(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; a float field takes it as the number.
    cfg = load_config(write(tmp_path / "c.yaml", "ppo:\n  lr: 1e-4\n"))
    assert cfg.ppo.lr == 1e-4 and isinstance(cfg.ppo.lr, float)


def test_int_is_accepted_for_float_and_string_fields():
    cfg = load_config(None, ["sft.lr=1", "run.name=123"])
    assert cfg.sft.lr == 1.0 and isinstance(cfg.sft.lr, float)
    assert cfg.run.name == "123"


def test_list_item_overrides_update_one_item_of_the_file_list():
    cfg = load_config("default", ["ppo.rewards[0].weight=0.3", "ppo.rewards[1].name=length_bounds",
                                  "ppo.rewards[2]={weight: 2}", "run.seeds[1]=7"])
    file_cfg = load_config("default")
    model, rule, cost = file_cfg.ppo.rewards
    assert cfg.ppo.rewards == [
        RewardComponent(type="model", weight=0.3),
        RewardComponent(type="rule", name="length_bounds", weight=rule.weight),
        RewardComponent(type="cost", name=cost.name, weight=2.0),
    ]
    assert isinstance(cfg.ppo.rewards[0].weight, float)
    assert cfg.run.seeds == [0, 7, 2]
    # The file's own list is not changed by an item override of another load.
    assert file_cfg.ppo.rewards == [model, rule, cost] and model.weight == 1.0
    # A whole list and an item of it in one command line: the item applies to the new list.
    cfg = load_config(None, ["ppo.rewards[1].weight=0.25",
                             "ppo.rewards=[{type: model}, {type: rule, name: no_headword}]"])
    assert [c.weight for c in cfg.ppo.rewards] == [1.0, 0.25]


def test_list_item_override_problems_one_line_each_all_at_once(capsys):
    with pytest.raises(ConfigError) as exc:
        load_config("default", ["ppo.rewards[3].weight=1", "ppo.rewards[0].wieght=1",
                                "ppo.rewards[-1].weight=1", "ppo.lr[0]=1",
                                "ppo.rewards[1].weight=abc", "ppo.rewards[2].type=reward",
                                "run.seeds[5]=1"])
    assert sorted(exc.value.problems) == sorted([
        "ppo.rewards[-1].weight: expected name[N] with N = 0, 1, ... for a list item, got "
        "'rewards[-1]'",
        "ppo.lr[0]: ppo.lr is a float, not a list",
        "ppo.rewards[3]: no such item (ppo.rewards has 3 items); set ppo.rewards=[...] to add "
        "or remove items",
        "ppo.rewards[0].wieght: unknown key (valid: name, params, type, weight)",
        "ppo.rewards[1].weight='abc': expected a number",
        "run.seeds[5]: no such item (run.seeds has 3 items); set run.seeds=[...] to add or "
        "remove items",
        "ppo.rewards[2].type='reward': expected one of model, rule, cost",
    ])
    assert main(["config", "validate", "--config", "default", "ppo.rewards[9].weight=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "ppo.rewards[9]: no such item" in err


def test_shared_training_fields_keep_their_check_under_each_stage_default():
    """sft, rm and dpo share one optimizer/loop group; each restates only its own defaults,
    and a restated field keeps the group's check. Problems come in the order help lists the
    keys: a section's own, then the shared ones."""
    cfg = Config()
    assert (cfg.sft.lr, cfg.rm.lr, cfg.dpo.lr) == (2e-4, 1e-5, 5e-6)
    assert (cfg.sft.lr_scheduler, cfg.rm.lr_scheduler, cfg.dpo.lr_scheduler) == (
        "cosine", "linear", "linear")
    rm_keys = list(to_dict(cfg)["rm"])
    assert rm_keys[:3] == ["base", "sft", "data"]
    assert rm_keys[-2:] == ["mixed_precision", "gradient_checkpointing"]
    assert rm_keys.index("margin") < rm_keys.index("epochs") < rm_keys.index("lr")
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["sft.lr=0", "rm.lr=-1", "dpo.lr_scheduler=step",
                           "ppo.lr_scheduler=cosine", "rm.warmup_ratio=1",
                           "ppo.mixed_precision=fp8", "ppo.num_minibatches=0"])
    assert exc.value.problems == [
        "sft.lr=0.0: expected > 0",
        "rm.lr=-1.0: expected > 0",
        "rm.warmup_ratio=1.0: expected in [0, 1)",
        "ppo.num_minibatches=0: expected > 0",
        "ppo.lr_scheduler='cosine': expected one of linear, constant",
        "ppo.mixed_precision='fp8': expected one of no, bf16, fp16, auto",
        "dpo.lr_scheduler='step': expected one of linear, cosine, constant",
    ]


def test_parse_override():
    assert parse_override("ppo.kl_coef=0.02") == ("ppo.kl_coef", 0.02)
    assert parse_override("run.name=a=b") == ("run.name", "a=b")
    assert parse_override("run.name=") == ("run.name", "")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("sft.lr")


def test_unknown_key_is_named():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["sft.no_such_key=1"])
    assert "sft.no_such_key" in str(exc.value)
    assert "unknown key" in str(exc.value)
    assert exc.value.problems == [p for p in exc.value.problems if "sft.no_such_key" in p]


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match="nosection"):
        load_config(None, ["nosection.x=1"])


def test_unknown_key_in_file_names_file(tmp_path):
    f = write(tmp_path / "c.yaml", "ppo:\n  kl_coeff: 0.1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    assert str(f) in str(exc.value) and "ppo.kl_coeff" in str(exc.value)


def test_every_problem_in_one_error():
    with pytest.raises(ConfigError) as exc:
        load_config(None, [
            "sft.batch_size=abc",          # wrong type
            "sft.no_such_key=1",           # unknown key
            "ppo.kl_estimator=k9",         # bad choice
            "run.resume=true",             # contradiction with overwrite
            "run.overwrite=true",
        ])
    problems = exc.value.problems
    text = str(exc.value)
    assert len(problems) == 4, problems
    for fragment in ("sft.batch_size", "abc", "sft.no_such_key", "ppo.kl_estimator", "k9",
                     "run.resume", "run.overwrite"):
        assert fragment in text
    # One problem per line, each naming its key.
    assert text.count("\n") == 4


def test_wrong_type_does_not_hide_value_checks():
    """A mistyped value must not swallow the checks on other keys (all problems at once)."""
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["sft.warmup_ratio=abc", "run.resume=true", "run.overwrite=true"])
    text = str(exc.value)
    assert "sft.warmup_ratio" in text
    assert "run.overwrite" in text


@pytest.mark.parametrize(("override", "fragment"), [
    ("sft.lr=-1", "sft.lr"),
    ("sft.warmup_ratio=1.5", "sft.warmup_ratio"),
    ("model.init=random", "model.init"),
    ("model.scratch.num_kv_heads=3", "num_kv_heads"),
    ("label.k=1", "label.k"),
    ("ppo.num_minibatches=3", "ppo.num_minibatches"),
    ("run.name=a/b", "run.name"),
    ("ppo.lagrangian=true", "ppo.lagrangian"),
    ("run.resume=yes please", "run.resume"),
    ("sft.batch_size=2.5", "sft.batch_size"),
    ("run.push_to_hub=true", "run.hub_model_id"),
    ("run.hub_model_id=a/b/c", "run.hub_model_id"),
    ("run.hub_model_id=me/has space", "run.hub_model_id"),
])
def test_bad_values(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(None, [override])


def test_hub_repo_per_stage():
    def repo(template: str, stage: str) -> str:
        cfg = load_config(None, ["run.push_to_hub=true", f"run.hub_model_id={template}",
                                 "run.name=exp-seed1"])
        return hub_repo_id(cfg.run, stage)

    assert repo("me/wordnet", "ppo") == "me/wordnet-ppo"
    assert repo("me/{stage}-wordnet", "rm") == "me/rm-wordnet"
    assert repo("wordnet", "sft") == "wordnet-sft"
    assert repo("me/{run}", "ppo") == "me/exp-seed1-ppo"


def test_ppo_refuses_truncated_sampling_naming_each_key(capsys):
    # Scoring reads the full distribution: a top-k / top-p sampler would make the PPO ratio
    # and the KL compare two different distributions.
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["ppo.top_k=50", "ppo.top_p=0.9"])
    assert len(exc.value.problems) == 2
    assert "ppo.top_k=50" in exc.value.problems[0] and "expected 0" in exc.value.problems[0]
    assert "ppo.top_p=0.9" in exc.value.problems[1] and "expected 1.0" in exc.value.problems[1]
    assert main(["ppo", "ppo.top_k=5"]) == 2
    assert "ppo.top_k=5" in capsys.readouterr().err
    load_config(None, ["ppo.top_k=0", "ppo.top_p=1.0", "label.top_p=0.9"])


def test_dpo_section_collects_every_problem():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["dpo.pairs=random", "dpo.loss_type=kto", "dpo.beta=0",
                           "dpo.max_seq_len=32", "data.max_prompt_tokens=32",
                           "dpo.label_smoothing=0.2", "dpo.warmup_ratio=1", "dpo.eval_size=-1"])
    problems = exc.value.problems
    for fragment in ("dpo.pairs='random'", "dpo.loss_type='kto'", "dpo.beta=0.0",
                     "dpo.max_seq_len=32: expected > data.max_prompt_tokens=32",
                     "dpo.label_smoothing=0.2: only dpo.loss_type=robust",
                     "dpo.warmup_ratio=1.0", "dpo.eval_size=-1"):
        assert any(fragment in p for p in problems), (fragment, problems)
    with pytest.raises(ConfigError, match=r"dpo.label_smoothing=0.5: expected in \[0, 0.5\)"):
        load_config(None, ["dpo.loss_type=robust", "dpo.label_smoothing=0.5"])
    cfg = load_config(None, ["dpo.loss_type=robust", "dpo.label_smoothing=0.1"])
    assert (cfg.dpo.pairs, cfg.dpo.label_smoothing) == ("best_worst", 0.1)


def test_pipeline_stages_default_leaves_dpo_out_and_order_is_checked():
    assert Config().pipeline.stages == ["sft", "label", "rm", "ppo", "eval", "report"]
    cfg = load_config(None, ["pipeline.stages=[sft, label, dpo, eval, report]"])
    assert cfg.pipeline.stages == ["sft", "label", "dpo", "eval", "report"]
    for stages, fragment in (("[sft, dpo, label]", "in the order sft, label, rm, ppo, dpo"),
                             ("[sft, sft]", "each stage once"),
                             ("[sft, kto]", "unknown stage 'kto'"),
                             ("[]", "expected at least one stage")):
        with pytest.raises(ConfigError, match=fragment):
            load_config(None, [f"pipeline.stages={stages}"])


def test_compare_config_is_the_default_plus_dpo():
    """configs/compare.yaml must not drift from the default run it compares against."""
    default, compare = (to_dict(load_config(REPO / "configs" / f"{n}.yaml"))
                        for n in ("default", "compare"))
    assert compare["pipeline"]["stages"] == ["sft", "label", "rm", "ppo", "dpo", "eval",
                                             "report"]
    assert compare["dpo"]["lora"]["enabled"] and compare["dpo"] != default["dpo"]
    assert compare["run"] == {**default["run"], "name": "compare"}
    for section in set(default) - {"dpo", "pipeline", "run"}:
        assert compare[section] == default[section], section


def test_lora_on_scratch_contradicts():
    with pytest.raises(ConfigError, match="model.lora.enabled"):
        load_config(None, ["model.init=scratch", "model.lora.enabled=true"])


def test_data_columns_flat_and_per_split(tmp_path):
    cfg = load_config(None, ["data.columns={question: prompt}",
                             "data.columns.ppo={query: prompt, gold: reference}"])
    assert cfg.data.columns == {"question": "prompt",
                                "ppo": {"query": "prompt", "gold": "reference"}}
    f = write(tmp_path / "c.yaml", "data:\n  columns:\n    question: prompt\n"
                                   "    eval: {answer: reference}\n")
    assert load_config(f).data.columns == {"question": "prompt", "eval": {"answer": "reference"}}


def test_data_columns_problems_all_at_once():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["data.columns={q: 3, train: {a: prompt}, ppo: {a: prompt, b: prompt}, "
                           "eval: {x: ''}}"])
    assert exc.value.problems == [
        "data.columns.q=3: expected a column name (a non-empty string) or, under a split name, "
        "a mapping",
        "data.columns.train: a nested mapping must be under a split name (sft, label, ppo, "
        "eval, ranked); a flat rename maps a column to a string",
        "data.columns.eval.x='': expected a column name (a non-empty string)",
        "data.columns.ppo: 'a' and 'b' both rename to 'prompt'",
    ]
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["data.columns=prompt"])
    assert exc.value.problems == ["data.columns='prompt': expected a mapping"]


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    f = write(tmp_path / "bad.yaml", "sft:\n  lr: 0.1\n  batch_size: [1, 2\nrun:\n  name: x\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    text = str(exc.value)
    assert f"{f}:" in text
    line = int(text.split(f"{f}:")[1].split(":")[0])
    assert 3 <= line <= 5
    assert "invalid YAML" in text


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="no such config file") as exc:
        load_config(missing)
    assert str(missing) in str(exc.value)


def test_top_level_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path / "c.yaml", "- a\n- b\n"))


def test_cli_unknown_key_exits_2(capsys):
    code = main(["sft", "--config", str(REPO / "configs" / "quick.yaml"), "sft.no_such_key=1"])
    captured = capsys.readouterr()
    assert code == 2
    assert "sft.no_such_key" in captured.err
    assert captured.out == ""


def test_cli_missing_config_exits_2(capsys, tmp_path):
    assert main(["sft", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml" in capsys.readouterr().err


def test_sha_and_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["sft.lr=0.01", "ppo.rewards=[{type: model}, {type: cost, name: profanity}]"])
    again = load_config(write(tmp_path / "resolved.yaml", to_yaml(cfg)))
    assert again == cfg
    assert config_sha256(again) == config_sha256(cfg)
    assert config_sha256(cfg) != config_sha256(Config())


def test_shipped_configs_exist():
    names = {p.name for p in SHIPPED}
    assert {"quick.yaml", "gpu_single.yaml", "gpu_multi.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
