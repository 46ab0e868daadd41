"""Build the embedded WordNet definition dataset (sft / label / ppo / eval splits).

Usage:
    python data/build_wordnet.py [--wordnet-dir /usr/share/wordnet] [--out data/wordnet] [--seed 0]

Standard library only so the dataset can be rebuilt without the project's dependencies.
The output is a pure function of the WordNet files and the seed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

PROMPT_TEMPLATE = 'Define the word "{word}" in one sentence.'

# Chosen so that roughly 5-7k words survive all filters (see README for the exact count).
MIN_TAG_COUNT = 3
MIN_WORD_LEN = 3
MAX_WORD_LEN = 14
MIN_DEFINITION_WORDS = 3

SPLIT_TARGETS: dict[str, int] = {"sft": 3000, "label": 1200, "ppo": 1200, "eval": 300}

# ss_type digit in a sense key -> (index/data file suffix, public part-of-speech name).
# Satellite adjectives (5) live in the adjective files.
SS_TYPES: dict[str, tuple[str, str]] = {
    "1": ("noun", "noun"),
    "2": ("verb", "verb"),
    "3": ("adj", "adjective"),
    "4": ("adv", "adverb"),
    "5": ("adj", "adjective"),
}
POS_PREFERENCE = ("noun", "verb", "adjective", "adverb")

WORD_RE = re.compile(r"[a-z]+")
# Adjective word forms may carry a syntactic marker such as "(a)", "(p)" or "(ip)".
ADJ_MARKER_RE = re.compile(r"\([a-z]+\)$")
# Examples in a gloss are double-quoted and introduced by ';' (rarely ':' or nothing).
EXAMPLE_START_RE = re.compile(r'(?:^|[;:])\s*"')
# Usage notes quote words with `...' or "..." (e.g. "(`whole' is used informally for `wholly')");
# they talk about the word rather than define it, so they are dropped.
QUOTED_PAREN_RE = re.compile(r"\s*\([^()]*[`\"][^()]*\)")


@dataclass(frozen=True)
class Entry:
    word: str
    pos: str
    definition: str
    tag_count: int


def read_tag_counts(wordnet_dir: Path) -> dict[str, list[tuple[int, int, str, str]]]:
    """Map lemma -> [(tag_count, sense_number, file_suffix, pos), ...] from cntlist.rev."""
    senses: dict[str, list[tuple[int, int, str, str]]] = {}
    with open(wordnet_dir / "cntlist.rev", encoding="utf-8") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) != 3:
                continue
            sense_key, sense_number, tag_count = fields
            lemma, _, lex_sense = sense_key.partition("%")
            ss_type = lex_sense[:1]
            if ss_type not in SS_TYPES:
                continue
            suffix, pos = SS_TYPES[ss_type]
            senses.setdefault(lemma, []).append((int(tag_count), int(sense_number), suffix, pos))
    return senses


def read_index(wordnet_dir: Path, suffix: str) -> dict[str, list[str]]:
    """Map lemma -> synset offsets in sense-number order for one part of speech."""
    offsets: dict[str, list[str]] = {}
    with open(wordnet_dir / f"index.{suffix}", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(" "):  # license header
                continue
            fields = line.split()
            lemma, p_cnt = fields[0], int(fields[3])
            # lemma pos synset_cnt p_cnt [ptr_symbol]*p_cnt sense_cnt tagsense_cnt offsets...
            offsets[lemma] = fields[4 + p_cnt + 2 :]
    return offsets


def read_synset(wordnet_dir: Path, suffix: str, offset: str) -> tuple[list[str], str]:
    """Return (word forms as written, gloss) of the synset at a byte offset of data.<suffix>."""
    with open(wordnet_dir / f"data.{suffix}", "rb") as handle:
        handle.seek(int(offset))
        line = handle.readline().decode("utf-8")
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    word_count = int(fields[3], 16)
    words = [ADJ_MARKER_RE.sub("", fields[4 + 2 * i]) for i in range(word_count)]
    return words, gloss.strip()


def clean_definition(gloss: str) -> str:
    match = EXAMPLE_START_RE.search(gloss)
    text = gloss[: match.start()] if match else gloss
    text = QUOTED_PAREN_RE.sub("", text)
    clauses = [c.strip() for c in text.split(";")]
    text = "; ".join(c for c in clauses if c and "`" not in c and '"' not in c)
    if not text:
        return ""
    # A leading domain label such as "(law)" stays lowercase; the definition proper starts after it.
    label = re.match(r"\([^()]*\)\s*", text)
    start = label.end() if label and label.end() < len(text) else 0
    text = text[:start] + text[start].upper() + text[start + 1 :]
    if not text.endswith((".", "!", "?")):
        text += "."
    return text


def mentions_word(definition: str, word: str) -> bool:
    """True if the definition uses the headword or a plain inflection of it (gives it away)."""
    pattern = rf"\b{re.escape(word)}(?:s|es|d|ed|ing)?\b"
    return re.search(pattern, definition, flags=re.IGNORECASE) is not None


def most_frequent_sense(senses: list[tuple[int, int, str, str]]) -> tuple[int, int, str, str]:
    # Highest tag count wins; ties go to the lower sense number, then the more common POS.
    return min(senses, key=lambda s: (-s[0], s[1], POS_PREFERENCE.index(s[3])))


def collect_entries(wordnet_dir: Path, min_tag_count: int) -> list[Entry]:
    tag_counts = read_tag_counts(wordnet_dir)
    indexes = {suffix: read_index(wordnet_dir, suffix) for suffix in ("noun", "verb", "adj", "adv")}
    entries: list[Entry] = []
    for lemma in sorted(tag_counts):
        if not (WORD_RE.fullmatch(lemma) and MIN_WORD_LEN <= len(lemma) <= MAX_WORD_LEN):
            continue
        tag_count, sense_number, suffix, pos = most_frequent_sense(tag_counts[lemma])
        if tag_count < min_tag_count:
            continue
        offsets = indexes[suffix].get(lemma, [])
        if sense_number > len(offsets):
            continue
        words, gloss = read_synset(wordnet_dir, suffix, offsets[sense_number - 1])
        # The lemma is lowercased in the index; a capitalised form in the synset means a
        # proper noun (or an acronym) for this sense, which is not a dictionary-style word.
        if lemma not in words:
            continue
        definition = clean_definition(gloss)
        if len(definition.split()) < MIN_DEFINITION_WORDS or mentions_word(definition, lemma):
            continue
        entries.append(Entry(lemma, pos, definition, tag_count))
    return entries


def split_sizes(total: int) -> dict[str, int]:
    target_total = sum(SPLIT_TARGETS.values())
    if total >= target_total:
        return dict(SPLIT_TARGETS)
    return {name: size * total // target_total for name, size in SPLIT_TARGETS.items()}


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_rows(split: str, entries: list[Entry]) -> list[dict[str, str]]:
    target_key = "completion" if split == "sft" else "reference"
    return [
        {
            "id": f"wn-{split}-{i:05d}",
            "word": entry.word,
            "pos": entry.pos,
            "prompt": PROMPT_TEMPLATE.format(word=entry.word),
            target_key: entry.definition,
        }
        for i, entry in enumerate(entries)
    ]


def write_readme(out: Path, counts: dict[str, int], qualifying: int, seed: int) -> None:
    table = "\n".join(f"| `{name}.jsonl` | {count} |" for name, count in counts.items())
    text = f"""# WordNet definitions dataset

Default task data for the pipeline: *write a one-sentence dictionary definition of a word*.
Every row asks `Define the word "<word>" in one sentence.` and carries the WordNet 3.0
definition of the word's most frequent sense as the target.

## Splits

Each word appears in exactly one split (the word sets are disjoint).

| file | rows |
|------|------|
{table}

- `sft.jsonl`: `id`, `word`, `pos`, `prompt`, `completion` (supervised fine-tuning).
- `label.jsonl`, `ppo.jsonl`, `eval.jsonl`: `id`, `word`, `pos`, `prompt`, `reference`
  (preference labelling, policy optimisation and held-out evaluation).

`pos` is one of `noun`, `verb`, `adjective`, `adverb`.

## How it was built

`data/build_wordnet.py` (standard library only, deterministic) reads the WordNet 3.0 database
installed by the Debian package `wordnet-base` (`/usr/share/wordnet`):

1. For every lemma, the sense with the highest semantic-concordance tag count in
   `cntlist.rev` is taken (ties: lower sense number, then noun > verb > adjective > adverb).
2. Only single common words are kept: lowercase ASCII letters, length {MIN_WORD_LEN}-{MAX_WORD_LEN},
   tag count >= {MIN_TAG_COUNT}, and the lowercase form must appear in the synset (capitalised
   forms, i.e. proper nouns and acronyms, are dropped).
3. The definition is the gloss up to the first double-quoted example, stripped, with the
   first letter capitalised and a final period; usage notes that quote words
   (e.g. ``(`whole' is often used informally for `wholly')``) are removed.  Definitions shorter than
   {MIN_DEFINITION_WORDS} words, or that contain the headword (or a plain inflection of it),
   are dropped.
4. The {qualifying} qualifying words are sorted, shuffled with `random.Random({seed})` and cut
   into the splits above (targets {", ".join(f"{k} {v}" for k, v in SPLIT_TARGETS.items())},
   scaled down proportionally if fewer words qualify); the {qualifying - sum(counts.values())}
   words left after the last split are not used.

Exact command:

```
python data/build_wordnet.py --wordnet-dir /usr/share/wordnet --out data/wordnet --seed {seed}
```

## License

Derived from WordNet 3.0, Copyright 2006 by Princeton University; distributed under the
WordNet 3.0 license reproduced in `LICENSE` in this folder.
"""
    (out / "README.md").write_text(text, encoding="utf-8")


WORDNET_LICENSE = """\
WordNet Release 3.0

This software and database is being provided to you, the LICENSEE, by
Princeton University under the following license.  By obtaining, using
and/or copying this software and database, you agree that you have
read, understood, and will comply with these terms and conditions.:

Permission to use, copy, modify and distribute this software and
database and its documentation for any purpose and without fee or
royalty is hereby granted, provided that you agree to comply with
the following copyright notice and statements, including the disclaimer,
and that the same appear on ALL copies of the software, database and
documentation, including modifications that you make for internal
use or for distribution.

WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.

THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON
UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR
IMPLIED.  BY WAY OF EXAMPLE, BUT NOT LIMITATION, PRINCETON
UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES OF MERCHANT-
ABILITY OR FITNESS FOR ANY PARTICULAR PURPOSE OR THAT THE USE
OF THE LICENSED SOFTWARE, DATABASE OR DOCUMENTATION WILL NOT
INFRINGE ANY THIRD PARTY PATENTS, COPYRIGHTS, TRADEMARKS OR
OTHER RIGHTS.

The name of Princeton University or Princeton may not be used in
advertising or publicity pertaining to distribution of the software
and/or database.  Title to copyright in this software, database and
any associated documentation shall at all times remain with
Princeton University and LICENSEE agrees to preserve same.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--out", type=Path, default=Path("data/wordnet"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-tag-count", type=int, default=MIN_TAG_COUNT)
    args = parser.parse_args(argv)

    entries = collect_entries(args.wordnet_dir, args.min_tag_count)
    random.Random(args.seed).shuffle(entries)
    sizes = split_sizes(len(entries))

    args.out.mkdir(parents=True, exist_ok=True)
    start = 0
    for split, size in sizes.items():
        write_jsonl(args.out / f"{split}.jsonl", build_rows(split, entries[start : start + size]))
        start += size
    write_readme(args.out, sizes, len(entries), args.seed)
    (args.out / "LICENSE").write_text(WORDNET_LICENSE, encoding="utf-8")
    print(f"{len(entries)} words qualify; wrote " + ", ".join(f"{k}={v}" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
