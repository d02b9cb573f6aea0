"""Text generation with a KV cache, for the Llama and Gemma decoders.

* :mod:`~jaxlora.models.decoding.generation`: :func:`generate` (greedy, temperature / top-k /
  top-p, stop tokens, left-padded batches; an adapter factored, merged or one per row) and
  :func:`step_function`.
* :mod:`~jaxlora.models.decoding.inputs`: :func:`left_pad` and the checks of prompts and options.
* :mod:`~jaxlora.models.decoding.kv_cache`: the :class:`KVCache` the decoders take as ``cache=``.
* :mod:`~jaxlora.models.decoding.sampling`: :func:`sample_logits`.
"""

from jaxlora.models.decoding.generation import GenerationResult as GenerationResult
from jaxlora.models.decoding.generation import generate as generate
from jaxlora.models.decoding.generation import step_function as step_function
from jaxlora.models.decoding.inputs import left_pad as left_pad
from jaxlora.models.decoding.kv_cache import KVCache as KVCache
from jaxlora.models.decoding.kv_cache import cache_positions as cache_positions
from jaxlora.models.decoding.sampling import sample_logits as sample_logits

__all__ = [
    "GenerationResult",
    "KVCache",
    "cache_positions",
    "generate",
    "left_pad",
    "sample_logits",
    "step_function",
]
