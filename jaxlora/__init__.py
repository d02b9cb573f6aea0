"""jaxlora: LoRA (Hu et al., 2021) for JAX/Flax as pure functions over parameter pytrees.

The data path, stage by stage (each stage's implementation lives in ``jaxlora/_src/<stage>/``):

* config and targets: :class:`LoraConfig`, :func:`find_targets`, :func:`infer_layouts`;
* split and merge: :func:`split`, :func:`merge`, :func:`unmerge`, :func:`delta`, :func:`count`;
* forward paths: :func:`apply` (linen and NNX, factored or merged), :func:`lora_interceptor`
  with :func:`adapted_params`, :func:`factored` (any JAX function of a params pytree);
* optimisation: :func:`freeze`, :func:`partition`, :func:`trainable_mask`, :mod:`jaxlora.loraplus`;
* files: :mod:`jaxlora.checkpoint` (orbax), :mod:`jaxlora.peft` (PEFT's format);
* quantised bases: :mod:`jaxlora.quant`; variants (DoRA) and inits: :mod:`jaxlora.variants`,
  :mod:`jaxlora.inits`;
* many adapters: :mod:`jaxlora.adapters`; sharding: :mod:`jaxlora.sharding`;
* memory: :mod:`jaxlora.remat`; what an adapter learned: :mod:`jaxlora.analysis`.
"""

from jaxlora import adapters as adapters
from jaxlora import analysis as analysis
from jaxlora import checkpoint as checkpoint
from jaxlora import inits as inits
from jaxlora import loraplus as loraplus
from jaxlora import peft as peft
from jaxlora import quant as quant
from jaxlora import remat as remat
from jaxlora import sharding as sharding
from jaxlora import variants as variants
from jaxlora._src.config.layouts import infer_layouts as infer_layouts
from jaxlora._src.config.lora_config import LoraConfig as LoraConfig
from jaxlora._src.config.targets import Target as Target
from jaxlora._src.config.targets import find_targets as find_targets
from jaxlora._src.config.targets import module_paths as module_paths
from jaxlora._src.files.peft import load_peft as load_peft
from jaxlora._src.files.peft import save_peft as save_peft
from jaxlora._src.forward.adapted import adapted_params as adapted_params
from jaxlora._src.forward.apply import apply as apply
from jaxlora._src.forward.linen import lora_interceptor as lora_interceptor
from jaxlora._src.forward.transform import factored as factored
from jaxlora._src.multi.bank import AdapterBank as AdapterBank
from jaxlora._src.optim.masks import freeze as freeze
from jaxlora._src.optim.masks import partition as partition
from jaxlora._src.optim.masks import trainable_labels as trainable_labels
from jaxlora._src.optim.masks import trainable_mask as trainable_mask
from jaxlora._src.sharding.init import init_sharded as init_sharded
from jaxlora._src.sharding.specs import lora_shardings as lora_shardings
from jaxlora._src.tree.combined import combine as combine
from jaxlora._src.tree.core import delta as delta
from jaxlora._src.tree.core import merge as merge
from jaxlora._src.tree.core import split as split
from jaxlora._src.tree.core import unmerge as unmerge
from jaxlora._src.tree.count import ParamCount as ParamCount
from jaxlora._src.tree.count import count as count
from jaxlora._src.types import LoraTree as LoraTree
from jaxlora._src.types import Params as Params

__version__ = "0.1.0"

__all__ = [
    "AdapterBank",
    "LoraConfig",
    "LoraTree",
    "ParamCount",
    "Params",
    "Target",
    "adapted_params",
    "adapters",
    "analysis",
    "apply",
    "checkpoint",
    "combine",
    "count",
    "delta",
    "factored",
    "find_targets",
    "freeze",
    "infer_layouts",
    "init_sharded",
    "inits",
    "load_peft",
    "lora_interceptor",
    "lora_shardings",
    "loraplus",
    "merge",
    "module_paths",
    "partition",
    "peft",
    "quant",
    "remat",
    "save_peft",
    "sharding",
    "split",
    "trainable_labels",
    "trainable_mask",
    "unmerge",
    "variants",
]
