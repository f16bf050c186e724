"""What a text query must be, checked once for every verb that takes one (search, ground, segment,
zero-shot classification, chat).

An empty or blank text embeds to the tower's embedding of nothing, which scores every image alike: a
search "for" it answers with arbitrary images at one score, silently. So a blank text is refused, named by
its position among the texts given, with the fix.
"""

from __future__ import annotations

from collections.abc import Sequence


def check_texts(texts: Sequence[str], what: str = "text query", example: str = '"a red truck"') -> list[str]:
    """The texts, stripped; a lone string, an empty list or a blank text is a ValueError naming `what`."""
    if isinstance(texts, str):
        raise ValueError(f"{what}s must be a list, not the string {texts!r}; split it first")
    if not texts:
        raise ValueError(f"no {what} given; pass at least one, e.g. {example}")
    stripped = []
    for number, text in enumerate(texts, start=1):
        if not isinstance(text, str) or not text.strip():
            position = f" {number} of {len(texts)}" if len(texts) > 1 else ""
            raise ValueError(
                f"{what}{position} is empty or only whitespace ({text!r}); remove it or write one"
            )
        stripped.append(text.strip())
    return stripped
