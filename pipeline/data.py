"""Dataset forms of the pipeline: how a source is read and how each row is checked.

A source is a data file (JSON Lines, JSON, CSV, TSV, Parquet or Arrow; JSON Lines and the other
text formats may be ``.gz``, ``.bz2`` or ``.xz`` compressed), a folder written by
``save_to_disk`` (a ``DatasetDict`` gives its "train" split), or a Hugging Face Hub id
``owner/name`` with an optional ``:split``. The ``datasets`` library reads all of them, as
``load_dataset`` does for a TRL user, so a file loads here as it loads there.

Each loader then checks every row against the forms its stages accept: TRL's standard and
conversational forms (language modeling, prompt-only, prompt-completion, preference with an
explicit or implicit prompt) and the pipeline's ranked rows. The first malformed row raises a
``DataError`` whose single line names where it is (``file:line`` for JSON Lines, ``source[i]``,
the dataset index, otherwise) and what was expected there, before any training time is spent.
``data.columns`` renames a source's columns to the names below before the check.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import json
import logging
import lzma
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO, Any


class DataError(ValueError):
    """One-line message naming where the bad row is and what was expected."""


Message = dict[str, str]


@dataclass(frozen=True)
class PromptExample:
    # The prompt as text; for a conversation, its last user turn (what judges, rules and
    # samples see).
    prompt: str
    reference: str | None = None
    word: str | None = None
    id: str | None = None
    # A conversational prompt's messages, ending with a user turn; empty for a plain prompt.
    messages: tuple[Message, ...] = ()

    @property
    def chat(self) -> str | list[Message]:
        """What ``encode_prompt`` formats: the conversation, or the prompt as one user turn."""
        return list(self.messages) if self.messages else self.prompt


@dataclass(frozen=True)
class RankedExample:
    # As in PromptExample: the text, and the messages of a conversational prompt.
    prompt: str
    # K >= 2 candidate responses to the same prompt.
    responses: tuple[str, ...]
    # One rank per response: lower is better, equal ranks are ties.
    ranks: tuple[int, ...]
    reference: str | None = None
    messages: tuple[Message, ...] = ()
    # The gold judge's score per response, where the label stage recorded it.
    gold_scores: tuple[float, ...] | None = None

    @property
    def chat(self) -> str | list[Message]:
        return list(self.messages) if self.messages else self.prompt


@dataclass(frozen=True)
class Demonstration:
    """One SFT row: a conversation trained on its assistant turns, or plain text trained whole."""

    messages: tuple[Message, ...] = ()
    # Assistant turns before this index are context: a conversational prompt's own turns.
    first_target: int = 0
    # A language-modeling row: no chat template, every token a target.
    text: str | None = None


ROLES = ("system", "user", "assistant")
# The data.* keys a per-split column mapping may name; "ranked" is data.ranked, rm.data and
# dpo.data.
SPLITS = ("sft", "label", "ppo", "eval", "ranked")

_MISSING = object()


# ---------------------------------------------------------------------------------------------
# Column mapping (data.columns)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnMap:
    """Renames of one split's source columns: your column -> the name the pipeline reads."""

    renames: Mapping[str, str] = field(default_factory=dict)
    # The config key that asked for each rename, for messages.
    keys: Mapping[str, str] = field(default_factory=dict)
    # Columns named for this split alone: a source without one is an error, not a no-op.
    required: frozenset[str] = frozenset()


def column_map(columns: Mapping[str, Any], split: str) -> ColumnMap:
    """The renames ``data.columns`` asks of ``split``: its own entries, and the flat ones
    whose column or target they do not rename."""
    own = columns.get(split)
    own = dict(own) if isinstance(own, Mapping) else {}
    renames: dict[str, str] = {}
    keys: dict[str, str] = {}
    for source, target in columns.items():
        if isinstance(target, str) and target not in own.values():
            renames[source], keys[source] = target, "data.columns"
    for source, target in own.items():
        renames[source], keys[source] = target, f"data.columns.{split}"
    required = frozenset(s for s, k in keys.items() if k != "data.columns")
    return ColumnMap(renames, keys, required)


def column_problems(columns: Any) -> list[str]:
    """What is wrong with a ``data.columns`` value; [] when it is usable."""
    if not isinstance(columns, Mapping):
        return [f"data.columns={columns!r}: expected a mapping of column renames"]
    problems = []
    for source, target in columns.items():
        if isinstance(target, Mapping):
            if source not in SPLITS:
                problems.append(f"data.columns.{source}: a nested mapping must be under a split "
                                f"name ({', '.join(SPLITS)}); a flat rename maps a column to "
                                "a string")
                continue
            for inner, name in target.items():
                if not _column_name(inner) or not _column_name(name):
                    problems.append(f"data.columns.{source}.{inner}={name!r}: expected a "
                                    "column name (a non-empty string)")
        elif not _column_name(source) or not _column_name(target):
            problems.append(f"data.columns.{source}={target!r}: expected a column name "
                            "(a non-empty string) or, under a split name, a mapping")
    for split in SPLITS:
        own = columns.get(split)
        if not isinstance(own, Mapping):
            continue
        seen: dict[Any, Any] = {}
        for source, target in own.items():
            if not isinstance(target, str):
                continue
            if target in seen:
                problems.append(f"data.columns.{split}: {seen[target]!r} and {source!r} both "
                                f"rename to {target!r}")
            seen[target] = source
    return problems


def _column_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _active_renames(cmap: ColumnMap, columns: Iterable[str], label: str) -> dict[str, str]:
    """The renames that apply to a source with ``columns``; refuses a clash or a missing one."""
    present = set(columns)
    active = {}
    for source, target in cmap.renames.items():
        key = cmap.keys[source]
        if source not in present:
            if source in cmap.required:
                hint = (" (keys are your column names, values the names the pipeline reads)"
                        if target in present else "")
                raise DataError(f"{label}: {key} renames {source!r}, a column the data does not "
                                f"have (columns: {', '.join(sorted(present))}){hint}")
            continue
        if target in present and target not in cmap.renames:
            raise DataError(f"{label}: {key} renames {source!r} to {target!r}, but the data "
                            f"already has a {target!r} column")
        other = next((s for s, t in active.items() if t == target), None)
        if other is not None:
            raise DataError(f"{label}: {key} renames both {other!r} and {source!r} to "
                            f"{target!r}, and the data has both columns")
        active[source] = target
    return active


# ---------------------------------------------------------------------------------------------
# Reading rows
# ---------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# The `datasets` builder and its options per file suffix. Other names are read as JSON Lines.
_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".jsonl": ("json", {}), ".json": ("json", {}), ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}), ".parquet": ("parquet", {}), ".arrow": ("arrow", {}),
}
_OPENERS: dict[str, Callable[..., IO[bytes]]] = {".gz": gzip.open, ".bz2": bz2.open,
                                                 ".xz": lzma.open}
# Leading bytes of compressed files, to explain one whose name does not say it is compressed.
_MAGIC = {b"\x1f\x8b": ("gzip", ".gz"), b"BZh": ("bzip2", ".bz2"), b"\xfd7zXZ": ("xz", ".xz"),
          b"PK\x03\x04": ("zip", None), b"\x28\xb5\x2f\xfd": ("zstd", None)}
_HUB_ID_RE = re.compile(r"[\w.-]+/[\w.-]+(?::[\w.-]+)?")


class _ReadFailure(Exception):
    """The `datasets` library could not produce a row; ``cause`` says why."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


@dataclass
class _Source:
    label: str
    # The rows in order; reading errors surface while iterating.
    rows: Callable[[], Iterator[dict[str, Any]]]
    # A JSON file read through `datasets`, which the diagnostic pass can re-read line by line.
    json_path: Path | None = None
    # True when the JSON file holds one object per line, so an index maps to a line number.
    json_lines: bool = False

    def where(self, index: int) -> str:
        if self.json_path is not None and self.json_lines:
            line = _line_of_row(self.json_path, index)
            if line is not None:
                return f"{self.label}:{line}"
        return f"{self.label}[{index}]"


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    # A failed read logs its own error before raising; the DataError made of it says the same.
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _open_binary(path: Path) -> IO[bytes]:
    opener = _OPENERS.get(path.suffix)
    return opener(path, "rb") if opener else path.open("rb")


def _is_blank(raw: bytes) -> bool:
    return not raw.strip(b" \t\r\n")


def _line_of_row(path: Path, index: int) -> int | None:
    """The line number of row ``index`` of a JSON Lines file, whose rows are its non-blank lines."""
    seen = -1
    with _open_binary(path) as handle:
        for number, raw in enumerate(handle, start=1):
            if not _is_blank(raw):
                seen += 1
                if seen == index:
                    return number
    return None


def _starts_with_array(path: Path) -> bool:
    with _open_binary(path) as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _refuse_unnamed_compression(path: Path) -> None:
    with path.open("rb") as handle:
        head = handle.read(8)
    for magic, (kind, suffix) in _MAGIC.items():
        if head.startswith(magic) and path.suffix != suffix:
            if suffix is None:
                raise DataError(f"{path}: a {kind}-compressed file; decompress it first")
            raise DataError(f"{path}: a {kind}-compressed file without the {suffix} suffix "
                            f"(name it {path.name}{suffix} to read it compressed)")


def _file_format(path: Path) -> tuple[str, dict[str, Any]] | None:
    """The builder for ``path`` by its suffixes (``x.jsonl.gz`` is JSON), None if unknown."""
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in _OPENERS:
        suffixes = suffixes[:-1]
    return _FORMATS.get(suffixes[-1]) if suffixes else None


def _open_file(path: Path, fmt: tuple[str, dict[str, Any]] | None) -> _Source:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    _refuse_unnamed_compression(path)
    builder, options = fmt or ("json", {})

    def rows() -> Iterator[dict[str, Any]]:
        import datasets

        # Streaming reads the file in order without writing an Arrow copy to the cache; the
        # builder's lock file goes to a folder of its own, removed when the rows are read.
        with tempfile.TemporaryDirectory(prefix="rlhf-data-") as cache:
            yield from datasets.load_dataset(builder, data_files=str(path), split="train",
                                             streaming=True, cache_dir=cache, **options)

    if builder != "json":
        return _Source(str(path), rows)
    return _Source(str(path), rows, json_path=path, json_lines=not _starts_with_array(path))


def _load_saved_dataset(path: Path) -> Any:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(
            f"{path}: expected a data file or a folder written by save_to_disk "
            f"({_first_line(exc)})"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            splits = ", ".join(loaded) or "none"
            raise DataError(f'{path}: expected a "train" split, found {splits}')
        return loaded["train"]
    return loaded


def _load_hub_dataset(source: str) -> Any:
    import datasets

    name, _, split = source.partition(":")
    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # the Hub raises many unrelated types; all mean "cannot load"
        raise DataError(
            f"{source}: cannot load from the Hugging Face Hub ({_first_line(exc)})"
        ) from None


def _open(source: str | Path) -> _Source:
    path = Path(source)
    if path.is_dir():
        dataset = _load_saved_dataset(path)
        return _Source(str(path), lambda: iter(dataset))
    fmt = _file_format(path)
    if path.exists() or fmt is not None:
        return _open_file(path, fmt)
    text = str(source)
    if _HUB_ID_RE.fullmatch(text):
        dataset = _load_hub_dataset(text)
        return _Source(text, lambda: iter(dataset))
    raise DataError(f"{source}: no such file, folder or Hub dataset id (owner/name[:split])")


def _guarded(rows: Iterator[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(index, row)``; any error of the reader becomes a ``_ReadFailure``."""
    index = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:  # pyarrow, pandas, fsspec and codecs all raise their own types
            raise _ReadFailure(exc) from exc
        yield index, row
        index += 1


def _json_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """A JSON file's rows parsed with ``json``, numbered by line (JSON Lines) or by index.

    Only for explaining a file the `datasets` library refused: it names the first line that
    is not UTF-8, not JSON or not an object, which pyarrow's messages do not.
    """
    with _open_binary(path) as handle:
        data = handle.read()
    if data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        try:
            rows = json.loads(data.decode("utf-8-sig"))
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                            f"{exc.start}); JSON files must be UTF-8") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column "
                            f"{exc.colno})") from None
        for index, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"{path}[{index}]: expected a JSON object, got "
                                f"{type(row).__name__}")
            yield index, row
        return
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            # A byte-order mark may open the file (some editors on Windows write one).
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} "
                            f"at column {exc.start + 1}); JSONL files must be UTF-8") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        yield number, row


def _parse_rows(rows: Iterator[tuple[int, dict[str, Any]]], where: Callable[[int], str],
                label: str, limit: int | None, parse: Callable[[dict[str, Any]], Any],
                columns: ColumnMap, check_columns: bool = True) -> list[Any]:
    examples = []
    renames: dict[str, str] | None = None
    for index, raw in islice(rows, limit):
        if renames is None:
            # A `datasets` row carries every column of the source (None where a row has none).
            renames = (_active_renames(columns, raw, label) if check_columns
                       else {s: t for s, t in columns.renames.items() if s in raw})
        # Absent and null mean the same: the union schema gives every row every column.
        row = {renames.get(k, k): v for k, v in raw.items() if v is not None}
        try:
            examples.append(parse(row))
        except ValueError as exc:
            raise DataError(f"{where(index)}: {exc}") from None
    if not examples and limit != 0:
        raise DataError(f"{label}: no rows")
    return examples


def _load(source: str | Path, limit: int | None, parse: Callable[[dict[str, Any]], Any],
          columns: ColumnMap | None) -> list[Any]:
    """Parse rows of ``source`` with ``parse(row) -> example`` (which raises ``ValueError``)."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    columns = columns or ColumnMap()
    src = _open(source)
    try:
        with _quiet_datasets():
            return _parse_rows(_guarded(src.rows()), src.where, src.label, limit, parse, columns)
    except _ReadFailure as failure:
        if src.json_path is not None:
            # Raises at the first line that explains the failure: bad bytes, bad JSON, or a
            # row that breaks the form (a column whose type changes may be what pyarrow hit).
            _parse_rows(_json_rows(src.json_path), lambda n: _json_where(src, n), src.label,
                        limit, parse, columns, check_columns=False)
        raise DataError(f"{src.label}: the datasets library cannot read it "
                        f"({_first_line(failure.cause)})") from None


def _json_where(src: _Source, number: int) -> str:
    return f"{src.label}:{number}" if src.json_lines else f"{src.label}[{number}]"


def read_rows(source: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The rows of ``source`` as the `datasets` library reads them, nulls dropped."""
    return _load(source, limit, dict, None)


# ---------------------------------------------------------------------------------------------
# Field checks: each raises ValueError with the part of the message after "where: "
# ---------------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    if value is _MISSING or value is None:
        return "missing"
    if isinstance(value, str) and not value.strip():
        return "a blank string"
    if isinstance(value, list) and not value:
        return "an empty list"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _has_columns(row: dict[str, Any]) -> str:
    return f" (the row has: {', '.join(row) or 'nothing'})"


def _required_text(row: dict[str, Any], key: str) -> str:
    value = row.get(key, _MISSING)
    if not isinstance(value, str) or not value.strip():
        hint = _has_columns(row) if value is _MISSING else ""
        raise ValueError(f'expected "{key}" to be a non-empty string, got {_describe(value)}'
                         f"{hint}")
    return value


def _optional_text(row: dict[str, Any], key: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f'expected "{key}" to be a non-empty string or absent, got {_describe(value)}'
        )
    return value


def _integer(value: Any) -> int | None:
    """``value`` as an int, or None. An integral float counts: Arrow widens a list of ints to
    floats when one row of the column has a float."""
    # bool is a subclass of int, but true/false as a rank is almost certainly a mistake.
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# Messages and the parts of a row
# ---------------------------------------------------------------------------------------------


def _messages(value: Any, key: str, last: str | None) -> list[Message]:
    """A non-empty list of ``{"role", "content"}``; ``last`` is the role it must end with."""
    if not isinstance(value, list) or not value:
        raise ValueError(f'expected "{key}" to be a non-empty list of messages, '
                         f"got {_describe(value)}")
    conversation = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise ValueError(
                f'"{key}"[{index}] must be an object with "role" and "content", '
                f"got {_describe(message)}"
            )
        role = message.get("role")
        if role not in ROLES:
            got = "nothing" if role is None else repr(role)
            raise ValueError(f'"{key}"[{index}].role must be one of {"/".join(ROLES)}, got {got}')
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(
                f'"{key}"[{index}].content must be a non-empty string, got {_describe(content)}'
            )
        conversation.append({"role": role, "content": content})
    if last is not None and conversation[-1]["role"] != last:
        why = ("the loss is on assistant turns" if last == "assistant"
               else "the model answers it next")
        raise ValueError(f'"{key}" must end with a turn from the {last} ({why}), '
                         f"got {conversation[-1]['role']!r}")
    return conversation


def _prompt(row: dict[str, Any]) -> tuple[str, tuple[Message, ...]]:
    """(text, messages) of the "prompt" column: a string, or messages ending with a user turn."""
    value = row.get("prompt", _MISSING)
    if isinstance(value, list):
        messages = _messages(value, "prompt", last="user")
        return messages[-1]["content"], tuple(messages)
    if not isinstance(value, str) or not value.strip():
        hint = _has_columns(row) if value is _MISSING else ""
        raise ValueError('expected "prompt" to be a non-empty string or a list of messages, '
                         f"got {_describe(value)}{hint}")
    return value, ()


def _response(value: Any, key: str, after_prompt: bool = False) -> str:
    """A response: a string, or a list of exactly one assistant message."""
    if isinstance(value, list):
        messages = _messages(value, key, last="assistant")
        if len(messages) != 1:
            hint = ('; if "chosen" and "rejected" hold whole conversations, rename "prompt" '
                    'away (data.columns={prompt: prompt_text}) so their shared start is the '
                    "prompt" if after_prompt else "")
            raise ValueError(f'expected "{key}" to be one assistant message, got '
                             f"{len(messages)} messages{hint}")
        return messages[0]["content"]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f'expected "{key}" to be a non-empty string or one assistant message, '
                         f"got {_describe(value)}")
    return value


def _split_implicit(chosen: Any, rejected: Any) -> tuple[str, tuple[Message, ...], str, str]:
    """(prompt text, prompt messages, chosen, rejected) of a pair whose prompt is implicit.

    The prompt is the start "chosen" and "rejected" share: whole messages for conversations;
    for strings, cut back to the last whitespace so neither response begins mid-word (the
    whitespace at the cut is dropped: the chat template separates prompt and response).
    """
    if isinstance(chosen, list) and isinstance(rejected, list):
        chosen_msgs = _messages(chosen, "chosen", last="assistant")
        rejected_msgs = _messages(rejected, "rejected", last="assistant")
        if chosen_msgs == rejected_msgs:
            raise ValueError('"chosen" and "rejected" are identical: no preference to learn from')
        shared = 0
        while (shared < min(len(chosen_msgs), len(rejected_msgs))
               and chosen_msgs[shared] == rejected_msgs[shared]):
            shared += 1
        if shared == 0:
            raise ValueError('"chosen" and "rejected" share no prompt (their first messages '
                             'differ); give "prompt" explicitly')
        prompt = chosen_msgs[:shared]
        if prompt[-1]["role"] != "user":
            raise ValueError('the prompt "chosen" and "rejected" share must end with a user '
                             f"message, got {prompt[-1]['role']!r}")
        responses = []
        for key, messages in (("chosen", chosen_msgs), ("rejected", rejected_msgs)):
            rest = messages[shared:]
            if len(rest) != 1:
                raise ValueError(f'expected "{key}" to continue the shared prompt with one '
                                 f"assistant message, got {len(rest)}")
            responses.append(rest[0]["content"])
        return prompt[-1]["content"], tuple(prompt), responses[0], responses[1]
    if isinstance(chosen, str) and isinstance(rejected, str):
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if not value.strip():
                raise ValueError(f'expected "{key}" to be a non-empty string, '
                                 f"got {_describe(value)}")
        if chosen == rejected:
            raise ValueError('"chosen" and "rejected" are identical: no preference to learn from')
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        # A whitespace inside the shared start is whitespace in both strings.
        cut = max((i for i, ch in enumerate(chosen[:shared]) if ch.isspace()), default=0)
        prompt = chosen[:cut].strip()
        if not prompt:
            raise ValueError('"chosen" and "rejected" share no prompt (their text differs from '
                             'the first word); give "prompt" explicitly')
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if not value[cut:].strip():
                raise ValueError(f'"{key}" has no response after the prompt it shares with the '
                                 "other")
        return prompt, (), chosen[cut:].strip(), rejected[cut:].strip()
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, (str, list)):
            raise ValueError(f'expected "{key}" to be a non-empty string or a list of messages, '
                             f"got {_describe(value)}")
    raise ValueError('expected "chosen" and "rejected" of one kind: both strings or both '
                     "message lists")


def _is_unpaired(row: dict[str, Any]) -> bool:
    """TRL's unpaired preference (KTO) row: one completion with a true/false label."""
    return "completion" in row and isinstance(row.get("label"), bool)


def _is_stepwise(row: dict[str, Any]) -> bool:
    return "completions" in row and "labels" in row


_SHAREGPT = ('a ShareGPT "conversations" row: rename the column to "messages" '
             '(data.columns={conversations: messages}) with "role"/"content" messages '
             f"({'/'.join(ROLES)})")


# ---------------------------------------------------------------------------------------------
# SFT demonstrations
# ---------------------------------------------------------------------------------------------


def _parse_demonstration(row: dict[str, Any]) -> Demonstration:
    if "messages" in row:
        return Demonstration(tuple(_messages(row["messages"], "messages", last="assistant")))
    if _is_unpaired(row):
        raise ValueError('an unpaired preference row (a "completion" with a true/false "label") '
                         'would train on rejected completions too; keep the rows labelled true '
                         'and drop "label"')
    if "completion" in row:
        completion = row["completion"]
        text, prompt = _prompt(row)
        context = list(prompt) or [{"role": "user", "content": text}]
        if isinstance(completion, list):
            answer = _messages(completion, "completion", last="assistant")
        else:
            answer = [{"role": "assistant", "content": _required_text(row, "completion")}]
        return Demonstration(tuple(context + answer), first_target=len(context))
    if "text" in row:
        return Demonstration(text=_required_text(row, "text"))
    if "chosen" in row and "rejected" in row:
        target = ("completion" if "prompt" in row
                  else "messages" if isinstance(row["chosen"], list) else "text")
        raise ValueError(f'a preference row: SFT learns one response per prompt; rename '
                         f'"chosen" to "{target}" (data.columns={{chosen: {target}}}) to train '
                         "on the preferred ones")
    if _is_stepwise(row):
        raise ValueError('a stepwise-supervision row: SFT needs one target; join the steps '
                         'labelled true into a "completion"')
    if "conversations" in row:
        raise ValueError(_SHAREGPT)
    if "prompt" in row:
        raise ValueError('a prompt-only row has no target: SFT needs "completion", "messages" '
                         'or "text"')
    raise ValueError('expected "messages", "prompt"+"completion" or "text"' + _has_columns(row))


def load_demonstrations(source: str | Path, limit: int | None = None,
                        columns: ColumnMap | None = None) -> list[Demonstration]:
    """SFT rows: conversations ending with an assistant turn, or plain text."""
    return _load(source, limit, _parse_demonstration, columns)


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def _parse_prompt_row(row: dict[str, Any], require_reference: str | None) -> PromptExample:
    reference: str | None
    if "prompt" in row:
        text, messages = _prompt(row)
        if row.get("reference") is not None:
            reference = _optional_text(row, "reference")
        elif _is_unpaired(row):
            # A completion labelled false is a judged sample, not an answer to score against.
            reference = _response(row["completion"], "completion") if row["label"] else None
        elif "completion" in row:
            # SFT-style rows name the target "completion"; both mean the reference here.
            reference = _response(row["completion"], "completion")
        else:
            reference = None
    elif "messages" in row:
        conversation = _messages(row["messages"], "messages", last=None)
        reference = None
        if conversation[-1]["role"] == "assistant":
            reference = conversation.pop()["content"]
        if not conversation or conversation[-1]["role"] != "user":
            raise ValueError('expected "messages" to end with a user turn, or with a user turn '
                             "and the assistant's answer (the reference)")
        text, messages = conversation[-1]["content"], tuple(conversation)
    elif "chosen" in row and "rejected" in row:
        text, messages, _, _ = _split_implicit(row["chosen"], row["rejected"])
        reference = None
    elif "text" in row:
        raise ValueError('a language-modeling "text" row has no prompt; rename the column '
                         '(data.columns={text: prompt}) to use the text as the prompt')
    elif "conversations" in row:
        raise ValueError(_SHAREGPT)
    else:
        raise ValueError('expected "prompt" (a string or a list of messages)' + _has_columns(row))
    row_id = row.get("id")
    if row_id is not None and not (isinstance(row_id, str) or _integer(row_id) is not None):
        raise ValueError(f'expected "id" to be a string or an integer, got {_describe(row_id)}')
    if reference is None and require_reference:
        raise ValueError(f'no "reference" (or "completion"): {require_reference}')
    return PromptExample(
        prompt=text,
        reference=reference,
        word=_optional_text(row, "word"),
        id=None if row_id is None else str(row_id if isinstance(row_id, str)
                                           else _integer(row_id)),
        messages=messages,
    )


def load_prompts(source: str | Path, limit: int | None = None,
                 columns: ColumnMap | None = None,
                 require_reference: str | None = None) -> list[PromptExample]:
    """Prompts with an optional reference answer, word and id.

    ``require_reference`` (why one is needed) makes a row without a reference an error.
    """
    return _load(source, limit, lambda row: _parse_prompt_row(row, require_reference), columns)


# ---------------------------------------------------------------------------------------------
# Ranked responses
# ---------------------------------------------------------------------------------------------


def _gold_scores(row: dict[str, Any], k: int) -> tuple[float, ...] | None:
    scores = row.get("gold_scores")
    if scores is None:
        return None
    if not isinstance(scores, list) or len(scores) != k or not all(map(_is_number, scores)):
        raise ValueError(f'expected "gold_scores" to be a list of {k} numbers '
                         "(one per response)")
    values = tuple(float(s) for s in scores)
    if any(v != v for v in values):
        raise ValueError('"gold_scores" contain NaN')
    return values


def _parse_ranked_row(row: dict[str, Any]) -> RankedExample:
    if "responses" in row or "ranks" in row:
        text, messages = _prompt(row)
        responses = row.get("responses", _MISSING)
        if not isinstance(responses, list) or len(responses) < 2:
            got = f"{len(responses)}" if isinstance(responses, list) else _describe(responses)
            raise ValueError(f'expected "responses" to be a list of at least 2 strings, got {got}')
        for index, response in enumerate(responses):
            if not isinstance(response, str) or not response.strip():
                raise ValueError(
                    f'"responses"[{index}] must be a non-empty string, got {_describe(response)}'
                )
        ranks = row.get("ranks", _MISSING)
        if not isinstance(ranks, list) or len(ranks) != len(responses):
            got = f"{len(ranks)}" if isinstance(ranks, list) else _describe(ranks)
            raise ValueError(
                f'expected "ranks" to be a list of {len(responses)} integers '
                f"(one per response), got {got}"
            )
        for index, rank in enumerate(ranks):
            if _integer(rank) is None:
                raise ValueError(f'"ranks"[{index}] must be an integer, got {_describe(rank)}')
        ranks = [_integer(rank) for rank in ranks]
        if len(set(ranks)) == 1:
            raise ValueError('all "ranks" are equal: no preference to learn from')
        if len(set(responses)) == 1:
            raise ValueError('all "responses" are identical: no preference to learn from')
        return RankedExample(
            prompt=text,
            responses=tuple(responses),
            ranks=tuple(ranks),
            reference=_optional_text(row, "reference"),
            messages=messages,
            gold_scores=_gold_scores(row, len(responses)),
        )
    if "chosen" in row or "rejected" in row:
        if "prompt" in row:
            text, messages = _prompt(row)
            chosen = _response(row.get("chosen"), "chosen", after_prompt=True)
            rejected = _response(row.get("rejected"), "rejected", after_prompt=True)
        elif "chosen" in row and "rejected" in row:
            text, messages, chosen, rejected = _split_implicit(row["chosen"], row["rejected"])
        else:
            missing = "rejected" if "chosen" in row else "chosen"
            raise ValueError(f'expected "{missing}" to be a non-empty string or one assistant '
                             "message, got missing")
        if chosen == rejected:
            # The same text cannot score both higher and lower: the pair only adds loss.
            raise ValueError('"chosen" and "rejected" are identical: no preference to learn from')
        return RankedExample(
            prompt=text,
            responses=(chosen, rejected),
            ranks=(0, 1),
            reference=_optional_text(row, "reference"),
            messages=messages,
        )
    if _is_unpaired(row):
        raise ValueError('an unpaired preference row (a "completion" with a true/false '
                         '"label"): the reward model learns from pairs; pair a true and a false '
                         'completion of one prompt as {"prompt", "chosen", "rejected"}')
    if _is_stepwise(row):
        raise ValueError('a stepwise-supervision row (per-step "labels"): the reward model '
                         'ranks whole responses; join each row\'s steps into a response and rank '
                         'them as {"prompt", "responses", "ranks"}')
    if "conversations" in row:
        raise ValueError(_SHAREGPT)
    for key, form in (("messages", "conversational language-modeling"),
                      ("completion", "prompt-completion"),
                      ("text", "language-modeling"), ("prompt", "prompt-only")):
        if key in row:
            raise ValueError(f"a {form} row has no ranked responses; the reward model needs "
                             '"chosen"+"rejected" or "responses"+"ranks" (the label stage '
                             "samples and ranks responses for prompts: data.label)")
    raise ValueError('expected either "responses"+"ranks" or "chosen"+"rejected"'
                     + _has_columns(row))


def load_ranked(source: str | Path, limit: int | None = None,
                columns: ColumnMap | None = None) -> list[RankedExample]:
    """Ranked responses; TRL pairwise rows become ``responses=(chosen, rejected), ranks=(0, 1)``."""
    return _load(source, limit, _parse_ranked_row, columns)
