"""Hugging Face PEFT's rules for choosing modules, restated over module paths.

PEFT decides per PyTorch module name (``"model.layers.0.self_attn.q_proj"``) whether LoRA adapts
it; jaxlora decides per ``/``-joined Flax path (``"model/layers/0/self_attn/q_proj"``). Every rule
here takes the separator, so the same code serves both: :mod:`~jaxlora._src.config.targets` with
``"/"`` and the ``adapter_config.json`` import with ``"."``.

The order of PEFT's decision, kept here: ``exclude_modules`` first, then ``modules_to_save``
(a module inside a module trained in full is never adapted: *saved wins*), then
``target_modules``, and for a list entry that matched as a suffix, ``layers_to_transform``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jaxlora._src import paths
from jaxlora._src.config.peft_layers import in_layers

#: ``(module path, leaf name, shape, layout or None)`` of one kernel or embedding table.
Kernel = tuple[str, str, tuple[int, ...], str | None]
#: The ``target_modules`` shorthand for every Dense kernel but the output embedding (as PEFT).
ALL_LINEAR = "all-linear"

#: Heads PEFT trains in full for each ``task_type`` (its ``PeftModelFor...`` classes add them to
#: ``modules_to_save``). A head the model does not have is skipped without an error. PEFT adds the
#: ``TOKEN_CLS`` / ``QUESTION_ANS`` heads only after placing LoRA, so a head that
#: ``target_modules`` (or ``"all-linear"``) names ends up both adapted and copied there; here every
#: task head is kept out of the targets, as PEFT does for ``SEQ_CLS``.
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
#: Names transformers gives a model's output embedding (``get_output_embeddings()``); used by
#: ``"all-linear"`` next to the shape rule of :func:`output_embeddings`.
OUTPUT_EMBEDDING_NAMES = (
    "lm_head",
    "embed_out",
    "vocab_projector",
    "predictions/decoder",
    "generator_lm_head",
)


#: PEFT's ``TaskType`` values.
TASK_TYPES = (
    "SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"
)  # fmt: skip


def check_task_type(task_type: Any) -> None:
    """A TypeError / ValueError unless ``task_type`` is None or one of PEFT's task types."""
    if task_type is None:
        return
    if not isinstance(task_type, str):
        raise TypeError(f"`task_type` must be a string or None, got {task_type!r}")
    if task_type.upper() not in TASK_TYPES:
        close = difflib.get_close_matches(task_type.upper(), TASK_TYPES, n=1, cutoff=0.4)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"`task_type`={task_type!r} is not one of PEFT's task types {TASK_TYPES} (or None)"
            f"{hint}"
        )


def task_heads(task_type: str | None) -> tuple[str, ...]:
    """The heads ``task_type`` adds to ``modules_to_save`` (none for other task types)."""
    return TASK_HEADS.get(str(task_type).upper(), ()) if task_type else ()


def within(name: str, path: str, sep: str = "/") -> bool:
    """Whether ``path`` is the module ``name`` or lies inside it (``name`` bounded by ``sep``).

    >>> within("classifier", "roberta/classifier/dense"), within("classifier", "my_classifier")
    (True, False)
    """
    s = re.escape(sep)
    return re.search(f"(?:^|{s}){re.escape(name)}(?:$|{s})", path) is not None


def _names_match(spec: str | Sequence[str], path: str, sep: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == n or path.endswith(sep + n) for n in spec)


def is_target(
    spec: str | Sequence[str],
    path: str,
    *,
    exclude: str | Sequence[str] | None = None,
    saved: Iterable[str] = (),
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    sep: str = "/",
) -> bool:
    """PEFT's decision for one module: excluded, saved (saved wins), then targeted.

    ``spec`` is a regex (full-matched) or a list of names (the whole path, or a suffix after
    ``sep``). As in PEFT, ``layers_to_transform`` filters only suffix hits: a list entry naming
    the whole path, or a regex, is taken as it is.

    >>> is_target(["dense"], "classifier/dense", saved=["classifier"])
    False
    >>> is_target(["q"], "model/layers/1/q", layers_to_transform=[0, 2])
    False
    """
    if exclude and _names_match(exclude, path, sep):
        return False
    if any(within(name, path, sep) for name in saved):
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    if path in spec:
        return True
    if not any(path.endswith(sep + name) for name in spec):
        return False
    return in_layers(path, layers_to_transform, layers_pattern, sep)


def is_all_linear(spec: Any) -> bool:
    """Whether ``target_modules`` is the ``"all-linear"`` shorthand (any case, as PEFT reads it)."""
    return isinstance(spec, str) and spec.lower() == ALL_LINEAR


def peft_adapts(peft: Mapping[str, Any], name: str) -> bool:
    """PEFT's choice for the PyTorch module ``name`` under an ``adapter_config.json`` ``peft``.

    ``"all-linear"`` passes every name (the caller keeps only the linear modules). An empty
    ``layers_to_transform`` or ``layers_pattern`` means unset, as in PEFT.
    """
    spec = peft.get("target_modules")
    if spec is None:
        return False
    unset = lambda value: None if value in ("", [], ()) else value  # noqa: E731
    return is_target(
        [name] if is_all_linear(spec) else spec,
        name,
        exclude=peft.get("exclude_modules") or None,
        saved=saved_modules(peft.get("modules_to_save"), peft.get("task_type")),
        layers_to_transform=unset(peft.get("layers_to_transform")),
        layers_pattern=unset(peft.get("layers_pattern")),
        sep=".",
    )


def _in_block(path: str) -> bool:
    """Whether an ancestor of ``path`` is one of a list of layers (``layers/3``, ``layer_3``)."""
    return any(re.fullmatch(r"(?:.*_)?\d+", part) for part in path.split("/")[:-1])


def output_embeddings(
    kernels: Iterable[tuple[str, tuple[int, ...], str | None]],
    embedding_rows: Iterable[int],
) -> set[str]:
    """The output embedding(s) of a params tree, which ``"all-linear"`` leaves alone.

    PEFT asks the PyTorch model (``get_output_embeddings()``); a params tree cannot be asked, so
    the tree's shapes answer instead: the output embedding is the Dense kernel outside any layer
    block (not under ``layers/3`` or ``layer_3``, not stacked) whose output size equals the row
    count of an embedding table (the vocabulary): the shallowest such, the last on a tie. The
    names transformers uses (:data:`OUTPUT_EMBEDDING_NAMES`) are taken too, for trees that hold no
    embedding table or an untied head of another size. No config field overrides this:
    ``exclude_modules`` removes a head this misses, and an explicit ``target_modules`` list adapts
    a layer it takes wrongly (neither case fits in a PEFT ``adapter_config.json`` otherwise).

    Args:
        kernels: ``(module path, kernel shape, layout or None)`` of every kernel.
        embedding_rows: the row counts of the tree's 2-D embedding tables.

    >>> kernels = [("embed_out", (8, 50), "io"), ("layers/0/mlp", (8, 50), "io")]
    >>> sorted(output_embeddings(kernels, [50]))
    ['embed_out']
    """
    vocab = set(embedding_rows)
    found: set[str] = set()
    by_shape: list[str] = []
    for path, shape, layout in kernels:
        if _in_block(path) or (layout or "").strip("io"):
            continue
        if layout == "io" and shape[-1] in vocab:
            by_shape.append(path)
        if any(path == n or path.endswith("/" + n) for n in OUTPUT_EMBEDDING_NAMES):
            found.add(path)
    if by_shape:
        depth = min(p.count("/") for p in by_shape)
        found.add([p for p in by_shape if p.count("/") == depth][-1])
    return found


def saved_modules(modules_to_save: Sequence[str] | None, task_type: str | None) -> tuple[str, ...]:
    """``modules_to_save`` followed by the heads ``task_type`` adds, without repeats."""
    return tuple(dict.fromkeys(tuple(modules_to_save or ()) + task_heads(task_type)))


def _no_match(config: Any, kernels: Sequence[Kernel], saved: tuple[str, ...]) -> ValueError:
    spec, seen = config.target_modules, [k[0] for k in kernels]
    notes = (
        [f"after `exclude_modules`={config.exclude_modules!r}"] if config.exclude_modules else []
    )
    taken = [p for p in seen if any(within(n, p) for n in saved)]
    if taken:
        notes.append(
            f"`modules_to_save` (with the heads of `task_type`) takes {paths.preview(taken)}"
        )
    if config.layers_to_transform is not None:
        notes.append(
            f"`layers_to_transform`={config.layers_to_transform!r} keeps only modules whose path "
            f"has a layer index after `layers_pattern`={config.layers_pattern!r}"
        )
    where = f" ({'; '.join(notes)})" if notes else ""
    return ValueError(
        f"no module matched `target_modules`={spec!r}{where}; modules seen: {paths.preview(seen)}"
    )


def select(config: Any, kernels: Sequence[Kernel]) -> list[bool]:
    """Which of ``kernels`` (``(path, leaf name, shape, layout)``) a ``LoraConfig`` adapts.

    ``"all-linear"`` takes every Dense kernel (no embedding table, no convolution) except the
    :func:`output_embeddings`; a module in ``modules_to_save`` or a task head is never adapted.

    Raises:
        ValueError: when ``target_modules`` is None, an ``exclude_modules`` entry names no
            module, or nothing is chosen (the message says which rule took what).
    """
    spec, excluded = config.target_modules, config.exclude_modules
    seen = [k[0] for k in kernels]
    if spec is None:
        raise ValueError(
            "`target_modules` is None: say which modules to adapt, e.g. ['query', 'value'], a "
            f"regex, or 'all-linear'. Modules seen: {paths.preview(seen)}"
        )
    if excluded is not None:
        regex = isinstance(excluded, str)
        unused = [
            n
            for n in ([excluded] if regex else excluded)
            if not any(_names_match(n if regex else [n], p, "/") for p in seen)
        ]
        if unused:
            raise ValueError(
                f"`exclude_modules` {'regex' if regex else 'entries'} {unused} match no module "
                f"(a regex is full-matched against the path); modules seen: {paths.preview(seen)}"
            )
    saved = saved_modules(config.modules_to_save, config.task_type)
    if spec == ALL_LINEAR:
        heads = output_embeddings(
            [(p, s, lay) for p, leaf, s, lay in kernels if leaf == "kernel"],
            [s[0] for _, leaf, s, _ in kernels if leaf == "embedding" and len(s) == 2],
        )
        chosen = [
            leaf == "kernel"
            and "w" not in (lay or "")
            and p not in heads
            and is_target([p], p, exclude=excluded, saved=saved)
            for p, leaf, _, lay in kernels
        ]
    else:
        chosen = [
            is_target(
                spec,
                p,
                exclude=excluded,
                saved=saved,
                layers_to_transform=config.layers_to_transform,
                layers_pattern=config.layers_pattern,
            )
            for p in seen
        ]
    if not any(chosen):
        raise _no_match(config, kernels, saved)
    return chosen
