"""jaxlora: LoRA (Hu et al., 2021) for JAX/Flax as pure functions over parameter pytrees."""

from jaxlora import adapters as adapters
from jaxlora import analysis as analysis
from jaxlora import checkpoint as checkpoint
from jaxlora import dora as dora
from jaxlora import inits as inits
from jaxlora import loraplus as loraplus
from jaxlora import peft as peft
from jaxlora import quant as quant
from jaxlora import remat as remat
from jaxlora import sweeps as sweeps
from jaxlora.adapters import AdapterBank as AdapterBank
from jaxlora.apply import apply as apply
from jaxlora.config import LoraConfig as LoraConfig
from jaxlora.core import combine as combine
from jaxlora.core import delta as delta
from jaxlora.core import merge as merge
from jaxlora.core import split as split
from jaxlora.core import unmerge as unmerge
from jaxlora.count import ParamCount as ParamCount
from jaxlora.count import count as count
from jaxlora.factored import lora_interceptor as lora_interceptor
from jaxlora.layouts import infer_layouts as infer_layouts
from jaxlora.optim import freeze as freeze
from jaxlora.optim import partition as partition
from jaxlora.optim import trainable_labels as trainable_labels
from jaxlora.optim import trainable_mask as trainable_mask
from jaxlora.peft import load_peft as load_peft
from jaxlora.peft import save_peft as save_peft
from jaxlora.sharding import init_sharded as init_sharded
from jaxlora.sharding import lora_shardings as lora_shardings
from jaxlora.targets import Target as Target
from jaxlora.targets import find_targets as find_targets
from jaxlora.targets import module_paths as module_paths
from jaxlora.types import LoraTree as LoraTree
from jaxlora.types import Params as Params

__version__ = "0.1.0"

__all__ = [
    "AdapterBank",
    "adapters",
    "analysis",
    "apply",
    "checkpoint",
    "dora",
    "inits",
    "loraplus",
    "quant",
    "remat",
    "peft",
    "sweeps",
    "load_peft",
    "lora_interceptor",
    "save_peft",
    "LoraConfig",
    "LoraTree",
    "ParamCount",
    "Params",
    "Target",
    "combine",
    "count",
    "delta",
    "find_targets",
    "freeze",
    "infer_layouts",
    "init_sharded",
    "lora_shardings",
    "merge",
    "module_paths",
    "partition",
    "split",
    "trainable_labels",
    "trainable_mask",
    "unmerge",
]
