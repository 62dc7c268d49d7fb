"""Kohya-style captions: a keep section, then groups of tags, each dropped and shuffled (TRAINING §5.3)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionRules:
    """How a caption file becomes the training caption; a recipe's [data.captions] table."""

    keep_separator: str = "|||"          # text before it is always kept, in order
    group_separator: str = "%%"
    tag_separator: str = "$$"
    tag_dropout: float = 0.0
    group_dropout: float = 0.0
    shuffle: bool = False                # shuffle the tags within each group, and the groups
    caption_dropout: float = 0.0         # whole caption -> "" (for CFG); the official trainer has none

    def __post_init__(self) -> None:
        for name in ("tag_dropout", "group_dropout", "caption_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"data.captions.{name} {getattr(self, name)} must be a probability in [0, 1]")


def process_caption(text: str, rules: CaptionRules, rng: random.Random) -> str:
    """HDM/kohya caption augmentation: keep section, then groups of tags, each dropped and shuffled (TRAINING §5.3).

    `keep|||g1tag1$$g1tag2%%g2tag1` → keep tags in order, then the surviving groups' surviving tags, joined ", ".
    A caption without separators is one tag in one group.
    """
    if rules.caption_dropout and rng.random() < rules.caption_dropout:
        return ""
    text = text.strip()
    keep: list[str] = []
    if rules.keep_separator and rules.keep_separator in text:
        head, text = text.split(rules.keep_separator, 1)
        keep = [t.strip() for t in head.split(rules.tag_separator) if t.strip()]
    groups = [g for g in text.split(rules.group_separator)] if rules.group_separator else [text]
    out: list[list[str]] = []
    for group in groups:
        tags = [t.strip() for t in group.split(rules.tag_separator) if t.strip()]
        tags = [t for t in tags if not (rules.tag_dropout and rng.random() < rules.tag_dropout)]
        if rules.shuffle:
            rng.shuffle(tags)
        if tags:
            out.append(tags)
    if rules.shuffle:
        rng.shuffle(out)
    out = [g for g in out if not (rules.group_dropout and rng.random() < rules.group_dropout)]
    return ", ".join(keep + [t for g in out for t in g])
