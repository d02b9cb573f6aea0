"""Many adapters on one frozen base.

* Serving: :class:`AdapterBank` keeps adapters by name, switches between them exactly and
  disables them all; :func:`add_weighted` makes one adapter whose update is a weighted sum.
* Training several at once: :func:`stack` a list of adapters along a new leading axis,
  :func:`pad_rank` them to one rank, and :func:`apply_mixed` runs a batch whose rows each use
  their own adapter; :func:`unstack` and :func:`scale_b` undo and reweight.
"""

from jaxlora._src.multi.bank import METHODS as METHODS
from jaxlora._src.multi.bank import AdapterBank as AdapterBank
from jaxlora._src.multi.bank import add_weighted as add_weighted
from jaxlora._src.multi.sweeps import apply_mixed as apply_mixed
from jaxlora._src.multi.sweeps import pad_rank as pad_rank
from jaxlora._src.multi.sweeps import scale_b as scale_b
from jaxlora._src.multi.sweeps import stack as stack
from jaxlora._src.multi.sweeps import unstack as unstack

__all__ = [
    "METHODS",
    "AdapterBank",
    "add_weighted",
    "apply_mixed",
    "pad_rank",
    "scale_b",
    "stack",
    "unstack",
]
