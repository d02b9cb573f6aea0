"""Shared argument validators for the public boundary.

Every public function checks its arguments where they enter, with these helpers, so that a wrong
input is a ``TypeError`` (wrong kind) or ``ValueError`` (right kind, wrong value) whose message
names the argument in backticks, the leaf path where there is one, what was expected and what
came. Each helper returns the value normalised (an ``int``, a ``float``, a tuple of names), so a
caller writes ``rank = validate.positive_int("rank", rank)``.

Dtypes are judged with JAX's helpers (``jnp.issubdtype``), under which ``bfloat16`` and the fp8
types are floating; ``np.issubdtype`` would call them not floating. A traced value (inside
``jax.jit``) has no concrete value: its kind and dtype are checked, its values are not.
"""

from jaxlora._src.validate.arrays import array as array
from jaxlora._src.validate.arrays import array_like as array_like
from jaxlora._src.validate.arrays import float_dtype as float_dtype
from jaxlora._src.validate.arrays import int_tuple as int_tuple
from jaxlora._src.validate.core import fail_type as fail_type
from jaxlora._src.validate.core import is_floating as is_floating
from jaxlora._src.validate.core import is_traced as is_traced
from jaxlora._src.validate.scalars import boolean as boolean
from jaxlora._src.validate.scalars import function as function
from jaxlora._src.validate.scalars import integer as integer
from jaxlora._src.validate.scalars import mapping as mapping
from jaxlora._src.validate.scalars import number as number
from jaxlora._src.validate.scalars import one_of as one_of
from jaxlora._src.validate.scalars import optional_positive_int as optional_positive_int
from jaxlora._src.validate.scalars import path as path
from jaxlora._src.validate.scalars import positive_int as positive_int
from jaxlora._src.validate.scalars import prng_key as prng_key
from jaxlora._src.validate.scalars import probability as probability
from jaxlora._src.validate.scalars import sequence as sequence
from jaxlora._src.validate.scalars import str_sequence as str_sequence
from jaxlora._src.validate.scalars import string as string
from jaxlora._src.validate.trees import dataclass_fields as dataclass_fields
from jaxlora._src.validate.trees import pytree as pytree
from jaxlora._src.validate.trees import tree as tree
