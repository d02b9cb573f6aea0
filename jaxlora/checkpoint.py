"""Adapter checkpoints with orbax: Θ's bytes, its config as JSON, and optionally optimizer state.

:func:`checkpoint_manager` opens a checkpoint directory (the first save creates it), :func:`save`
writes one step atomically with a sha256 of every array and of the config, :func:`restore` reads one
back, verifies the checksums and checks, before reading any bytes, that it fits the base it is
restored onto. One manager at a time saves into a directory, each new step checked against the
steps on disk (never overwritten, never older than the latest); a closed manager refuses saves,
restores and deletes.
"""

from jaxlora._src.files.orbax import Restored as Restored
from jaxlora._src.files.orbax import restore as restore
from jaxlora._src.files.orbax import save as save
from jaxlora._src.files.orbax_manager import CONFIG_ITEM as CONFIG_ITEM
from jaxlora._src.files.orbax_manager import LORA_ITEM as LORA_ITEM
from jaxlora._src.files.orbax_manager import OPT_STATE_ITEM as OPT_STATE_ITEM
from jaxlora._src.files.orbax_manager import checkpoint_manager as checkpoint_manager

__all__ = [
    "CONFIG_ITEM",
    "LORA_ITEM",
    "OPT_STATE_ITEM",
    "Restored",
    "checkpoint_manager",
    "restore",
    "save",
]
