"""Adapter shardings that follow the base weights' shardings.

For a base kernel sharded by a ``PartitionSpec`` P, ``lora_a`` takes P's input-axis entries and
``lora_b`` its output-axis entries; the rank axis is replicated and stacked axes follow.
:func:`lora_shardings` gives the tree of shardings, :func:`init_sharded` makes the adapter
directly in place, and :func:`factor_specs` is the rule for one kernel.
"""

from jaxlora._src.sharding.init import init_sharded as init_sharded
from jaxlora._src.sharding.specs import factor_specs as factor_specs
from jaxlora._src.sharding.specs import lora_shardings as lora_shardings

__all__ = ["factor_specs", "init_sharded", "lora_shardings"]
