"""Prefix conditioning (DATA.TEXT_PREFIX, data/text_prefix.py): class prompts and captions of the training
batches, zero-shot class prompts and retrieval captions carry their kind's prefix when it is on, and are
the texts they always were when it is off; the prefix counts against the tokenizer's context length."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import data.loader
from configs import ConfigError
from data import build_train_loader
from data.text_prefix import TextPrefix
from evaluation import class_embeddings
from evaluation.retrieval import run_retrieval
from model import tokenize
from tests.conftest import tiny_config

SOURCES = "[{'TYPE': 'imagefolder', 'PATH': 'labels'}, {'TYPE': 'tsv', 'PATH': 'captions/captions.tsv'}]"
WORDS = ('DATA.TEXT_PREFIX', 'words')


def _training_texts(tiny_data, tokenizer, monkeypatch, *opts):
    """(texts, is-class-prompt flags, tokens) of the first two batches of the labels + captions mixture."""
    config = tiny_config('DATA.DATA_PATH', tiny_data, 'DATA.SOURCES', SOURCES, 'DATA.IMG_SIZE', '32',
                         'MODEL.IMAGE_ENCODER.IMG_SIZE', '32', 'DATA.BATCH_SIZE', '8', 'DATA.NUM_WORKERS', '0',
                         'DATA.EPOCH_SAMPLES', '16', 'AUG.AUTO_AUGMENT', 'none', *opts)
    seen = []

    def recording_tokenize(tokenizer, texts, context_length):
        seen.extend(texts)
        return tokenize(tokenizer, texts, context_length)

    monkeypatch.setattr(data.loader, 'tokenize', recording_tokenize)
    loader = build_train_loader(config, tokenizer, rank=0, world_size=1)
    batches = list(loader)
    labels = torch.cat([labels for _, _, labels in batches])
    tokens = torch.cat([tokens['input_ids'] for _, tokens, _ in batches])
    return seen, (labels < loader.setup.labels.num_classes).tolist(), tokens


def test_training_texts_carry_their_kinds_prefix_only_when_on(tiny_data, tokenizer, monkeypatch):
    plain, is_label, plain_tokens = _training_texts(tiny_data, tokenizer, monkeypatch)
    assert any(is_label) and not all(is_label)  # both kinds in the batches
    assert not any(text.startswith(('label:', 'caption:')) for text in plain)
    prefixed, same_kinds, tokens = _training_texts(tiny_data, tokenizer, monkeypatch, *WORDS)
    assert same_kinds == is_label
    assert prefixed == [('label: ' if label else 'caption: ') + text for text, label in zip(plain, is_label)]
    # Token level: start, the prefix's tokens, then the text's tokens as they were.
    for row, plain_row, label in zip(tokens, plain_tokens, is_label):
        prefix = tokenizer('label: ' if label else 'caption: ', add_special_tokens=False)['input_ids']
        assert row[1:1 + len(prefix)].tolist() == prefix
        assert torch.equal(row[1 + len(prefix):], plain_row[1:len(plain_row) - len(prefix)])
    other, _, _ = _training_texts(tiny_data, tokenizer, monkeypatch, *WORDS, 'DATA.TEXT_PREFIX_LABEL', "'cls '",
                                  'DATA.TEXT_PREFIX_CAPTION', "''")
    assert other == [('cls ' if label else '') + text for text, label in zip(plain, is_label)]


def test_the_prefix_counts_against_the_context_length(tokenizer):
    caption = ' '.join(['word'] * 100)
    for prefix in ('label: ', 'caption: '):
        ids = tokenize(tokenizer, [prefix + caption], 77)['input_ids'][0]
        prefix_ids = tokenizer(prefix, add_special_tokens=False)['input_ids']
        assert ids.shape == (77,) and ids[-1].item() == tokenizer.eos_token_id  # truncated, end token kept
        assert ids[1:1 + len(prefix_ids)].tolist() == prefix_ids  # truncation cuts the caption, not the prefix
    TextPrefix('label: ', 'caption: ').check_fits(tokenizer, 5)  # 2 prefix tokens + start + end < 5
    with pytest.raises(ValueError, match=r"DATA.TEXT_PREFIX_CAPTION 'caption: ' is 2 tokens: .*\.CONTEXT_LENGTH 4"):
        TextPrefix('', 'caption: ').check_fits(tokenizer, 4)


class _RecordingEncoder:
    """Stands in for evaluation.Encoder: records the texts it encodes, returns random unit features."""

    def __init__(self, config):
        self.config, self.seen = config, []
        self.logit_scale = torch.tensor(1.0)

    def texts(self, texts, desc=''):
        self.seen.extend(texts)
        return F.normalize(torch.randn(len(texts), 4), dim=-1)

    def images(self, items, desc=''):
        return F.normalize(torch.randn(len(items), 4), dim=-1)


@pytest.mark.parametrize('opts, prefix', [((), ''), (WORDS, 'label: '),
                                          ((*WORDS, 'DATA.TEXT_PREFIX_ZEROSHOT', 'caption'), 'caption: ')],
                         ids=['off', 'label', 'caption'])
def test_zeroshot_prompts_carry_the_zeroshot_kinds_prefix(opts, prefix):
    encoder = _RecordingEncoder(tiny_config(*opts))
    class_embeddings(encoder, ['dog', 'red car'], ['a photo of a {}.', 'a {}.'])
    assert encoder.seen == [prefix + text for text in ('a photo of a dog.', 'a dog.', 'a photo of a red car.',
                                                       'a red car.')]


@pytest.mark.parametrize('opts, prefix', [((), ''), (WORDS, 'caption: ')], ids=['off', 'on'])
def test_retrieval_captions_carry_the_caption_prefix(tiny_data, opts, prefix):
    encoder = _RecordingEncoder(tiny_config(*opts))
    table = os.path.join(tiny_data, 'captions', 'captions.tsv')
    with open(table, encoding='utf-8') as f:
        captions = [line.rstrip('\n').split('\t')[1] for line in f][1:]
    run_retrieval(encoder, table)
    assert sorted(encoder.seen) == sorted(prefix + caption for caption in captions)


@pytest.mark.parametrize('key, value, allowed', [
    ('DATA.TEXT_PREFIX', 'learned', "one of the known values '', 'words'"),
    ('DATA.TEXT_PREFIX_ZEROSHOT', 'both', "one of the known values 'caption', 'label'"),
    ('DATA.TEXT_PREFIX_LABEL', "'  '", "'' or a text with a non-blank character"),
])
def test_prefix_keys_are_checked(key, value, allowed):
    with pytest.raises(ConfigError, match=f'config key {key} .* is invalid: must be {allowed}'):
        tiny_config(key, value)
