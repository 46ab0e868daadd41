"""Dataset loaders: every accepted form (one fixture file per form in tests/data/forms), every
file type the `datasets` library reads for us, column renames, every rejection path, and the
committed WordNet data."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
from pathlib import Path
from typing import Any

import pytest

from pipeline.data import (
    ColumnMap,
    DataError,
    Demonstration,
    PromptExample,
    RankedExample,
    column_map,
    load_demonstrations,
    load_prompts,
    load_ranked,
    read_rows,
)

REPO = Path(__file__).resolve().parents[2]
WORDNET_DIR = REPO / "data" / "wordnet"
FORMS = REPO / "tests" / "data" / "forms"
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


def error(call: Any, *args: Any, **kwargs: Any) -> str:
    """The one-line DataError message of ``call(*args, **kwargs)``."""
    with pytest.raises(DataError) as excinfo:
        call(*args, **kwargs)
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def msgs(*turns: tuple[str, str]) -> tuple[dict[str, str], ...]:
    return tuple({"role": role, "content": content} for role, content in turns)


CAT = 'Define the word "cat" in one sentence.'
RIVER = 'Define the word "river" in one sentence.'
FELINE = "A small domesticated feline."
GOOD_PAIR = {"prompt": "p", "completion": "c"}
GOOD_RANKED = {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 0, 1]}
BROOK_PROMPT = msgs(("user", 'Define "river".'), ("assistant", "A large stream."),
                    ("user", "And a brook?"))


# ---------------------------------------------------------------------------------------------
# Accepted forms: one fixture file each
# ---------------------------------------------------------------------------------------------

SFT_FORMS = {
    "sft_text.jsonl": [
        Demonstration(text="A cat is a small domesticated feline."),
        Demonstration(text="A river is a large natural stream of water."),
    ],
    "sft_messages.jsonl": [
        Demonstration(msgs(("user", CAT), ("assistant", FELINE))),
        Demonstration(msgs(("system", "Answer in one sentence."), ("user", 'Define "river".'),
                           ("assistant", "A large natural stream of water."),
                           ("user", "And a brook?"), ("assistant", "A small stream."))),
    ],
    "sft_prompt_completion.jsonl": [
        Demonstration(msgs(("user", CAT), ("assistant", FELINE)), first_target=1),
        Demonstration(msgs(("user", RIVER), ("assistant", "A large natural stream of water.")),
                      first_target=1),
    ],
    # The prompt's own assistant turn is context: the loss starts at the completion.
    "sft_conversational_prompt_completion.jsonl": [
        Demonstration(msgs(("user", CAT), ("assistant", FELINE)), first_target=1),
        Demonstration(msgs(("user", 'Define "river".'),
                           ("assistant", "A large natural stream of water."),
                           ("user", "And a brook?"), ("assistant", "A small stream.")),
                      first_target=3),
    ],
}

PROMPT_FORMS = {
    "prompt_only.jsonl": [
        PromptExample(CAT, reference=FELINE, word="cat", id="p-1"),
        PromptExample(RIVER),
    ],
    "prompt_conversational.jsonl": [
        PromptExample(CAT, reference=FELINE, messages=msgs(("user", CAT))),
        PromptExample("And a brook?",
                      messages=msgs(("system", "Answer in one sentence."),
                                    ("user", 'Define "river".'),
                                    ("assistant", "A large natural stream of water."),
                                    ("user", "And a brook?"))),
    ],
    # A prompt-completion row's completion is the reference answer.
    "sft_prompt_completion.jsonl": [
        PromptExample(CAT, reference=FELINE),
        PromptExample(RIVER, reference="A large natural stream of water."),
    ],
    "sft_conversational_prompt_completion.jsonl": [
        PromptExample(CAT, reference=FELINE, messages=msgs(("user", CAT))),
        PromptExample("And a brook?", reference="A small stream.",
                      messages=msgs(("user", 'Define "river".'),
                                    ("assistant", "A large natural stream of water."),
                                    ("user", "And a brook?"))),
    ],
    # A conversation: the turns before its last answer are the prompt, the answer the reference.
    "sft_messages.jsonl": [
        PromptExample(CAT, reference=FELINE, messages=msgs(("user", CAT))),
        PromptExample("And a brook?", reference="A small stream.",
                      messages=msgs(("system", "Answer in one sentence."),
                                    ("user", 'Define "river".'),
                                    ("assistant", "A large natural stream of water."),
                                    ("user", "And a brook?"))),
    ],
    # Preference rows give their prompt, explicit or implicit, without a reference.
    "preference_explicit.jsonl": [PromptExample("The sky is"), PromptExample(CAT)],
    "preference_implicit.jsonl": [PromptExample("The sky is"),
                                  PromptExample("Human: Define cat.\n\nAssistant:")],
    "preference_conversational_implicit.jsonl": [
        PromptExample("What color is the sky?", messages=msgs(("user", "What color is the sky?"))),
        PromptExample("And a brook?", messages=BROOK_PROMPT),
    ],
    # An unpaired preference completion is a reference only where it is labelled true.
    "unpaired_preference.jsonl": [PromptExample("The sky is", reference=" blue."),
                                  PromptExample("The sky is")],
    "stepwise_supervision.jsonl": [PromptExample("Which number is larger, 9.8 or 9.11?")],
}

RANKED_FORMS = {
    "preference_explicit.jsonl": [
        RankedExample("The sky is", responses=(" blue.", " green."), ranks=(0, 1)),
        RankedExample(CAT, responses=(FELINE, "A cat is a cat."), ranks=(0, 1)),
    ],
    # The shared start, cut at a word boundary, is the prompt.
    "preference_implicit.jsonl": [
        RankedExample("The sky is", responses=("blue.", "green."), ranks=(0, 1)),
        RankedExample("Human: Define cat.\n\nAssistant:",
                      responses=("A small feline.", "It is a cat."), ranks=(0, 1)),
    ],
    "preference_conversational_explicit.jsonl": [
        RankedExample("What color is the sky?", responses=("It is blue.", "It is green."),
                      ranks=(0, 1), messages=msgs(("user", "What color is the sky?"))),
        RankedExample("And a brook?", responses=("A small stream.", "A river."), ranks=(0, 1),
                      messages=(*msgs(("system", "Answer in one sentence.")), *BROOK_PROMPT)),
    ],
    "preference_conversational_implicit.jsonl": [
        RankedExample("What color is the sky?", responses=("It is blue.", "It is green."),
                      ranks=(0, 1), messages=msgs(("user", "What color is the sky?"))),
        RankedExample("And a brook?", responses=("A small stream.", "A river."), ranks=(0, 1),
                      messages=BROOK_PROMPT),
    ],
    "ranked.jsonl": [
        RankedExample(CAT, responses=("A feline.", "A cat.", "A pet feline."), ranks=(0, 2, 1),
                      reference=FELINE, gold_scores=(0.9, 0.1, 0.5)),
        RankedExample("And a brook?", responses=("A small stream.", "A river."), ranks=(0, 1),
                      messages=BROOK_PROMPT),
    ],
}


@pytest.mark.parametrize("name", SFT_FORMS)
def test_sft_form(name: str) -> None:
    assert load_demonstrations(FORMS / name) == SFT_FORMS[name]


@pytest.mark.parametrize("name", PROMPT_FORMS)
def test_prompt_form(name: str) -> None:
    loaded = load_prompts(FORMS / name)
    assert loaded == PROMPT_FORMS[name]
    # A plain prompt is formatted as one user turn, a conversation as its messages.
    for example in loaded:
        assert example.chat == (list(example.messages) if example.messages else example.prompt)


@pytest.mark.parametrize("name", RANKED_FORMS)
def test_ranked_form(name: str) -> None:
    assert load_ranked(FORMS / name) == RANKED_FORMS[name]


def test_every_fixture_file_is_used() -> None:
    refused = {"sharegpt.jsonl"}
    used = set(SFT_FORMS) | set(PROMPT_FORMS) | set(RANKED_FORMS) | refused
    assert {p.name for p in FORMS.glob("*.jsonl")} == used


# ---------------------------------------------------------------------------------------------
# Recognised forms that a loader cannot use: one line saying how to convert them
# ---------------------------------------------------------------------------------------------

REFUSED = [
    (load_demonstrations, "unpaired_preference.jsonl",
     'an unpaired preference row (a "completion" with a true/false "label") would train on '
     'rejected completions too; keep the rows labelled true and drop "label"'),
    (load_demonstrations, "preference_explicit.jsonl",
     'a preference row: SFT learns one response per prompt; rename "chosen" to "completion" '
     "(data.columns={chosen: completion}) to train on the preferred ones"),
    (load_demonstrations, "preference_implicit.jsonl",
     'a preference row: SFT learns one response per prompt; rename "chosen" to "text" '
     "(data.columns={chosen: text}) to train on the preferred ones"),
    (load_demonstrations, "preference_conversational_implicit.jsonl",
     'a preference row: SFT learns one response per prompt; rename "chosen" to "messages" '
     "(data.columns={chosen: messages}) to train on the preferred ones"),
    (load_demonstrations, "prompt_only.jsonl",
     'a prompt-only row has no target: SFT needs "completion", "messages" or "text"'),
    (load_demonstrations, "stepwise_supervision.jsonl",
     'a stepwise-supervision row: SFT needs one target; join the steps labelled true into a '
     '"completion"'),
    (load_ranked, "unpaired_preference.jsonl",
     'an unpaired preference row (a "completion" with a true/false "label"): the reward model '
     'learns from pairs; pair a true and a false completion of one prompt as {"prompt", '
     '"chosen", "rejected"}'),
    (load_ranked, "stepwise_supervision.jsonl",
     'a stepwise-supervision row (per-step "labels"): the reward model ranks whole responses; '
     'join each row\'s steps into a response and rank them as {"prompt", "responses", "ranks"}'),
    (load_ranked, "prompt_only.jsonl",
     'a prompt-only row has no ranked responses; the reward model needs "chosen"+"rejected" or '
     '"responses"+"ranks" (the label stage samples and ranks responses for prompts: '
     "data.label)"),
    (load_ranked, "sft_prompt_completion.jsonl",
     'a prompt-completion row has no ranked responses; the reward model needs "chosen"+'
     '"rejected" or "responses"+"ranks" (the label stage samples and ranks responses for '
     "prompts: data.label)"),
    (load_ranked, "sft_messages.jsonl",
     'a conversational language-modeling row has no ranked responses; the reward model needs '
     '"chosen"+"rejected" or "responses"+"ranks" (the label stage samples and ranks responses '
     "for prompts: data.label)"),
    (load_ranked, "sft_text.jsonl",
     'a language-modeling row has no ranked responses; the reward model needs "chosen"+'
     '"rejected" or "responses"+"ranks" (the label stage samples and ranks responses for '
     "prompts: data.label)"),
    (load_prompts, "sft_text.jsonl",
     'a language-modeling "text" row has no prompt; rename the column '
     "(data.columns={text: prompt}) to use the text as the prompt"),
]
SHAREGPT = ('a ShareGPT "conversations" row: rename the column to "messages" '
            '(data.columns={conversations: messages}) with "role"/"content" messages '
            "(system/user/assistant)")


@pytest.mark.parametrize(("loader", "name", "expected"), REFUSED,
                         ids=[f"{f.__name__}-{n}" for f, n, _ in REFUSED])
def test_recognised_form_refused_with_conversion(loader: Any, name: str, expected: str) -> None:
    assert error(loader, FORMS / name) == f"{FORMS / name}:1: {expected}"


@pytest.mark.parametrize("loader", [load_demonstrations, load_prompts, load_ranked])
def test_sharegpt_refused_with_conversion(loader: Any) -> None:
    assert error(loader, FORMS / "sharegpt.jsonl") == f"{FORMS / 'sharegpt.jsonl'}:1: {SHAREGPT}"


def test_renaming_makes_a_refused_form_usable() -> None:
    path = FORMS / "preference_explicit.jsonl"
    loaded = load_demonstrations(path, columns=column_map({"chosen": "completion"}, "sft"))
    assert loaded[0] == Demonstration(msgs(("user", "The sky is"), ("assistant", " blue.")),
                                      first_target=1)
    text = load_prompts(FORMS / "sft_text.jsonl", columns=column_map({"text": "prompt"}, "ppo"))
    assert text[0] == PromptExample("A cat is a small domesticated feline.")


# ---------------------------------------------------------------------------------------------
# Sources: the file types, compressions and folders `datasets` reads
# ---------------------------------------------------------------------------------------------

STANDARD = [json.loads(line) for line in (FORMS / "preference_explicit.jsonl").open()]
CONVERSATIONAL = [json.loads(line)
                  for line in (FORMS / "preference_conversational_implicit.jsonl").open()]


def write_as(path: Path, rows: list[dict]) -> Path:
    """``rows`` in the file type (or folder) ``path``'s name asks for."""
    import datasets

    name = path.name
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if name.endswith(".jsonl.gz"):
        path.write_bytes(gzip.compress(text))
    elif name.endswith(".jsonl.bz2"):
        path.write_bytes(bz2.compress(text))
    elif name.endswith(".jsonl.xz"):
        path.write_bytes(lzma.compress(text))
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows, indent=2))
    elif name.endswith(".csv.gz"):
        datasets.Dataset.from_list(rows).to_csv(str(path.with_suffix("")), index=False)
        path.write_bytes(gzip.compress(path.with_suffix("").read_bytes()))
    elif name.endswith(".csv"):
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    elif name.endswith(".tsv"):
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False, sep="\t")
    elif name.endswith(".parquet"):
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif name.endswith(".arrow"):
        import pyarrow as pa

        table = pa.Table.from_pylist(rows)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as out:
            out.write_table(table)
    elif name == "saved":
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    elif name == "saved_dict":
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                              "test": datasets.Dataset.from_list(rows[:1])}
                             ).save_to_disk(str(path))
    else:
        raise AssertionError(name)
    return path


FILE_TYPES = ["x.json", "x.jsonl.gz", "x.jsonl.bz2", "x.jsonl.xz", "x.parquet", "x.arrow",
              "saved", "saved_dict"]
FLAT_ONLY = ["x.csv", "x.tsv", "x.csv.gz"]


@pytest.mark.parametrize("name", FILE_TYPES + FLAT_ONLY)
def test_file_types_give_the_jsonl_rows(tmp_path: Path, name: str) -> None:
    forms = [("preference_explicit.jsonl", STANDARD)]
    if name not in FLAT_ONLY:
        forms.append(("preference_conversational_implicit.jsonl", CONVERSATIONAL))
    for fixture, rows in forms:
        folder = tmp_path / Path(fixture).stem
        folder.mkdir()
        path = write_as(folder / name, rows)
        assert load_ranked(path) == RANKED_FORMS[fixture], (name, fixture)


@pytest.mark.parametrize(("name", "where"), [
    ("x.jsonl.gz", ":3"), ("x.json", "[1]"), ("x.parquet", "[1]"), ("x.csv", "[1]"),
    ("saved", "[1]"), ("saved_dict", "[1]")])
def test_bad_row_location_per_file_type(tmp_path: Path, name: str, where: str) -> None:
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "q", "chosen": "same", "rejected": "same"}]
    path = write_as(tmp_path / name, rows)
    if name == "x.jsonl.gz":
        # Blank lines count in line numbers, not in row indices.
        path.write_bytes(gzip.compress(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n\n'
                                       b'{"prompt": "q", "chosen": "same", "rejected": "same"}\n'))
    assert error(load_ranked, path) == (
        f'{path}{where}: "chosen" and "rejected" are identical: no preference to learn from')


def test_jsonl_blank_lines_keep_line_numbers(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "x.jsonl", [{"a": 1}, "", "   ", {"b": 2}])
    assert read_rows(path) == [{"a": 1}, {"b": 2}]
    bad = write_rows(tmp_path / "y.jsonl", [GOOD_PAIR, "", "   ", {"prompt": "p"}])
    assert error(load_demonstrations, bad) == (
        f'{bad}:4: a prompt-only row has no target: SFT needs "completion", "messages" or "text"')


def test_byte_order_mark_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD_PAIR).encode() + b"\n")
    assert load_prompts(path) == [PromptExample("p", reference="c")]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    assert error(load_demonstrations, path) == f"{path}: no such file"
    assert error(load_ranked, tmp_path / "nope.parquet") == f"{tmp_path / 'nope.parquet'}: no such file"


def test_invalid_json_line(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "x.jsonl", [GOOD_PAIR, '{"a": '])
    assert error(load_demonstrations, path) == (
        f"{path}:2: invalid JSON (Expecting value at column 7)")


def test_non_object_line(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "x.jsonl", [GOOD_PAIR, GOOD_PAIR, [1, 2]])
    assert error(load_demonstrations, path) == f"{path}:3: expected a JSON object, got list"


def test_non_utf8_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", '
                     b'"completion": "b"}\n')
    assert error(load_demonstrations, path) == (
        f"{path}:2: not UTF-8 text (byte 0xe9 at column 16); JSONL files must be UTF-8")


def test_invalid_json_array(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('[\n  {"prompt": "a"},\n  {"prompt": \n]\n')
    assert error(load_prompts, path) == f"{path}:4: invalid JSON (Expecting value at column 1)"


def test_compressed_file_under_a_plain_name(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(gzip.compress(json.dumps(GOOD_PAIR).encode()))
    assert error(load_demonstrations, path) == (
        f"{path}: a gzip-compressed file without the .gz suffix (name it x.jsonl.gz to read it "
        "compressed)")
    path.write_bytes(b"PK\x03\x04rest of a zip")
    assert error(load_demonstrations, path) == f"{path}: a zip-compressed file; decompress it first"


def test_file_the_datasets_library_cannot_read(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    path.write_bytes(b"not a parquet file")
    message = error(load_ranked, path)
    assert message.startswith(f"{path}: the datasets library cannot read it ("), message
    assert "Parquet magic bytes not found" in message


def test_empty_sources(tmp_path: Path) -> None:
    for name, text in (("x.jsonl", "\n"), ("y.jsonl", ""), ("z.json", "[]")):
        path = tmp_path / name
        path.write_text(text)
        assert error(load_prompts, path) == f"{path}: no rows"
    assert load_prompts(tmp_path / "x.jsonl", limit=0) == []


def test_limit_reads_only_the_first_rows(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    path = write_rows(tmp_path / "x.jsonl", [*rows, {"prompt": "no completion"}])
    loaded = load_demonstrations(path, limit=2)
    assert [d.messages[0]["content"] for d in loaded] == ["p0", "p1"]
    assert load_demonstrations(path, limit=0) == []
    assert len(load_prompts(path, limit=6)) == 6
    with pytest.raises(ValueError, match="limit must be >= 0"):
        load_prompts(path, limit=-1)


def test_mixed_types_in_a_column(tmp_path: Path) -> None:
    # Arrow widens [1, 0, 1] to floats next to [0, 1.5]: integral floats still rank.
    path = write_rows(tmp_path / "x.jsonl", [GOOD_RANKED, {**GOOD_RANKED, "ranks": [0, 1.5, 2]}])
    assert error(load_ranked, path) == f'{path}:2: "ranks"[1] must be an integer, got float 1.5'
    path = write_rows(tmp_path / "y.jsonl", [{"prompt": "a", "id": "x-1"}, {"prompt": "b"},
                                              {"prompt": "c", "id": 7}])
    assert [p.id for p in load_prompts(path)] == ["x-1", None, "7"]


def test_folder_that_is_not_a_dataset(tmp_path: Path) -> None:
    message = error(load_demonstrations, tmp_path)
    assert message.startswith(f"{tmp_path}: expected a data file or a folder written by "
                              "save_to_disk ("), message


def test_dataset_dict_without_train_split(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "dd"
    datasets.DatasetDict({"test": datasets.Dataset.from_list([GOOD_PAIR])}).save_to_disk(
        str(folder))
    assert error(load_demonstrations, folder) == f'{folder}: expected a "train" split, found test'


def test_hub_id_loads_requested_split(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls: list[tuple[str, str]] = []

    def fake_load_dataset(name: str, split: str) -> Any:
        calls.append((name, split))
        return datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}, {"prompt": "q"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert len(load_demonstrations("someone/defs:validation", limit=1)) == 1
    assert error(load_demonstrations, "someone/defs") == (
        'someone/defs[1]: a prompt-only row has no target: SFT needs "completion", "messages" '
        'or "text"')
    assert calls == [("someone/defs", "validation"), ("someone/defs", "train")]


def test_hub_failure_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def failing_load_dataset(name: str, split: str) -> Any:
        raise ConnectionError("offline\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    assert error(load_demonstrations, "someone/defs") == (
        "someone/defs: cannot load from the Hugging Face Hub (offline)")


def test_source_that_is_neither_path_nor_hub_id(tmp_path: Path) -> None:
    source = str(tmp_path / "a" / "b")
    assert error(load_demonstrations, source) == (
        f"{source}: no such file, folder or Hub dataset id (owner/name[:split])")


def test_datasets_library_logs_nothing_on_a_bad_file(tmp_path: Path,
                                                     capfd: pytest.CaptureFixture) -> None:
    path = write_rows(tmp_path / "x.jsonl", [GOOD_PAIR, '{"a": '])
    error(load_demonstrations, path)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def test_reading_leaves_nothing_in_the_datasets_cache(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    path = write_rows(tmp_path / "x.jsonl", [GOOD_PAIR, GOOD_PAIR])
    assert len(load_prompts(path)) == 2 and len(load_prompts(path, limit=1)) == 1
    assert len(load_ranked(write_as(tmp_path / "x.parquet", STANDARD))) == 2
    assert list(cache.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Column renames (data.columns)
# ---------------------------------------------------------------------------------------------

QA = [{"question": "Define cat.", "answer": "A feline."}]


def test_column_map_merges_flat_and_split_entries() -> None:
    columns = {"question": "prompt", "ppo": {"question": "query", "gold": "reference"}}
    assert column_map(columns, "sft") == ColumnMap({"question": "prompt"},
                                                   {"question": "data.columns"}, frozenset())
    ppo = column_map(columns, "ppo")
    assert ppo.renames == {"question": "query", "gold": "reference"}
    assert ppo.keys == {"question": "data.columns.ppo", "gold": "data.columns.ppo"}
    assert ppo.required == {"question", "gold"}


def test_split_entry_displaces_a_flat_one_with_its_target() -> None:
    ppo = column_map({"question": "prompt", "id": "row_id", "ppo": {"query": "prompt"}}, "ppo")
    assert ppo.renames == {"id": "row_id", "query": "prompt"}


def test_flat_renames_to_one_name_for_files_that_differ(tmp_path: Path) -> None:
    columns = column_map({"q": "prompt", "question": "prompt"}, "ppo")
    first = write_rows(tmp_path / "a.jsonl", [{"q": "a"}])
    second = write_rows(tmp_path / "b.jsonl", [{"question": "b"}])
    assert load_prompts(first, columns=columns) + load_prompts(second, columns=columns) == [
        PromptExample("a"), PromptExample("b")]
    both = write_rows(tmp_path / "c.jsonl", [{"q": "a", "question": "b"}])
    assert error(load_prompts, both, columns=columns) == (
        f"{both}: data.columns renames both 'q' and 'question' to 'prompt', and the data has "
        "both columns")


def test_flat_rename_applies_where_the_column_exists(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "qa.jsonl", QA)
    columns = column_map({"question": "prompt", "answer": "completion", "extra": "word"}, "sft")
    assert load_demonstrations(path, columns=columns) == [
        Demonstration(msgs(("user", "Define cat."), ("assistant", "A feline.")), first_target=1)]
    assert load_prompts(path, columns=column_map({"question": "prompt"}, "eval")) == [
        PromptExample("Define cat.")]


def test_unmapped_columns_are_named(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "qa.jsonl", QA)
    assert error(load_demonstrations, path) == (
        f'{path}:1: expected "messages", "prompt"+"completion" or "text" '
        "(the row has: question, answer)")
    assert error(load_prompts, path) == (
        f'{path}:1: expected "prompt" (a string or a list of messages) '
        "(the row has: question, answer)")


def test_split_rename_requires_its_column(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "qa.jsonl", QA)
    assert error(load_prompts, path, columns=column_map({"ppo": {"query": "prompt"}}, "ppo")) == (
        f"{path}: data.columns.ppo renames 'query', a column the data does not have "
        "(columns: answer, question)")
    # Written the other way round (torchtune's column_map direction): the hint says which.
    assert error(load_prompts, path,
                 columns=column_map({"ppo": {"prompt": "question"}}, "ppo")) == (
        f"{path}: data.columns.ppo renames 'prompt', a column the data does not have "
        "(columns: answer, question) (keys are your column names, values the names the "
        "pipeline reads)")


def test_rename_onto_an_existing_column_is_refused(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "qa.jsonl", [{"question": "q", "prompt": "p"}])
    assert error(load_prompts, path, columns=column_map({"question": "prompt"}, "ppo")) == (
        f"{path}: data.columns renames 'question' to 'prompt', but the data already has a "
        "'prompt' column")
    # Swapping two columns is a rename of both.
    swapped = load_prompts(path, columns=column_map({"question": "prompt", "prompt": "question"},
                                                    "ppo"))
    assert swapped == [PromptExample("q")]


def test_renames_apply_to_every_file_type(tmp_path: Path) -> None:
    rows = [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in STANDARD]
    columns = column_map({"ranked": {"q": "prompt", "good": "chosen", "bad": "rejected"}},
                         "ranked")
    for name in ("x.parquet", "saved"):
        path = write_as(tmp_path / name, rows)
        assert load_ranked(path, columns=columns) == RANKED_FORMS["preference_explicit.jsonl"]


# ---------------------------------------------------------------------------------------------
# Malformed rows
# ---------------------------------------------------------------------------------------------

USER_ASSISTANT = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]


@pytest.mark.parametrize(("row", "expected"), [
    ({"prompt": "p", "completion": "  "},
     'expected "completion" to be a non-empty string, got a blank string'),
    ({"prompt": 3, "completion": "c"},
     'expected "prompt" to be a non-empty string or a list of messages, got int 3'),
    ({"completion": "c"},
     'expected "prompt" to be a non-empty string or a list of messages, got missing '
     "(the row has: completion)"),
    ({"text": ""}, 'expected "text" to be a non-empty string, got a blank string'),
    ({"messages": []}, 'expected "messages" to be a non-empty list of messages, got an empty list'),
    ({"messages": "hi"}, "expected \"messages\" to be a non-empty list of messages, got str 'hi'"),
    ({"messages": ["hi"]},
     "\"messages\"[0] must be an object with \"role\" and \"content\", got str 'hi'"),
    ({"messages": [*USER_ASSISTANT, {"role": "bot", "content": "c"}]},
     "\"messages\"[2].role must be one of system/user/assistant, got 'bot'"),
    ({"messages": [{"content": "a"}]},
     '"messages"[0].role must be one of system/user/assistant, got nothing'),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
     '"messages"[1].content must be a non-empty string, got a blank string'),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]},
     '"messages"[1].content must be a non-empty string, got missing'),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
     "\"messages\" must end with a turn from the assistant (the loss is on assistant turns), "
     "got 'user'"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "completion": [{"role": "assistant", "content": "c"}]},
     "\"prompt\" must end with a turn from the user (the model answers it next), got 'assistant'"),
    ({"prompt": [{"role": "user", "content": "a"}],
      "completion": [{"role": "user", "content": "c"}]},
     "\"completion\" must end with a turn from the assistant (the loss is on assistant turns), "
     "got 'user'"),
])
def test_sft_rejects_malformed_rows(tmp_path: Path, row: dict[str, Any], expected: str) -> None:
    path = write_rows(tmp_path / "x.jsonl", [GOOD_PAIR, GOOD_PAIR, "", row])
    assert error(load_demonstrations, path) == f"{path}:4: {expected}"


@pytest.mark.parametrize(("row", "expected"), [
    ({"reference": "r"},
     'expected "prompt" (a string or a list of messages) (the row has: reference)'),
    ({"prompt": ""},
     'expected "prompt" to be a non-empty string or a list of messages, got a blank string'),
    ({"prompt": "p", "reference": 5},
     'expected "reference" to be a non-empty string or absent, got int 5'),
    ({"prompt": "p", "word": ""}, 'expected "word" to be a non-empty string or absent, '
     "got a blank string"),
    ({"prompt": "p", "id": True}, 'expected "id" to be a string or an integer, got bool True'),
    ({"prompt": [{"role": "system", "content": "s"}]},
     "\"prompt\" must end with a turn from the user (the model answers it next), got 'system'"),
    ({"prompt": "p", "completion": [{"role": "assistant", "content": "a"},
                                    {"role": "assistant", "content": "b"}]},
     'expected "completion" to be one assistant message, got 2 messages'),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
     'expected "messages" to end with a user turn, or with a user turn and the assistant\'s '
     "answer (the reference)"),
])
def test_prompts_reject_malformed_rows(tmp_path: Path, row: dict[str, Any], expected: str) -> None:
    path = write_rows(tmp_path / "x.jsonl", [{"prompt": "ok"}, row])
    assert error(load_prompts, path) == f"{path}:2: {expected}"


def test_prompts_required_reference(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "x.jsonl", [{"prompt": "a", "reference": "r"}, {"prompt": "b"}])
    assert error(load_prompts, path, require_reference="the gold judge scores against it") == (
        f'{path}:2: no "reference" (or "completion"): the gold judge scores against it')
    assert len(load_prompts(path, limit=1, require_reference="needed")) == 1


def conv_pair(chosen: str, rejected: str, *prompt: tuple[str, str]) -> dict[str, Any]:
    return {"chosen": [*msgs(*prompt), *msgs(("assistant", chosen))],
            "rejected": [*msgs(*prompt), *msgs(("assistant", rejected))]}


@pytest.mark.parametrize(("row", "expected"), [
    ({"prompt": "p", "reference": "x"},
     'a prompt-only row has no ranked responses; the reward model needs "chosen"+"rejected" or '
     '"responses"+"ranks" (the label stage samples and ranks responses for prompts: data.label)'),
    ({"text": "x", "score": 3},
     'a language-modeling row has no ranked responses; the reward model needs "chosen"+'
     '"rejected" or "responses"+"ranks" (the label stage samples and ranks responses for '
     "prompts: data.label)"),
    ({"score": 3}, 'expected either "responses"+"ranks" or "chosen"+"rejected" '
     "(the row has: score)"),
    ({"prompt": "p", "responses": ["a"], "ranks": [0]},
     'expected "responses" to be a list of at least 2 strings, got 1'),
    ({"prompt": "p", "responses": "ab", "ranks": [0, 1]},
     "expected \"responses\" to be a list of at least 2 strings, got str 'ab'"),
    ({"prompt": "p", "responses": ["a", ""], "ranks": [0, 1]},
     '"responses"[1] must be a non-empty string, got a blank string'),
    ({"prompt": "p", "responses": ["a", 3], "ranks": [0, 1]},
     '"responses"[1] must be a non-empty string, got int 3'),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [0]},
     'expected "ranks" to be a list of 2 integers (one per response), got 1'),
    ({"prompt": "p", "responses": ["a", "b"]},
     'expected "ranks" to be a list of 2 integers (one per response), got missing'),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [True, 0]},
     '"ranks"[0] must be an integer, got bool True'),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [1, 1]},
     'all "ranks" are equal: no preference to learn from'),
    ({"prompt": "p", "responses": ["a", "a"], "ranks": [0, 1]},
     'all "responses" are identical: no preference to learn from'),
    ({"responses": ["a", "b"], "ranks": [0, 1]},
     'expected "prompt" to be a non-empty string or a list of messages, got missing '
     "(the row has: responses, ranks)"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1], "gold_scores": [1.0]},
     'expected "gold_scores" to be a list of 2 numbers (one per response)'),
    ({"prompt": "p", "chosen": "a"},
     'expected "rejected" to be a non-empty string or one assistant message, got missing'),
    ({"chosen": "a"},
     'expected "rejected" to be a non-empty string or one assistant message, got missing'),
    ({"prompt": "p", "chosen": "", "rejected": "b"},
     'expected "chosen" to be a non-empty string or one assistant message, got a blank string'),
    ({"prompt": "p", "chosen": "a", "rejected": "a"},
     '"chosen" and "rejected" are identical: no preference to learn from'),
    ({"chosen": "Blue.", "rejected": "Black."},
     '"chosen" and "rejected" share no prompt (their text differs from the first word); give '
     '"prompt" explicitly'),
    ({"chosen": "The sky is ", "rejected": "The sky is blue."},
     '"chosen" has no response after the prompt it shares with the other'),
    ({"chosen": "The sky is blue.", "rejected": [{"role": "assistant", "content": "x"}]},
     'expected "chosen" and "rejected" of one kind: both strings or both message lists'),
    ({**conv_pair("a", "a", ("user", "q"))},
     '"chosen" and "rejected" are identical: no preference to learn from'),
    ({"chosen": [*msgs(("user", "q"), ("assistant", "a"))],
      "rejected": [*msgs(("user", "r"), ("assistant", "a"))]},
     '"chosen" and "rejected" share no prompt (their first messages differ); give "prompt" '
     "explicitly"),
    ({"chosen": [*msgs(("user", "q"), ("assistant", "a"), ("user", "more"), ("assistant", "b"))],
      "rejected": [*msgs(("user", "q"), ("assistant", "c"))]},
     'expected "chosen" to continue the shared prompt with one assistant message, got 3'),
    ({"prompt": "q", **conv_pair("a", "b", ("user", "q"))},
     'expected "chosen" to be one assistant message, got 2 messages; if "chosen" and '
     '"rejected" hold whole conversations, rename "prompt" away (data.columns={prompt: '
     'prompt_text}) so their shared start is the prompt'),
])
def test_ranked_rejects_malformed_rows(tmp_path: Path, row: dict[str, Any], expected: str) -> None:
    path = write_rows(tmp_path / "x.jsonl", [GOOD_RANKED, row])
    assert error(load_ranked, path) == f"{path}:2: {expected}"


# ---------------------------------------------------------------------------------------------
# Committed WordNet data
# ---------------------------------------------------------------------------------------------


def test_committed_wordnet_splits() -> None:
    words: dict[str, set[str]] = {}
    for split, keys in SPLIT_KEYS.items():
        path = WORDNET_DIR / f"{split}.jsonl"
        rows = read_rows(path)
        # The datasets library reads the same rows, in the same order, as json does.
        assert rows == [json.loads(line) for line in path.open() if line.strip()], split
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
    assert len(load_demonstrations(WORDNET_DIR / "sft.jsonl")) == len(words["sft"])
    assert len(load_prompts(WORDNET_DIR / "eval.jsonl")) == len(words["eval"])
    assert (WORDNET_DIR / "LICENSE").read_text().count("Princeton University") >= 2
