"""Dataset formats of the pipeline and their validation.

Every stage reads its data through one of the ``load_*`` functions below. A source is a JSONL
file, a folder written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``, whose
"train" split is used), or a Hugging Face Hub id ``owner/name`` with an optional ``:split``.
Rows are validated as they are read; the first malformed row raises a ``DataError`` whose
single-line message names ``source:line`` and what was expected there, so a bad row is found
before any training time is spent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """One-line message naming file:line and what was expected."""


@dataclass(frozen=True)
class PromptExample:
    prompt: str
    reference: str | None = None
    word: str | None = None
    id: str | None = None


@dataclass(frozen=True)
class RankedExample:
    prompt: str
    # K >= 2 candidate responses to the same prompt.
    responses: tuple[str, ...]
    # One rank per response: lower is better, equal ranks are ties.
    ranks: tuple[int, ...]
    reference: str | None = None


ROLES = ("system", "user", "assistant")

# Files are recognised by extension so that a mistyped local path ("data/sft.jsonl") is reported
# as missing instead of being sent to the Hub, whose ids have the same owner/name shape.
_FILE_SUFFIXES = (".jsonl", ".json")
_HUB_ID_RE = re.compile(r"[\w.-]+/[\w.-]+(?::[\w.-]+)?")

_MISSING = object()


# ---------------------------------------------------------------------------------------------
# Reading rows
# ---------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Leading bytes of compressed files someone may pass for JSONL.
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"PK\x03\x04": "zip",
               b"\x28\xb5\x2f\xfd": "zstd"}


def _iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open("rb") as handle:
        head = handle.read(8)
        for magic, kind in _COMPRESSED.items():
            if head.startswith(magic):
                raise DataError(f"{path}: a {kind}-compressed file, expected JSONL text "
                                "(decompress it first)")
        handle.seek(0)
        for number, raw in enumerate(handle, start=1):
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
                raise DataError(
                    f"{path}:{number}: expected a JSON object, got {type(row).__name__}"
                )
            yield number, row


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """Return ``(line number, row)`` for every non-blank line; line numbers start at 1."""
    return list(_iter_jsonl(path))


def _iter_dataset(dataset: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    # Rows of a `datasets` table have no line numbers; the row index plays that role.
    yield from enumerate(dataset)


def _load_saved_dataset(path: Path) -> Any:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(
            f"{path}: expected a JSONL file or a folder written by save_to_disk "
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


def _iter_source(source: str | Path) -> tuple[str, Iterator[tuple[int, dict[str, Any]]]]:
    """Return the label used in messages and the ``(line, row)`` pairs of ``source``."""
    path = Path(source)
    if path.is_dir():
        return str(path), _iter_dataset(_load_saved_dataset(path))
    if path.exists() or path.suffix in _FILE_SUFFIXES:
        return str(path), _iter_jsonl(path)
    text = str(source)
    if _HUB_ID_RE.fullmatch(text):
        return text, _iter_dataset(_load_hub_dataset(text))
    raise DataError(f"{source}: no such file, folder or Hub dataset id (owner/name[:split])")


def _load(source: str | Path, limit: int | None, parse: Any) -> list[Any]:
    """Parse rows of ``source`` with ``parse(row) -> example`` (which raises ``ValueError``)."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    label, rows = _iter_source(source)
    examples = []
    for number, row in islice(rows, limit):
        try:
            examples.append(parse(row))
        except ValueError as exc:
            raise DataError(f"{label}:{number}: {exc}") from None
    if not examples and limit != 0:
        raise DataError(f"{label}: no rows")
    return examples


# ---------------------------------------------------------------------------------------------
# Field checks: each raises ValueError with the part of the message after "file:line: "
# ---------------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    if value is _MISSING:
        return "missing"
    if isinstance(value, str) and not value.strip():
        return "a blank string"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _required_text(row: dict[str, Any], key: str) -> str:
    value = row.get(key, _MISSING)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f'expected "{key}" to be a non-empty string, got {_describe(value)}')
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


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, but true/false as a rank is almost certainly a mistake.
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# SFT conversations
# ---------------------------------------------------------------------------------------------


def _parse_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'expected "messages" to be a non-empty list, got {_describe(messages)}')
    conversation = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(
                f'"messages"[{index}] must be an object with "role" and "content", '
                f"got {_describe(message)}"
            )
        role = message.get("role", _MISSING)
        if role not in ROLES:
            got = "nothing" if role is _MISSING else repr(role)
            raise ValueError(
                f'"messages"[{index}].role must be one of {"/".join(ROLES)}, got {got}'
            )
        content = message.get("content", _MISSING)
        if not isinstance(content, str) or not content.strip():
            raise ValueError(
                f'"messages"[{index}].content must be a non-empty string, got {_describe(content)}'
            )
        conversation.append({"role": role, "content": content})
    if conversation[-1]["role"] != "assistant":
        # The loss is on assistant turns; a trailing user turn would be trained on nothing.
        raise ValueError(
            f"the last message must be from the assistant, got {conversation[-1]['role']!r}"
        )
    return conversation


def _parse_sft_row(row: dict[str, Any]) -> list[dict[str, str]]:
    if row.get("messages") is not None:
        return _parse_messages(row["messages"])
    if "prompt" in row or "completion" in row:
        prompt = _required_text(row, "prompt")
        completion = _required_text(row, "completion")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    raise ValueError('expected either "messages" or "prompt"+"completion"')


def load_sft_conversations(
    source: str | Path, limit: int | None = None
) -> list[list[dict[str, str]]]:
    """Conversations (lists of ``{"role", "content"}``) ending with an assistant turn."""
    return _load(source, limit, _parse_sft_row)


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def _parse_prompt_row(row: dict[str, Any]) -> PromptExample:
    prompt = _required_text(row, "prompt")
    # SFT-style files name the target "completion"; both mean the reference answer here.
    reference_key = "reference" if row.get("reference") is not None else "completion"
    row_id = row.get("id")
    if row_id is not None and not (isinstance(row_id, str) or _is_int(row_id)):
        raise ValueError(f'expected "id" to be a string or an integer, got {_describe(row_id)}')
    return PromptExample(
        prompt=prompt,
        reference=_optional_text(row, reference_key),
        word=_optional_text(row, "word"),
        id=None if row_id is None else str(row_id),
    )


def load_prompts(source: str | Path, limit: int | None = None) -> list[PromptExample]:
    """Prompts with an optional reference answer, word and id."""
    return _load(source, limit, _parse_prompt_row)


# ---------------------------------------------------------------------------------------------
# Ranked responses
# ---------------------------------------------------------------------------------------------


def _parse_ranked_row(row: dict[str, Any]) -> RankedExample:
    if row.get("responses") is not None or row.get("ranks") is not None:
        prompt = _required_text(row, "prompt")
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
            if not _is_int(rank):
                raise ValueError(f'"ranks"[{index}] must be an integer, got {_describe(rank)}')
        if len(set(ranks)) == 1:
            raise ValueError('all "ranks" are equal: no preference to learn from')
        if len(set(responses)) == 1:
            raise ValueError('all "responses" are identical: no preference to learn from')
        return RankedExample(
            prompt=prompt,
            responses=tuple(responses),
            ranks=tuple(ranks),
            reference=_optional_text(row, "reference"),
        )
    if "chosen" in row or "rejected" in row:
        prompt = _required_text(row, "prompt")
        chosen = _required_text(row, "chosen")
        rejected = _required_text(row, "rejected")
        if chosen == rejected:
            # The same text cannot score both higher and lower: the pair only adds loss.
            raise ValueError('"chosen" and "rejected" are identical: no preference to learn from')
        return RankedExample(
            prompt=prompt,
            responses=(chosen, rejected),
            ranks=(0, 1),
            reference=_optional_text(row, "reference"),
        )
    raise ValueError('expected either "responses"+"ranks" or "chosen"+"rejected"')


def load_ranked(source: str | Path, limit: int | None = None) -> list[RankedExample]:
    """Ranked responses; TRL pairwise rows become ``responses=(chosen, rejected), ranks=(0, 1)``."""
    return _load(source, limit, _parse_ranked_row)
