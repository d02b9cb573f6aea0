"""Hugging Face checkpoints in and out, for the Llama family and Gemma.

* :mod:`~jaxlora.models.hf.checkpoint`: the generic reader (``config.json``, safetensors shards
  read straight into their shardings).
* :mod:`~jaxlora.models.hf.llama`: :func:`load_hf` (any supported checkpoint; Gemma ones go to
  :func:`load_hf_gemma`) and :func:`load_hf_llama`; :mod:`~jaxlora.models.hf.llama_config` and
  :mod:`~jaxlora.models.hf.llama_export` translate the Llama family's ``config.json`` in and out.
* :mod:`~jaxlora.models.hf.gemma`: :func:`load_hf_gemma`; :mod:`~jaxlora.models.hf.gemma_config`
  and :mod:`~jaxlora.models.hf.gemma_export` translate Gemma's ``config.json`` in and out.
* :mod:`~jaxlora.models.hf.export`: :func:`save_hf` and :func:`save_hf_merged` (LoRA merged in),
  for both families, loadable by ``transformers``.
"""

from jaxlora.models.hf.export import save_hf as save_hf
from jaxlora.models.hf.export import save_hf_merged as save_hf_merged
from jaxlora.models.hf.gemma import load_hf_gemma as load_hf_gemma
from jaxlora.models.hf.llama import load_hf as load_hf
from jaxlora.models.hf.llama import load_hf_llama as load_hf_llama
from jaxlora.models.hf.llama import peft_module_name as peft_module_name

__all__ = [
    "load_hf",
    "load_hf_gemma",
    "load_hf_llama",
    "peft_module_name",
    "save_hf",
    "save_hf_merged",
]
