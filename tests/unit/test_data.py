"""Dataset loaders: accepted shapes, every rejection path, and the committed WordNet data."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from pipeline.data import (
    DataError,
    PromptExample,
    RankedExample,
    load_prompts,
    load_ranked,
    load_sft_conversations,
    read_jsonl,
)

WORDNET_DIR = Path(__file__).resolve().parents[2] / "data" / "wordnet"
SPLIT_KEYS = {
    "sft": {"id", "word", "pos", "prompt", "completion"},
    "label": {"id", "word", "pos", "prompt", "reference"},
    "ppo": {"id", "word", "pos", "prompt", "reference"},
    "eval": {"id", "word", "pos", "prompt", "reference"},
}


def write_rows(path: Path, rows: list[Any]) -> Path:
    """Write one JSON value per line; str items are written verbatim (for malformed lines)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def assert_error(excinfo: pytest.ExceptionInfo[DataError], location: str, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith(f"{location}: "), message
    for fragment in fragments:
        assert fragment in message, message


GOOD_PAIR = {"prompt": "p", "completion": "c"}
GOOD_RANKED = {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 0, 1]}


# ---------------------------------------------------------------------------------------------
# read_jsonl
# ---------------------------------------------------------------------------------------------


def test_read_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "x.jsonl", [{"a": 1}, "", "   ", {"b": 2}])
    assert read_jsonl(path) == [(1, {"a": 1}), (4, {"b": 2})]


def test_read_jsonl_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as excinfo:
        read_jsonl(path)
    assert str(excinfo.value) == f"{path}: no such file"


def test_read_jsonl_invalid_json(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "x.jsonl", [{"a": 1}, '{"a": '])
    with pytest.raises(DataError) as excinfo:
        read_jsonl(path)
    assert_error(excinfo, f"{path}:2", "invalid JSON (")


def test_read_jsonl_non_object(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "x.jsonl", [{"a": 1}, {"b": 2}, [1, 2]])
    with pytest.raises(DataError) as excinfo:
        read_jsonl(path)
    assert_error(excinfo, f"{path}:3", "expected a JSON object")


# ---------------------------------------------------------------------------------------------
# SFT conversations
# ---------------------------------------------------------------------------------------------


def test_sft_accepts_both_formats(tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    path = write_rows(
        tmp_path / "x.jsonl",
        [{"messages": messages}, {"prompt": "Define cat.", "completion": "A small feline."}],
    )
    assert load_sft_conversations(path) == [
        messages,
        [
            {"role": "user", "content": "Define cat."},
            {"role": "assistant", "content": "A small feline."},
        ],
    ]


def test_sft_limit_keeps_first_rows(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    path = write_rows(tmp_path / "x.jsonl", [*rows, "not json"])
    loaded = load_sft_conversations(path, limit=2)
    assert [conv[0]["content"] for conv in loaded] == ["p0", "p1"]
    assert load_sft_conversations(path, limit=0) == []


def test_sft_missing_source(tmp_path: Path) -> None:
    path = tmp_path / "missing.jsonl"
    with pytest.raises(DataError) as excinfo:
        load_sft_conversations(path)
    assert str(excinfo.value) == f"{path}: no such file"


def test_sft_empty_file_is_an_error(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "x.jsonl", [""])
    with pytest.raises(DataError) as excinfo:
        load_sft_conversations(path)
    assert str(excinfo.value) == f"{path}: no rows"


@pytest.mark.parametrize(
    ("row", "fragments"),
    [
        ({"text": "hi"}, ['expected either "messages" or "prompt"+"completion"']),
        ({"prompt": "p"}, ['expected "completion" to be a non-empty string', "missing"]),
        ({"prompt": "p", "completion": "  "}, ['expected "completion" to be a non-empty string']),
        ({"prompt": 3, "completion": "c"}, ['expected "prompt" to be a non-empty string', "int"]),
        ({"messages": []}, ['expected "messages" to be a non-empty list']),
        ({"messages": "hi"}, ['expected "messages" to be a non-empty list']),
        ({"messages": ["hi"]}, ['"messages"[0] must be an object']),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "bot", "content": "c"},
                ]
            },
            ["\"messages\"[2].role must be one of system/user/assistant, got 'bot'"],
        ),
        ({"messages": [{"content": "a"}]}, ['"messages"[0].role must be one of']),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
            ['"messages"[1].content must be a non-empty string'],
        ),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]},
            ['"messages"[1].content must be a non-empty string', "missing"],
        ),
        (
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
            ["the last message must be from the assistant, got 'user'"],
        ),
        (
            {"messages": [{"role": "user", "content": "a"}]},
            ["the last message must be from the assistant"],
        ),
    ],
)
def test_sft_rejects_malformed_rows(
    tmp_path: Path, row: dict[str, Any], fragments: list[str]
) -> None:
    path = write_rows(tmp_path / "x.jsonl", [GOOD_PAIR, GOOD_PAIR, "", row])
    with pytest.raises(DataError) as excinfo:
        load_sft_conversations(path)
    assert_error(excinfo, f"{path}:4", *fragments)


def test_sft_reads_save_to_disk_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": "p0", "completion": "c0"}, {"prompt": "p1", "completion": "c1"}]
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    loaded = load_sft_conversations(folder)
    assert loaded[1] == [
        {"role": "user", "content": "p1"},
        {"role": "assistant", "content": "c1"},
    ]


def test_sft_dataset_dict_uses_train_split_and_row_index(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_list(
        [{"prompt": "p0", "completion": "c0"}, {"prompt": "p1", "completion": ""}]
    )
    test = datasets.Dataset.from_list([{"prompt": "t", "completion": "t"}])
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(folder))
    assert load_sft_conversations(folder, limit=1)[0][0]["content"] == "p0"
    with pytest.raises(DataError) as excinfo:
        load_sft_conversations(folder)
    assert_error(excinfo, f"{folder}:1", '"completion"')


def test_sft_folder_that_is_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError) as excinfo:
        load_sft_conversations(tmp_path)
    assert_error(excinfo, str(tmp_path), "save_to_disk")


def test_sft_hub_id_loads_requested_split(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls: list[tuple[str, str]] = []

    def fake_load_dataset(name: str, split: str) -> Any:
        calls.append((name, split))
        return datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}, {"prompt": "q"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert len(load_sft_conversations("someone/defs:validation", limit=1)) == 1
    with pytest.raises(DataError) as excinfo:
        load_sft_conversations("someone/defs")
    assert calls == [("someone/defs", "validation"), ("someone/defs", "train")]
    assert_error(excinfo, "someone/defs:1", '"completion"')


def test_sft_hub_failure_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")

    def failing_load_dataset(name: str, split: str) -> Any:
        raise ConnectionError("offline\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    with pytest.raises(DataError) as excinfo:
        load_sft_conversations("someone/defs")
    assert_error(excinfo, "someone/defs", "Hugging Face Hub (offline)")


def test_sft_source_that_is_neither_path_nor_hub_id(tmp_path: Path) -> None:
    source = str(tmp_path / "a" / "b")
    with pytest.raises(DataError) as excinfo:
        load_sft_conversations(source)
    assert_error(excinfo, source, "no such file, folder or Hub dataset id")


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def test_prompts_fields_and_completion_as_reference(tmp_path: Path) -> None:
    path = write_rows(
        tmp_path / "x.jsonl",
        [
            {"prompt": "a", "reference": "r", "word": "w", "id": "x-1"},
            {"prompt": "b", "completion": "c"},
            {"prompt": "c", "id": 7},
        ],
    )
    assert load_prompts(path) == [
        PromptExample(prompt="a", reference="r", word="w", id="x-1"),
        PromptExample(prompt="b", reference="c"),
        PromptExample(prompt="c", id="7"),
    ]
    assert load_prompts(path, limit=1) == [load_prompts(path)[0]]


@pytest.mark.parametrize(
    ("row", "key"),
    [
        ({"reference": "r"}, '"prompt"'),
        ({"prompt": ""}, '"prompt"'),
        ({"prompt": "p", "reference": 5}, '"reference"'),
        ({"prompt": "p", "word": ""}, '"word"'),
        ({"prompt": "p", "id": True}, '"id"'),
    ],
)
def test_prompts_reject_malformed_rows(tmp_path: Path, row: dict[str, Any], key: str) -> None:
    path = write_rows(tmp_path / "x.jsonl", [{"prompt": "ok"}, row])
    with pytest.raises(DataError) as excinfo:
        load_prompts(path)
    assert_error(excinfo, f"{path}:2", f"expected {key}")


# ---------------------------------------------------------------------------------------------
# Ranked responses
# ---------------------------------------------------------------------------------------------


def test_ranked_shape_and_pairwise_conversion(tmp_path: Path) -> None:
    path = write_rows(
        tmp_path / "x.jsonl",
        [
            {**GOOD_RANKED, "reference": "ref"},
            {"prompt": "q", "chosen": "good", "rejected": "bad"},
        ],
    )
    assert load_ranked(path) == [
        RankedExample(prompt="p", responses=("a", "b", "c"), ranks=(1, 0, 1), reference="ref"),
        RankedExample(prompt="q", responses=("good", "bad"), ranks=(0, 1)),
    ]
    assert len(load_ranked(path, limit=1)) == 1


@pytest.mark.parametrize(
    ("row", "fragments"),
    [
        (
            {"prompt": "p", "text": "x"},
            ['expected either "responses"+"ranks" or "chosen"+"rejected"'],
        ),
        ({"prompt": "p", "responses": ["a"], "ranks": [0]}, ['"responses"', "at least 2", "got 1"]),
        ({"prompt": "p", "responses": "ab", "ranks": [0, 1]}, ['"responses"', "at least 2"]),
        ({"prompt": "p", "responses": ["a", ""], "ranks": [0, 1]}, ['"responses"[1] must be']),
        ({"prompt": "p", "responses": ["a", 3], "ranks": [0, 1]}, ['"responses"[1] must be']),
        (
            {"prompt": "p", "responses": ["a", "b"], "ranks": [0]},
            ['"ranks"', "2 integers", "got 1"],
        ),
        ({"prompt": "p", "responses": ["a", "b"]}, ['"ranks"', "2 integers", "missing"]),
        (
            {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1.5]},
            ['"ranks"[1] must be an integer'],
        ),
        (
            {"prompt": "p", "responses": ["a", "b"], "ranks": [True, 0]},
            ['"ranks"[0] must be an integer'],
        ),
        ({"prompt": "p", "responses": ["a", "b"], "ranks": [1, 1]}, ['all "ranks" are equal']),
        ({"responses": ["a", "b"], "ranks": [0, 1]}, ['expected "prompt"']),
        ({"prompt": "p", "chosen": "a"}, ['expected "rejected" to be a non-empty string']),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, ['expected "chosen"']),
        ({"chosen": "a", "rejected": "b"}, ['expected "prompt"']),
    ],
)
def test_ranked_rejects_malformed_rows(
    tmp_path: Path, row: dict[str, Any], fragments: list[str]
) -> None:
    path = write_rows(tmp_path / "x.jsonl", [GOOD_RANKED, row])
    with pytest.raises(DataError) as excinfo:
        load_ranked(path)
    assert_error(excinfo, f"{path}:2", *fragments)


# ---------------------------------------------------------------------------------------------
# Committed WordNet data
# ---------------------------------------------------------------------------------------------


def test_committed_wordnet_splits() -> None:
    words: dict[str, set[str]] = {}
    for split, keys in SPLIT_KEYS.items():
        path = WORDNET_DIR / f"{split}.jsonl"
        rows = [row for _, row in read_jsonl(path)]
        assert rows, split
        for row in rows:
            assert set(row) == keys, (split, row)
            word = row["word"]
            assert row["prompt"] == f'Define the word "{word}" in one sentence.'
            definition = row["completion"] if split == "sft" else row["reference"]
            assert not re.search(rf"\b{re.escape(word)}\b", definition, re.IGNORECASE), row
            assert row["pos"] in {"noun", "verb", "adjective", "adverb"}
        words[split] = {row["word"] for row in rows}
        assert len(words[split]) == len(rows), f"{split} repeats a word"
    names = list(words)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert not words[first] & words[second], (first, second)
    # The loaders accept the committed files as they are.
    assert len(load_sft_conversations(WORDNET_DIR / "sft.jsonl")) == len(words["sft"])
    assert len(load_prompts(WORDNET_DIR / "eval.jsonl")) == len(words["eval"])
    assert (WORDNET_DIR / "LICENSE").read_text().count("Princeton University") >= 2
