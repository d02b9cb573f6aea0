"""The rows that bound or rival jaxlora in ``bench_train_step.py``: floors and qwix's LoRA.

A *floor* row trains the frozen model on only the biases of the adapter's target layers. Its step
does the forward and every input gradient that any adapter on those layers needs, and no adapter
work, so no LoRA implementation of the same targets can step faster on the same framework:
``adapter / floor`` is what the adapter itself costs, and ``JAX floor / PyTorch floor`` is how the
frameworks compare on the frozen model alone.
"""

from __future__ import annotations

import jax
from flax import nnx, traverse_util

from experiments.benchmarks import models_gpt
from experiments.benchmarks.bench_jax_runner import JaxRunner


def _is_target_bias(path, targets) -> bool:
    # dict and nnx.State keys (``.key``), Equinox module fields (``.name``)
    names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
    return len(names) >= 2 and names[-1] == "bias" and names[-2] in targets


def linen_floors(group, model, params, batch, floors) -> list[JaxRunner]:
    """A floor row (see the module docstring) for each ``(name, target layer names)``."""
    return function_floors(group, lambda p, x: model.apply({"params": p}, x), params, batch, floors)


def function_floors(group, fn, params, batch, floors) -> list[JaxRunner]:
    """:func:`linen_floors` for a model that is a function ``fn(params, inputs)``."""
    flat = traverse_util.flatten_dict(params)
    rows = []
    for name, targets in floors:
        biases = {k: v for k, v in flat.items() if _is_target_bias(k, targets)}
        rest = {k: v for k, v in flat.items() if k not in biases}

        def forward(t, f, inputs, key):
            return fn(traverse_util.unflatten_dict({**f, **t}), inputs)

        rows.append(JaxRunner(name, group, forward, biases, rest, batch))
    return rows


def nnx_floors(c, batch, floors) -> list[JaxRunner]:
    """:func:`linen_floors` for the NNX GPT (``nnx.split`` by a path filter)."""
    rows = []
    for name, targets in floors:
        is_bias = lambda path, _, targets=targets: _is_target_bias(path, targets)  # noqa: E731
        graphdef, biases, rest = nnx.split(models_gpt.init_nnx(c), is_bias, ...)

        def forward(t, f, inputs, key, graphdef=graphdef):
            return nnx.merge(graphdef, t, f)(inputs)

        rows.append(JaxRunner(name, "nnx", forward, biases, rest, batch))
    return rows


def equinox_floors(group, fn, arrays, batch, floors) -> list[JaxRunner]:
    """:func:`linen_floors` for an Equinox model as a function ``fn(arrays, inputs)`` of its
    ``eqx.partition`` arrays, split again by leaf path (``eqx.partition`` / ``eqx.combine``)."""
    import equinox as eqx  # the optional extra: only this group needs it

    rows = []
    for name, targets in floors:
        is_bias = lambda path, _, targets=targets: _is_target_bias(path, targets)  # noqa: E731
        biases, rest = eqx.partition(arrays, jax.tree.map_with_path(is_bias, arrays))

        def forward(t, f, inputs, key):
            return fn(eqx.combine(t, f), inputs)

        rows.append(JaxRunner(name, group, forward, biases, rest, batch))
    return rows


def qwix_rows(args, c, batch) -> list[JaxRunner]:
    """qwix's LoRA on the same NNX model, same targets and rank (skipped if qwix is missing)."""
    try:
        import qwix
    except ImportError:
        print("qwix is not installed (`pip install qwix`): its rows are skipped")
        return []
    rows = []
    all_linear = r".*(query|key|value|out|fc_in|fc_out)"
    for name, pattern in [("qwix q,v", r".*(query|value)"), ("qwix all-linear", all_linear)]:
        rule = qwix.LoraRule(module_path=pattern, rank=args.r, alpha=args.alpha)
        provider = qwix.LoraProvider([rule])
        model = qwix.apply_lora_to_model(models_gpt.init_nnx(c), provider, batch[:, :-1])
        graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

        def forward(t, f, inputs, key, graphdef=graphdef):
            return nnx.merge(graphdef, t, f)(inputs)

        rows.append(JaxRunner(name, "nnx", forward, lora, rest, batch))
    return rows
