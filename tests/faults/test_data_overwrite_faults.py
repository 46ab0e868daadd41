"""Data faults (exit 1, one line naming file:line, no complete manifest) and overwrite faults:
``run.overwrite=true`` with a bad input is refused before the finished stage is touched."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest

from tests.faults.helpers import (
    DATA,
    RULE_ONLY,
    USER,
    chain_args,
    cli,
    config_problem,
    error_line,
    fingerprint,
    incomplete,
    write_jsonl,
)

PAIRS = [{"prompt": f"Define item {i}.", "chosen": f"good answer {i}", "rejected": f"bad {i}"}
         for i in range(8)]


# --- data --------------------------------------------------------------------------------


def test_non_utf8_byte(tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_bytes(b'{"prompt": "Define tea.", "completion": "A drink."}\n'
                     b'{"prompt": "Define caf\xe9.", "completion": "A place."}\n')
    code, _, err = cli(capsys, "sft", *chain_args(tmp_path / "runs", "d"), f"data.sft={data}")
    assert code == 1
    error_line(err, rf"{data}:2: not UTF-8 text \(byte 0xe9 at column 23\)")
    assert incomplete(tmp_path / "runs" / "d" / "sft")


def test_compressed_file(tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_bytes(gzip.compress((DATA / "sft.jsonl").read_bytes()))
    code, _, err = cli(capsys, "sft", *chain_args(tmp_path / "runs", "d"), f"data.sft={data}")
    assert code == 1
    error_line(err, rf"{data}: a gzip-compressed file without the \.gz suffix \(name it "
                    rf"sft\.jsonl\.gz to read it compressed\)")
    assert incomplete(tmp_path / "runs" / "d" / "sft")


def test_pair_with_chosen_equal_to_rejected(finished, tmp_path, capsys):
    rows = [dict(r) for r in PAIRS]
    rows[2]["rejected"] = rows[2]["chosen"]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    code, _, err = cli(capsys, "rm", *chain_args(tmp_path / "runs", "d"),
                       f"rm.sft={finished / 'done' / 'sft'}", f"rm.data={data}")
    assert code == 1
    error_line(err, rf'{data}:3: "chosen" and "rejected" are identical: no preference')
    assert incomplete(tmp_path / "runs" / "d" / "rm")


def test_ranked_row_with_identical_responses(finished, tmp_path, capsys):
    rows = [{"prompt": "Define tea.", "responses": ["A drink.", "A drink.", "A drink."],
             "ranks": [0, 1, 2]}]
    data = write_jsonl(tmp_path / "ranked.jsonl", rows)
    code, _, err = cli(capsys, "rm", *chain_args(tmp_path / "runs", "d"),
                       f"rm.sft={finished / 'done' / 'sft'}", f"rm.data={data}")
    assert code == 1
    error_line(err, rf'{data}:1: all "responses" are identical')
    assert incomplete(tmp_path / "runs" / "d" / "rm")


def test_empty_prompt_file(finished, tmp_path, capsys):
    empty = tmp_path / "ppo.jsonl"
    empty.write_text("\n")
    code, _, err = cli(capsys, "ppo", *chain_args(tmp_path / "runs", "d"), RULE_ONLY,
                       f"ppo.policy={finished / 'done' / 'sft'}", f"data.ppo={empty}")
    assert code == 1
    error_line(err, rf"{empty}: no rows")
    assert incomplete(tmp_path / "runs" / "d" / "ppo")


# --- overwrite: the finished stage survives a refused replacement -------------------------


def _malformed(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "Define tea.", "completion": "A drink."}\n{"prompt": \n')
    return path


def _empty(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    return path


def _equal_pairs(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl",
                       [{"prompt": "Define tea.", "chosen": "A drink.", "rejected": "A drink."}])


def _remote_code_model(tmp_path, finished):
    folder = tmp_path / "custom"
    shutil.copytree(finished / "done" / "sft" / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="my-own-llama",
                  auto_map={"AutoConfig": "configuration_mine.MyConfig",
                            "AutoModelForCausalLM": "modeling_mine.MyModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_mine.py").write_text(
        f"open({str(tmp_path / 'RAN')!r}, 'w').write('custom code ran')\n")
    return folder


OVERWRITES = [
    pytest.param("sft", lambda t, f: [f"data.sft={t / 'missing.jsonl'}"], 1,
                 r"missing\.jsonl: no such file", id="sft-missing-data"),
    pytest.param("sft", lambda t, f: [f"data.sft={_malformed(t)}"], 1,
                 r"bad\.jsonl:2: invalid JSON", id="sft-malformed-data"),
    pytest.param("sft", lambda t, f: ["model.init=pretrained",
                                      f"model.name_or_path={_remote_code_model(t, f)}"], 1,
                 r"ships its own Python code, and model\.trust_remote_code is false",
                 id="sft-model-with-custom-code"),
    pytest.param("rm", lambda t, f: [f"rm.data={t / 'missing.jsonl'}"], 1,
                 r"missing\.jsonl: no such file", id="rm-missing-data"),
    pytest.param("rm", lambda t, f: [f"rm.data={_equal_pairs(t)}"], 1,
                 r'"chosen" and "rejected" are identical', id="rm-identical-pair"),
    pytest.param("rm", lambda t, f: [f"data.ppo={_empty(t)}"], 1,
                 r"empty\.jsonl: no rows", id="rm-empty-normalization-prompts"),
    pytest.param("ppo", lambda t, f: [f"data.ppo={_empty(t)}"], 1, r"empty\.jsonl: no rows",
                 id="ppo-empty-prompts"),
    pytest.param("ppo", lambda t, f: ["ppo.rewards=[{type: model}, "
                                      "{type: rule, name: 'my_rules_gone:f'}]"], 2,
                 r"cannot import module 'my_rules_gone'", id="ppo-missing-reward-module"),
    pytest.param("label", lambda t, f: [f"label.judge={USER}_gone:overlap"], 2,
                 r"cannot import module 'tests\.faults\.user_code_gone'",
                 id="label-missing-judge-module"),
]


@pytest.mark.parametrize("stage, bad, exit_code, pattern", OVERWRITES)
def test_overwrite_with_bad_input_keeps_finished_stage(finished, tmp_path, capsys, stage, bad,
                                                       exit_code, pattern):
    folder = finished / "done" / stage
    before = fingerprint(folder)
    code, _, err = cli(capsys, stage, *chain_args(finished, "done"), "run.overwrite=true",
                       *bad(tmp_path, finished))
    assert code == exit_code
    if exit_code == 2:
        config_problem(err, pattern)
    else:
        error_line(err, pattern)
    assert fingerprint(folder) == before
    assert not incomplete(folder)
    assert not (tmp_path / "RAN").exists()
