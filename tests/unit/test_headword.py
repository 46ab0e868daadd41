from __future__ import annotations

import pytest

from stages.headword import headword, mask_headword


@pytest.mark.parametrize(
    ("text", "word", "expected"),
    [
        ("To run fast.", "run", "To fast."),
        ("Running or runs quickly.", "run", "or quickly."),
        ("To prune a tree.", "run", "To prune a tree."),  # inside a word: untouched
        ("A well-run shop.", "run", "A well- shop."),
        ("An ice cream cone.", "ice cream", "An cone."),
        ("Apple's skin.", "apple", "'s skin."),
        ("Nothing to see.", None, "Nothing to see."),
        ("Nothing to see.", "", "Nothing to see."),
    ],
)
def test_mask_headword(text: str, word: str | None, expected: str) -> None:
    assert mask_headword(text, word) == expected


def test_mask_leaves_unmatched_text_byte_identical() -> None:
    text = "  A sweet  fruit.  "
    assert mask_headword(text, "apple") is text


def test_headword_from_prompt_or_meta() -> None:
    assert headword('Define the word "grace" in one sentence.', None) == "grace"
    assert headword('Define the word "grace".', {"word": "poise"}) == "poise"
    assert headword("Say something.", None) is None
