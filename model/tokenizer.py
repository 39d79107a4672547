"""CLIP's BPE tokenizer, built offline from the vocabulary file the project ships.

The official code loads `openai/clip-vit-base-patch32` from the Hugging Face hub. That tokenizer is CLIP's
BPE table (the `bpe_simple_vocab_16e6.txt.gz` that OpenAI's CLIP and open_clip carry) laid out as
`vocab.json` + `merges.txt`; we derive those two files from the shipped table so no download is needed,
and hand them to transformers' own `CLIPTokenizer`, so ids and padding are the hub tokenizer's.
"""
from __future__ import annotations

import gzip
import json
import os
import tempfile
from functools import lru_cache
from typing import Dict, List, Sequence

import torch
from transformers import CLIPTokenizer, PreTrainedTokenizerBase

BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets', 'bpe_simple_vocab_16e6.txt.gz')
VOCAB_SIZE = 49408
SOT_TOKEN, EOT_TOKEN = '<|startoftext|>', '<|endoftext|>'
# CLIP keeps the first 49152 - 256 - 2 merges of the table: 256 byte tokens, their end-of-word forms,
# the merges and the two special tokens make exactly 49,408 ids.
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2


def _byte_alphabet() -> List[str]:
    """GPT-2's reversible byte -> printable unicode map, in CLIP's id order (bytes 0..255 permuted)."""
    printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
                 + list(range(ord('®'), ord('ÿ') + 1)))
    codepoints = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in codepoints:
            codepoints[b] = 256 + extra
            extra += 1
    return [chr(codepoints[b]) for b in printable + [b for b in range(256) if b not in printable]]


def _vocab_and_merges(bpe_path: str) -> tuple[dict, List[str]]:
    with gzip.open(bpe_path, 'rt', encoding='utf-8') as f:
        lines = f.read().split('\n')
    merges = lines[1:1 + NUM_MERGES]  # line 0 is the '#version' header
    alphabet = _byte_alphabet()
    tokens = alphabet + [t + '</w>' for t in alphabet] + [m.replace(' ', '') for m in merges]
    tokens += [SOT_TOKEN, EOT_TOKEN]
    if len(tokens) != VOCAB_SIZE or len(set(tokens)) != VOCAB_SIZE:
        raise ValueError(f'{bpe_path} is not CLIP\'s BPE table: it gives {len(set(tokens))} distinct tokens')
    return {t: i for i, t in enumerate(tokens)}, merges


@lru_cache(maxsize=None)
def _shipped_clip_tokenizer() -> PreTrainedTokenizerBase:
    vocab, merges = _vocab_and_merges(BPE_PATH)
    with tempfile.TemporaryDirectory() as tmp:
        # Files on disk (rather than in-memory objects) because that is the one constructor path that
        # transformers 4.x and 5.x share.
        with open(os.path.join(tmp, 'vocab.json'), 'w', encoding='utf-8') as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(tmp, 'merges.txt'), 'w', encoding='utf-8') as f:
            f.write('#version: 0.2\n' + '\n'.join(merges) + '\n')
        # Naming the class keeps transformers 4.x from guessing it from the folder's random name (a name
        # containing "t5", say) and warning that the tokenizer is of another type.
        with open(os.path.join(tmp, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
            json.dump({'tokenizer_class': 'CLIPTokenizer'}, f)
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=77)


def build_tokenizer(text_config) -> PreTrainedTokenizerBase:
    """The tokenizer for `MODEL.TEXT_ENCODER`: CLIP BPE from the shipped file unless a hub name is set.

    Encode texts with `tokenize`; padding uses the end-of-text id 49407, so `input_ids.argmax(-1)` finds the
    end-of-text token.
    """
    if text_config.TOKENIZER != 'clip':
        raise ValueError(f'MODEL.TEXT_ENCODER.TOKENIZER {text_config.TOKENIZER!r} is not supported; use "clip"')
    if text_config.PRETRAINED_TOKENIZER:
        return CLIPTokenizer.from_pretrained(text_config.PRETRAINED_TOKENIZER)
    return _shipped_clip_tokenizer()


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
             context_length: int = 77) -> Dict[str, torch.Tensor]:
    """`{'input_ids', 'attention_mask'}`, int64 `[len(texts), context_length]`: the official call
    `tokenizer(texts, padding='max_length', truncation=True, max_length=77, return_tensors='pt')`.

    It asks transformers for numpy arrays and makes the tensors itself because transformers 5 hands out
    torch tensors only beside torch >= 2.6, and the project runs on torch 2.4 too.
    """
    encoded = tokenizer(list(texts), padding='max_length', truncation=True, max_length=context_length,
                        return_tensors='np')
    return {key: torch.from_numpy(encoded[key]).long() for key in ('input_ids', 'attention_mask')}
