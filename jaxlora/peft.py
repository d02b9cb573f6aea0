"""Hugging Face PEFT's adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

:func:`save_peft` writes an adapter that PEFT loads onto the PyTorch model; :func:`load_peft`
reads one PEFT wrote, checking every tensor against the base. :func:`config_from_peft` and
:func:`peft_config` translate the configs; a :data:`ModuleName` function maps flax module paths to
PyTorch module names (:func:`default_module_name` when the two agree).
"""

from jaxlora._src.files.peft import CONFIG_FILE as CONFIG_FILE
from jaxlora._src.files.peft import WEIGHTS_FILE as WEIGHTS_FILE
from jaxlora._src.files.peft import load_peft as load_peft
from jaxlora._src.files.peft import save_peft as save_peft
from jaxlora._src.files.peft_config import config_from_peft as config_from_peft
from jaxlora._src.files.peft_config import default_module_name as default_module_name
from jaxlora._src.files.peft_config import peft_config as peft_config
from jaxlora._src.files.peft_layout import PREFIX as PREFIX
from jaxlora._src.files.peft_layout import ModuleName as ModuleName

__all__ = [
    "CONFIG_FILE",
    "PREFIX",
    "WEIGHTS_FILE",
    "ModuleName",
    "config_from_peft",
    "default_module_name",
    "load_peft",
    "peft_config",
    "save_peft",
]
