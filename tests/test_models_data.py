"""The packaged text data sets, the train/test split and batch tokenisation."""

import numpy as np
import pytest

from jaxlora.models import data
from jaxlora.models.bert import weights as bert_weights


@pytest.fixture(scope="module")
def tokenizer():
    return bert_weights.load_minilm_tokenizer()


def test_rotten_tomatoes():
    texts, labels = data.rotten_tomatoes()
    assert len(texts) == len(labels) == 12_752
    assert len(set(texts)) == len(texts)
    assert labels.dtype == np.int32
    assert np.bincount(labels).tolist() == [5384, 7368]  # rotten, fresh
    assert texts[0] == "A three-hour cinema master class." and labels[0] == 1


def test_hamlet_text():
    text = data.hamlet_text()
    assert len(text) > 150_000
    assert "To be, or not to be" in text


@pytest.mark.parametrize(("num_examples", "test_fraction"), [(10, 0.3), (12_752, 0.2), (3, 0.5)])
def test_train_test_split_partitions_reproducibly(num_examples, test_fraction):
    train, test = data.train_test_split(num_examples, test_fraction, seed=3)
    assert len(test) == round(num_examples * test_fraction)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(num_examples))
    again_train, again_test = data.train_test_split(num_examples, test_fraction, seed=3)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(test, again_test)


def test_train_test_split_is_pinned():
    # A fixed hash, not a random-number generator: the same on every machine and numpy version.
    assert data.train_test_split(10, 0.3, seed=0)[1].tolist() == [0, 2, 6]
    assert data.train_test_split(10, 0.3, seed=1)[1].tolist() == [6, 7, 8]


def test_train_test_split_errors():
    with pytest.raises(ValueError, match=r"`test_fraction` must be in \(0, 1\), got 1.0"):
        data.train_test_split(10, 1.0)
    with pytest.raises(ValueError, match="leaves a split empty"):
        data.train_test_split(3, 0.1)
    with pytest.raises(ValueError, match="`seed` must be a non-negative 64-bit integer, got -1"):
        data.train_test_split(10, 0.5, seed=-1)


def test_encode_batch_pads_and_truncates(tokenizer):
    ids, mask = data.encode_batch(tokenizer, ["hello world", "a much longer sentence " * 5], 8)
    assert ids.shape == mask.shape == (2, 8)
    assert ids.dtype == mask.dtype == np.int32
    assert ids[0].tolist() == [101, 7592, 2088, 102, 0, 0, 0, 0]
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert mask[1].all() and ids[1, 0] == 101 and ids[1, -1] == 102


def test_encode_batch_leaves_tokenizer_settings_alone(tokenizer):
    before = (tokenizer.truncation, tokenizer.padding)
    data.encode_batch(tokenizer, ["x"], 4, pad_id=7)
    assert (tokenizer.truncation, tokenizer.padding) == before
    assert data.encode_batch(tokenizer, ["x"], 4, pad_id=7)[0][0, -1] == 7


def test_encode_batch_errors(tokenizer):
    with pytest.raises(TypeError, match="got a single str"):
        data.encode_batch(tokenizer, "hello", 8)
    with pytest.raises(ValueError, match="`max_length` must be positive, got 0"):
        data.encode_batch(tokenizer, ["hello"], 0)
