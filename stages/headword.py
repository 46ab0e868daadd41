"""The word a definition prompt asks about, and how to find (or blank) it in a response.

Shared by the `no_headword` rule, which penalizes a circular definition, and the gold judge,
which must not reward one: naming the word being defined is not a better definition.
"""

from __future__ import annotations

import functools
import re

__all__ = ["headword", "headword_pattern", "mask_headword"]

# Straight and typographic double quotes: prompts are `Define the word "<word>" in one sentence.`
_QUOTED = re.compile(r"[\"\u201c\u201d]([^\"\u201c\u201d]+)[\"\u201c\u201d]")
_SPACES = re.compile(r"[ \t]{2,}")


def headword(prompt: str, meta: dict | None) -> str | None:
    """The word being defined: meta["word"] if present, else the first quoted text in the prompt."""
    if meta:
        word = meta.get("word")
        if isinstance(word, str) and word.strip():
            return word.strip()
    match = _QUOTED.search(prompt)
    if match and match.group(1).strip():
        return match.group(1).strip()
    return None


@functools.lru_cache(maxsize=4096)
def headword_pattern(word: str) -> re.Pattern[str]:
    """Matches the headword and the inflections that keep its stem, as whole words.

    The headword must start a word (no word character before it) but may continue into one,
    so inflections that keep the stem ("run" -> "running", "runs") count while words that
    merely contain it ("prune", "overrun") do not. Hyphen and apostrophe are word breaks, so
    "well-run" and "apple's" count. Stem-changing forms ("ran", "happily" for "happy") are not
    caught: that would need a lemmatizer and the false positives of a loose stemmer (e.g.
    "rat" in "rather" for "rate") are worse than the misses. The match runs to the end of the
    word, so masking removes "running", not just "run".
    """
    parts = [re.escape(p) for p in word.split()]
    return re.compile(r"(?<!\w)" + r"[\s\-]+".join(parts) + r"\w*", re.IGNORECASE)


def mask_headword(text: str, word: str | None) -> str:
    """``text`` with the headword and its inflections removed (spaces tidied)."""
    if not word:
        return text
    masked = headword_pattern(word).sub("", text)
    return _SPACES.sub(" ", masked).strip() if masked != text else text
