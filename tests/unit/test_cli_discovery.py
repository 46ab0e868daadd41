"""Finding one's way without reading the source: per-command key help, config show/validate,
the shipped configs, and the defaults from any working directory (and from a wheel)."""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import yaml

from pipeline import config as config_module
from pipeline import keydoc, shipped
from pipeline.cli import main
from pipeline.config import Config, load_config, to_dict

REPO = Path(__file__).resolve().parents[2]


def _entry(out: str, key: str) -> tuple[str, str]:
    """The ``key: type = default`` line of a help text and the doc lines under it."""
    lines = out.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(f"  {key}: "))
    doc = []
    for line in lines[i + 1:]:
        if not line.startswith("      "):
            break
        doc.append(line.strip())
    return lines[i], " ".join(doc)


def test_ppo_help_lists_kl_coef_with_type_default_and_doc(capsys):
    assert main(["ppo", "--help"]) == 0
    out = capsys.readouterr().out
    head, doc = _entry(out, "ppo.kl_coef")
    assert head == "  ppo.kl_coef: float = 0.05"
    assert doc == "KL penalty coefficient beta (the initial value when adaptive)."
    assert out.startswith("usage: rlhf ppo [--config FILE|NAME] [key=value ...]")
    # A two-line comment is one paragraph; nested sections and list items are flattened.
    assert _entry(out, "ppo.top_k")[1].startswith("Must stay 0 and 1.0: log-probs are scored "
                                                 "on the full distribution, so a truncated")
    assert _entry(out, "ppo.lora.r")[0] == "  ppo.lora.r: int = 16"
    assert _entry(out, "ppo.rewards[].weight")[0] == "  ppo.rewards[].weight: float = 1.0"
    assert _entry(out, "ppo.num_prompts")[0] == "  ppo.num_prompts: int or null = null"
    # The shared sections, not the other stages'.
    for key in ("model.name_or_path", "data.ppo", "run.seed", "tracking.progress"):
        _entry(out, key)
    assert "  sft.lr: " not in out and "  eval.judge: " not in out


def test_dpo_help_lists_the_dpo_keys_with_their_docs(capsys):
    assert main(["dpo", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: rlhf dpo [--config FILE|NAME] [key=value ...]")
    head, doc = _entry(out, "dpo.beta")
    assert head == "  dpo.beta: float = 0.1"
    assert doc.startswith("KL strength: the implicit reward is beta * log(pi / pi_ref)")
    assert _entry(out, "dpo.pairs")[0] == '  dpo.pairs: str = "best_worst"'
    assert _entry(out, "dpo.lora.enabled")[0] == "  dpo.lora.enabled: bool = false"
    # Every dpo key is documented, and the section's summary heads the help.
    dpo_keys = [k for k in keydoc.section_keys(config_module.DpoStageConfig, "dpo")]
    assert all(_entry(out, k.name)[1] for k in dpo_keys), [k.name for k in dpo_keys]
    assert "DPO with TRL's DPOTrainer on the ranked responses" in out
    assert "  ppo.kl_coef: " not in out and "  rm.margin: " not in out


def test_stage_help_covers_its_sections_and_pipeline_help_every_key(capsys):
    assert main(["pipeline", "--help"]) == 0
    out = capsys.readouterr().out

    def leaves(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from leaves(value, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    for key in leaves(Config(), ""):
        _entry(out, key)
    assert main(["sft", "-h"]) == 0
    sft_help = capsys.readouterr().out
    assert "Stage 1: supervised fine-tuning on demonstrations." in sft_help
    _entry(sft_help, "sft.max_steps")
    assert "  ppo.kl_coef: " not in sft_help


def test_every_config_field_has_a_comment():
    """The comment above a field is its documentation (and its --help text); a nested
    section is documented by its class docstring, a restated shared field by its base's."""
    tree = ast.parse(Path(config_module.__file__).read_text())
    classes = [getattr(config_module, n.name) for n in tree.body
               if isinstance(n, ast.ClassDef) and n.name != "Config"
               and dataclasses.is_dataclass(getattr(config_module, n.name))]
    assert len(classes) >= 12
    missing = [f"{cls.__name__}.{f.name}" for cls in classes for f in dataclasses.fields(cls)
               if not keydoc.field_doc(cls, f.name)
               and not dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name])]
    assert missing == []
    assert all(cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(")
               for cls in classes)


def test_no_arguments_prints_usage_not_an_internal_error(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: rlhf COMMAND")
    assert "rest" not in err and "required" not in err
    assert main(["--help"]) == 0
    assert "config validate" in capsys.readouterr().out
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_config_show_prints_the_resolved_config_that_loads_back(tmp_path, capsys):
    args = ["--config", "quick", "ppo.kl_coef=0.2", "run.name=shown"]
    assert main(["config", "show", *args]) == 0
    out = capsys.readouterr().out
    shown = yaml.safe_load(out)
    expected = load_config("quick", ["ppo.kl_coef=0.2", "run.name=shown"])
    assert shown == to_dict(expected)
    assert shown["ppo"]["kl_coef"] == 0.2 and shown["model"]["init"] == "scratch"
    (tmp_path / "shown.yaml").write_text(out)
    assert load_config(tmp_path / "shown.yaml") == expected


def test_config_validate_reports_every_problem(capsys):
    assert main(["config", "validate", "--config", "default"]) == 0
    assert capsys.readouterr().out.strip() == f"valid: {REPO / 'configs' / 'default.yaml'}"
    assert main(["config", "validate", "--config", "default", "ppo.kl_coef=-1",
                 "sft.no_such_key=1", "ppo.kl_estimator=k9"]) == 2
    err = capsys.readouterr().err
    for key in ("ppo.kl_coef", "sft.no_such_key", "ppo.kl_estimator"):
        assert key in err
    assert main(["config", "validate", "--config", "no_such_config"]) == 2
    err = capsys.readouterr().err
    assert "no_such_config: no such config file or shipped config" in err
    assert "default" in err and "quick" in err
    assert main(["config", "frobnicate"]) == 2


def test_configs_ls_and_cp(tmp_path, capsys):
    assert main(["configs", "ls"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines() if line and not line[0].isspace()
             and not line.startswith("(")]
    assert names[:5] == ["compare", "default", "gpu_multi", "gpu_single", "quick"]
    assert "accelerate/cpu_2proc" in names and "deepspeed/zero2" in names
    assert re.search(r"^quick +Tiny random-init model", out, re.M)

    assert main(["configs", "cp", "quick", str(tmp_path)]) == 0
    copied = tmp_path / "quick.yaml"
    assert copied.read_text() == (REPO / "configs" / "quick.yaml").read_text()
    copied.write_text("# edited\n")
    assert main(["configs", "cp", "quick", str(copied)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert copied.read_text() == "# edited\n"
    assert main(["configs", "cp", "accelerate/cpu_2proc", str(tmp_path / "launch.yaml")]) == 0
    assert (tmp_path / "launch.yaml").read_text().startswith("# Two-process DDP")
    assert main(["configs", "cp", "nope", str(tmp_path)]) == 1
    assert "no shipped config named 'nope'" in capsys.readouterr().err
    assert main(["configs", "rm", "quick"]) == 2


def _cli(cwd: Path, *args: str, pythonpath: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def _assert_defaults_found(cwd: Path, root: Path, pythonpath: Path = REPO) -> None:
    proc = _cli(cwd, "config", "validate", "--config", "default", pythonpath=pythonpath)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"valid: {root / 'configs' / 'default.yaml'}"
    proc = _cli(cwd, "config", "show", "--config", "quick", pythonpath=pythonpath)
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load(proc.stdout)["data"]
    for split in ("sft", "label", "ppo", "eval"):
        assert data[split] == str(root / "data" / "wordnet" / f"{split}.jsonl")
        assert Path(data[split]).is_file()


def test_shipped_configs_and_data_from_another_folder(tmp_path):
    _assert_defaults_found(tmp_path, REPO)
    # A file of that name in the working directory wins over the shipped one.
    (tmp_path / "data" / "wordnet").mkdir(parents=True)
    (tmp_path / "data" / "wordnet" / "sft.jsonl").write_text("{}\n")
    proc = _cli(tmp_path, "config", "show")
    data = yaml.safe_load(proc.stdout)["data"]
    assert data["sft"] == "data/wordnet/sft.jsonl"
    assert data["label"] == str(REPO / "data" / "wordnet" / "label.jsonl")


def _installed_files() -> list[str]:
    """This environment's `rlhf` command and the package's entries in its site-packages."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    entries = [*site.glob("*rlhf_pipeline*"), Path(sys.executable).parent / "rlhf"]
    return sorted(str(e) for e in entries if e.exists())


def test_wheel_ships_configs_and_data(tmp_path):
    """A wheel built from the source puts configs and data under <prefix>/share, where an
    installed `rlhf` finds them from any folder."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pipeline", "stages", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "data" / "wordnet", src / "data" / "wordnet")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    installed_before = _installed_files()
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-build-isolation", "--no-deps", "--no-index",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, timeout=300,
                   capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    prefix = tmp_path / "prefix"
    # --ignore-installed: without it pip uninstalls the package from the environment running
    # the tests (an editable `make install`, and with it the `rlhf` command) before it
    # installs into the prefix.
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--ignore-installed",
                    "--prefix", str(prefix), str(wheel)], check=True, timeout=300,
                   capture_output=True)
    assert _installed_files() == installed_before, "installing the wheel changed the test's env"
    (site,) = prefix.glob("lib/python*/site-packages")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"],
                           cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(site)},
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip().startswith(str(site))
    _assert_defaults_found(elsewhere, prefix / "share" / "rlhf-pipeline", pythonpath=site)


def test_find_config_names():
    configs = REPO / "configs"
    for name in ("default", "default.yaml", "configs/default.yaml"):
        assert shipped.find_config(name) == configs / "default.yaml"
    assert shipped.find_config("deepspeed/zero2") == configs / "deepspeed" / "zero2.json"
    assert shipped.find_config("../pyproject.toml") is None
    assert shipped.find_config("nope") is None
