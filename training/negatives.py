"""Hard negative captions: a caption with the words of one group swapped for others of the same group.

A contrastive batch rarely holds two images that differ only in one attribute, so nothing forces the
embeddings to tell "a red circle" from "a red square" apart: they learn what separates random
captions, colour first. NegCLIP (Yuksekgonul et al. 2023) fixes this with negatives made by editing the
caption itself. Here the edit is a swap within a word group the user names (shapes, colours, counts,
...): every word of the group in the caption is replaced by a different word of that group, so the
negative keeps everything else and differs only in what the group describes.

Not here: how the negatives enter the losses (losses.py: the retrieval losses and dense_loss).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np


def check_word_groups(groups: Sequence[Sequence[str]]) -> list[list[str]]:
    """The groups as lists of lower-case words; a group of fewer than two words has nothing to swap."""
    checked = []
    for number, group in enumerate(groups, start=1):
        words = [str(word).strip().lower() for word in group]
        if len(set(words)) < 2 or not all(words):
            raise ValueError(
                f"hard negative word group {number} ({list(group)!r}) needs at least two different, "
                "non-empty words to swap between, e.g. ['circle', 'square', 'triangle']"
            )
        checked.append(words)
    return checked


def swap_words(caption: str, group: Sequence[str], rng: np.random.Generator) -> str | None:
    """`caption` with every whole word of `group` replaced by another word of the group (each occurrence
    drawn on its own), or None when the caption uses no word of the group."""
    pattern = re.compile(r"\b(" + "|".join(re.escape(word) for word in group) + r")\b", re.IGNORECASE)
    if not pattern.search(caption):
        return None

    def other(match: re.Match) -> str:
        choices = [word for word in group if word != match.group(0).lower()]
        return choices[rng.integers(len(choices))]

    return pattern.sub(other, caption)


def hard_negatives(
    captions: Sequence[str], groups: Sequence[Sequence[str]], seed: int = 0, per_group: int = 1
) -> list[list[str | None]]:
    """For each caption, `per_group` different negatives per group (`swap_words` drawn until that many
    differ), group after group; None where the caption uses no word of the group, or has fewer swaps."""
    groups = check_word_groups(groups)
    rng = np.random.default_rng(seed)
    rows = []
    for caption in captions:
        row: list[str | None] = []
        for group in groups:
            drawn: list[str] = []
            for _ in range(8 * per_group):  # with per_group 1, exactly one draw
                negative = swap_words(caption, group, rng)
                if negative is None:
                    break
                if negative not in drawn:
                    drawn.append(negative)
                if len(drawn) == per_group:
                    break
            row += drawn + [None] * (per_group - len(drawn))
        rows.append(row)
    return rows
