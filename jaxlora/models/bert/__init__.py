"""The BERT family: all-MiniLM-L6-v2's encoder and its shipped weights.

* :mod:`~jaxlora.models.bert.model`: :class:`BertEncoder`, :class:`BertClassifier` (an encoder and a
  head), :func:`mean_pool`.
* :mod:`~jaxlora.models.bert.weights`: :func:`load_minilm`, :func:`load_minilm_tokenizer` and the
  map between Flax and Hugging Face names.
"""

from jaxlora.models.bert.model import BertClassifier as BertClassifier
from jaxlora.models.bert.model import BertConfig as BertConfig
from jaxlora.models.bert.model import BertEncoder as BertEncoder
from jaxlora.models.bert.model import mean_pool as mean_pool
from jaxlora.models.bert.weights import load_minilm as load_minilm
from jaxlora.models.bert.weights import load_minilm_tokenizer as load_minilm_tokenizer

__all__ = [
    "BertClassifier",
    "BertConfig",
    "BertEncoder",
    "load_minilm",
    "load_minilm_tokenizer",
    "mean_pool",
]
