"""The Llama family: the decoder, its parts, and SmolLM2's weights from a GGUF file.

* :mod:`~jaxlora.models.llama.model`: :class:`LlamaForCausalLM` and :func:`init_cache`; its parts
  are :mod:`~jaxlora.models.llama.config`, :mod:`~jaxlora.models.llama.layers` and
  :mod:`~jaxlora.models.llama.rope`; :mod:`~jaxlora.models.llama.greedy`: an uncached greedy
  :func:`generate`.
* :mod:`~jaxlora.models.llama.weights`: :func:`load_smollm2` (dequantised), its tokenizer and
  :func:`chat_prompt`; :mod:`~jaxlora.models.llama.gguf`: :func:`load_gguf_llama`, the same file
  with its Q4_1 kernels kept 4-bit.

Hugging Face checkpoints of the family are read and written by :mod:`jaxlora.models.hf`.
"""

from jaxlora.models.llama.gguf import load_gguf_llama as load_gguf_llama
from jaxlora.models.llama.greedy import generate as generate
from jaxlora.models.llama.model import Llama3RopeScaling as Llama3RopeScaling
from jaxlora.models.llama.model import LlamaConfig as LlamaConfig
from jaxlora.models.llama.model import LlamaForCausalLM as LlamaForCausalLM
from jaxlora.models.llama.model import apply_rope as apply_rope
from jaxlora.models.llama.model import init_cache as init_cache
from jaxlora.models.llama.model import rope_frequencies as rope_frequencies
from jaxlora.models.llama.weights import chat_prompt as chat_prompt
from jaxlora.models.llama.weights import load_smollm2 as load_smollm2
from jaxlora.models.llama.weights import load_smollm2_tokenizer as load_smollm2_tokenizer

__all__ = [
    "Llama3RopeScaling",
    "LlamaConfig",
    "LlamaForCausalLM",
    "apply_rope",
    "chat_prompt",
    "generate",
    "init_cache",
    "load_gguf_llama",
    "load_smollm2",
    "load_smollm2_tokenizer",
    "rope_frequencies",
]
