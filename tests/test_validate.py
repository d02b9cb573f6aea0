"""The shared argument validators (``jaxlora/_src/validate.py``): each message names the argument
and what was expected; bfloat16 is floating; traced values are checked by kind, never by value."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora._src import validate


@pytest.mark.parametrize(
    ("check", "value", "error", "match"),
    [
        (validate.integer, True, TypeError, r"`n` must be an int, got True"),
        (validate.integer, 1.0, TypeError, r"`n` must be an int, got 1.0"),
        (validate.positive_int, 0, ValueError, r"`n` must be an int >= 1, got 0"),
        (validate.number, "1", TypeError, r"`n` must be a real number, got '1'"),
        (validate.number, math.nan, ValueError, r"`n` must be a finite number, got nan"),
        (validate.number, -math.inf, ValueError, r"`n` must be a finite number"),
        (validate.probability, 1.0, ValueError, r"`n` must be in \[0, 1\), got 1.0"),
        (validate.probability, -0.5, ValueError, r"`n` must be >= 0.0"),
        (validate.boolean, "False", TypeError, r"`n` must be a bool \(True or False\)"),
        (validate.string, "", ValueError, r"`n` must be a non-empty str"),
        (validate.str_sequence, "emb", TypeError, r"`n` must be a list of strings, got the "
         r"string 'emb'; wrap it: \['emb'\]"),
        (validate.str_sequence, ["a", 1], TypeError, r"`n\[1\]` must be a non-empty str"),
        (validate.sequence, [], ValueError, r"`n` must not be empty"),
        (validate.mapping, [1], TypeError, r"`n` must be a dict, got a list"),
        (validate.path, "", ValueError, r"`n` must be a non-empty path"),
        (validate.function, 3, TypeError, r"`n` must be a function, got 3"),
        (validate.prng_key, jnp.ones(2), TypeError, r"`n` must be a PRNG key"),
        (validate.float_dtype, "int8", TypeError, r"`n` must be a floating dtype, got int8"),
        (validate.float_dtype, "nope", TypeError, r"`n` must be a floating dtype"),
        (validate.int_tuple, (0, -1), ValueError, r"`n` must be an int >= 0, got -1"),
    ],
)  # fmt: skip
def test_each_validator_names_the_argument(check, value, error, match):
    with pytest.raises(error, match=match):
        check("n", value)


def test_one_of_lists_the_allowed_values():
    with pytest.raises(ValueError, match=r"`mode` must be one of \['a', 'b'\], got 'c'"):
        validate.one_of("mode", "c", ("a", "b"))
    with pytest.raises(TypeError, match=r"`mode` must be one of \['a', 'b'\], got 1"):
        validate.one_of("mode", 1, ("a", "b"))


def test_bfloat16_and_fp8_are_floating():
    for dtype in (jnp.bfloat16, jnp.float8_e4m3fn, jnp.float16, "float32"):
        assert validate.is_floating(dtype)
        assert validate.float_dtype("dtype", dtype) == jnp.dtype(dtype)
    assert not validate.is_floating(jnp.int8)
    validate.array("a", jnp.ones(2, jnp.bfloat16), floating=True)


def test_arrays_by_kind_dtype_rank_and_values():
    validate.array("a", np.ones((2, 3)), ndim=2, nonempty=True, finite=True)
    with pytest.raises(TypeError, match=r"`lora` leaf `up/lora_a` must be an array"):
        validate.array("lora", [1.0], where="up/lora_a")
    with pytest.raises(TypeError, match=r"`a` must be a floating array, got dtype int32"):
        validate.array("a", jnp.ones(2, jnp.int32), floating=True)
    with pytest.raises(ValueError, match=r"`a` must have 2 axes, got shape \(2,\)"):
        validate.array("a", jnp.ones(2), ndim=2)
    with pytest.raises(ValueError, match=r"`a` must not be empty, got shape \(0, 2\)"):
        validate.array("a", jnp.ones((0, 2)), nonempty=True)
    with pytest.raises(ValueError, match=r"`a` holds NaN or inf values"):
        validate.array("a", jnp.array([1.0, jnp.inf]), finite=True)
    with pytest.raises(TypeError, match=r"`a` must be an array of numbers"):
        validate.array_like("a", ["x"])


def test_traced_values_are_checked_by_kind_not_by_value():
    """Under jit an array's values are unknown: its kind, dtype and rank are still checked there,
    its finiteness is not (the NaN below passes, as documented), and a scalar that must be
    concrete (a rank, a probability) is refused with a message that says so."""

    @jax.jit
    def finite_checked(x):
        return validate.array("x", x, floating=True, ndim=1, finite=True)

    assert bool(jnp.isnan(finite_checked(jnp.array([jnp.nan]))).all())
    with pytest.raises(ValueError, match=r"`x` must have 1 axes"):
        finite_checked(jnp.ones((1, 1)))
    with pytest.raises(TypeError, match=r"`p` must be a concrete number \(not traced"):
        jax.jit(lambda p: validate.probability("p", p))(0.5)


def test_dataclass_fields_follow_annotations():
    @dataclasses.dataclass(frozen=True)
    class Config:
        size: int = 2
        token: int = 0
        eps: float = 1e-6
        dropout: float = 0.1
        window: int | None = None
        flag: bool = False

        def __post_init__(self):
            validate.dataclass_fields(self, nonnegative=("token",), probabilities=("dropout",))

    Config(window=None, token=0)
    for kwargs, error, match in [
        ({"size": 0}, ValueError, r"`size` must be an int >= 1, got 0"),
        ({"size": "2"}, TypeError, r"`size` must be an int"),
        ({"token": -1}, ValueError, r"`token` must be an int >= 0"),
        ({"eps": 0.0}, ValueError, r"`eps` must be > 0.0"),
        ({"eps": math.nan}, ValueError, r"`eps` must be a finite number"),
        ({"dropout": 1.0}, ValueError, r"`dropout` must be in \[0, 1\)"),
        ({"window": 0}, ValueError, r"`window` must be an int >= 1"),
        ({"flag": "yes"}, TypeError, r"`flag` must be a bool"),
    ]:
        with pytest.raises(error, match=match):
            Config(**kwargs)
