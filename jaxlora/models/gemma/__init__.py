"""The Gemma family: Gemma 1/2/3 decoders.

* :mod:`~jaxlora.models.gemma.model`: :class:`GemmaForCausalLM` and :func:`init_cache`; its parts
  are :mod:`~jaxlora.models.gemma.config` (:class:`GemmaConfig`, the layer kinds :data:`FULL` and
  :data:`SLIDING`) and :mod:`~jaxlora.models.gemma.layers`.

Gemma weights come from Hugging Face checkpoints: :func:`jaxlora.models.hf.load_hf_gemma` reads
them and :func:`jaxlora.models.hf.save_hf` writes them (:mod:`jaxlora.models.hf`).
"""

from jaxlora.models.gemma.model import FULL as FULL
from jaxlora.models.gemma.model import SLIDING as SLIDING
from jaxlora.models.gemma.model import GemmaConfig as GemmaConfig
from jaxlora.models.gemma.model import GemmaForCausalLM as GemmaForCausalLM
from jaxlora.models.gemma.model import init_cache as init_cache

__all__ = ["FULL", "SLIDING", "GemmaConfig", "GemmaForCausalLM", "init_cache"]
