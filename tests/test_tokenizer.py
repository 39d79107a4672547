import json
import os

import pytest
import torch
from transformers.utils import is_torch_available

from model.tokenizer import VOCAB_SIZE, tokenize

REFERENCE = os.path.join(os.path.dirname(__file__), 'data', 'clip_token_ids.json')
with open(REFERENCE) as f:
    EXAMPLES = json.load(f)['examples']


@pytest.mark.parametrize('example', EXAMPLES, ids=[e['text'][:30] for e in EXAMPLES])
def test_ids_match_clip(tokenizer, example):
    assert tokenizer(example['text'])['input_ids'] == example['ids']


def test_vocabulary_and_special_ids(tokenizer):
    assert len(tokenizer) == VOCAB_SIZE == 49408
    assert tokenizer.bos_token_id == 49406 and tokenizer.eos_token_id == 49407 == tokenizer.pad_token_id


def test_padding_and_truncation_as_official_call(tokenizer):
    long_text = 'a photo of a very ' + 'very ' * 100 + 'long dog.'
    tokens = tokenize(tokenizer, ['a photo of a cat.', long_text])
    ids = tokens['input_ids']
    assert ids.shape == (2, 77) and ids.dtype == tokens['attention_mask'].dtype == torch.int64
    assert tokens['attention_mask'].sum(-1).tolist() == [8, 77]
    assert ids[0, :8].tolist() == EXAMPLES[0]['ids'] and (ids[0, 8:] == 49407).all()
    assert ids[1, 76] == 49407  # truncation keeps the end-of-text token
    assert ids.argmax(-1).tolist() == [7, 76]  # the feature position: the first end-of-text token


@pytest.mark.skipif(not is_torch_available(), reason='transformers hands out torch tensors only beside torch >= 2.6')
def test_tokenize_equals_the_official_call(tokenizer):
    texts = ['a photo of a cat.', 'an ' + 'extremely ' * 90 + 'long caption', '']
    official = tokenizer(texts, padding='max_length', truncation=True, max_length=77, return_tensors='pt')
    ours = tokenize(tokenizer, texts)
    assert set(ours) == {'input_ids', 'attention_mask'}
    for key in ours:
        assert torch.equal(ours[key], official[key].long())


def test_tokenize_works_where_transformers_offers_no_torch_tensors(tokenizer, monkeypatch):
    """transformers 5 beside torch < 2.6 behaves as if torch were missing: 'pt' tensors raise. `tokenize`
    must not depend on them (the project runs on torch 2.4)."""
    import transformers.tokenization_utils_base as base
    monkeypatch.setattr(base, 'is_torch_available', lambda: False)
    with pytest.raises(ImportError):
        tokenizer(['a cat'], padding='max_length', max_length=77, return_tensors='pt')
    tokens = tokenize(tokenizer, ['a photo of a cat.'])
    assert tokens['input_ids'][0, :8].tolist() == EXAMPLES[0]['ids'] and tokens['input_ids'].shape == (1, 77)
