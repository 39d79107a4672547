"""Prefix conditioning (Saito et al., "Prefix Conditioning Unifies Language and Label Supervision", CVPR 2023):
a word prefix on every text that tells the text encoder which kind of supervision it is, so class prompts
and web captions need not share one distribution.

DATA.TEXT_PREFIX '' (the default) leaves every text as it was; 'words' puts DATA.TEXT_PREFIX_LABEL before
the class prompts of image-label samples and DATA.TEXT_PREFIX_CAPTION before the captions of image-text
samples. Each kind gets its prefix in one place: training texts in data/loader.py (`BatchStream._use`),
zero-shot class prompts in evaluation/zeroshot.py (the kind DATA.TEXT_PREFIX_ZEROSHOT names; the paper
evaluates with the caption one), retrieval captions in evaluation/retrieval.py. The prefix is part of the
text, so the tokenizer's CONTEXT_LENGTH truncation counts it; `check_fits` refuses one that leaves no room.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TEXT_PREFIX_MODES = ('', 'words')
TEXT_KINDS = ('label', 'caption')


@dataclass(frozen=True)
class TextPrefix:
    label: str = ''  # before class prompts
    caption: str = ''  # before captions

    @classmethod
    def from_config(cls, config: Any) -> 'TextPrefix':
        """The prefixes `config.DATA` asks for; none when DATA.TEXT_PREFIX is off."""
        data = config.DATA
        if not data.TEXT_PREFIX:
            return cls()
        if data.TEXT_PREFIX != 'words':
            raise ValueError(f'DATA.TEXT_PREFIX {data.TEXT_PREFIX!r} is unknown; known: {list(TEXT_PREFIX_MODES)}')
        return cls(label=data.TEXT_PREFIX_LABEL, caption=data.TEXT_PREFIX_CAPTION)

    def of(self, kind: str) -> str:
        """The prefix of texts of `kind`, 'label' or 'caption'."""
        if kind not in TEXT_KINDS:
            raise ValueError(f'text kind {kind!r} is unknown; known: {list(TEXT_KINDS)}')
        return getattr(self, kind)

    def check_fits(self, tokenizer: Any, context_length: int) -> None:
        """Refuse a prefix that, with the start and end tokens, leaves no token of CONTEXT_LENGTH for the text
        itself: truncation would cut every text down to the prefix."""
        for kind in TEXT_KINDS:
            prefix = self.of(kind)
            tokens = len(tokenizer(prefix, add_special_tokens=False)['input_ids']) if prefix else 0
            if tokens + 2 >= context_length:
                raise ValueError(f'DATA.TEXT_PREFIX_{kind.upper()} {prefix!r} is {tokens} tokens: with the start '
                                 f'and end tokens it leaves no room for the text in MODEL.TEXT_ENCODER.'
                                 f'CONTEXT_LENGTH {context_length}')


def zeroshot_prefix(config: Any) -> str:
    """The prefix of zero-shot class prompts: that of the kind DATA.TEXT_PREFIX_ZEROSHOT names."""
    return TextPrefix.from_config(config).of(config.DATA.TEXT_PREFIX_ZEROSHOT)
