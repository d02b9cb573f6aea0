"""Argument checks of :func:`jaxlora.save_peft` / :func:`jaxlora.load_peft`: each wrong value is
named where it enters, before anything is read or written."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

from jaxlora._src import validate
from jaxlora._src.tree.checks import check_lora_tree, require_tree


def check_directory(directory: Any) -> None:
    """A TypeError unless ``directory`` is a path; a ValueError when it is an existing file."""
    if not isinstance(directory, str | os.PathLike):
        raise TypeError(
            "`directory` must be the adapter directory, a str or os.PathLike, got "
            f"{type(directory).__name__}"
        )
    validate.path("directory", directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(
            f"`directory` `{os.fspath(directory)}` is a file, not a directory; pass the adapter "
            "directory (it holds adapter_config.json and adapter_model.safetensors)"
        )


def check_module_name(module_name: Any) -> None:
    """A TypeError unless ``module_name`` is a callable of ``(path, index)``."""
    if not callable(module_name):
        raise TypeError(
            "`module_name` must be a function (flax path, layer index) -> PyTorch module name, "
            f"got {module_name!r:.60}"
        )
    try:
        signature = inspect.signature(module_name)
    except (TypeError, ValueError):  # builtins without a signature: trust them
        return
    try:
        signature.bind("path", ())
    except TypeError:
        raise TypeError(
            f"`module_name` must take two arguments (flax path, layer index), but its signature "
            f"is {signature}"
        ) from None


def check_save_args(lora: Any, module_name: Any, base_model_name_or_path: Any) -> None:
    check_lora_tree(lora, "save_peft")
    check_module_name(module_name)
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(
            "`base_model_name_or_path` must be a str (e.g. a hub id) or None, got "
            f"{base_model_name_or_path!r:.60}"
        )
    if base_model_name_or_path is not None:
        validate.string("base_model_name_or_path", base_model_name_or_path)


def check_frozen(frozen: Any) -> None:
    """A TypeError unless ``frozen`` is a params pytree (any pytree but a lone leaf or None)."""
    require_tree(frozen=frozen)


def check_layouts(layouts: Any) -> None:
    if layouts is not None and not isinstance(layouts, Mapping):
        raise TypeError(
            "`layouts` must be None or a dict {module pattern: layout} (e.g. {'q': 'sioo'}), got "
            f"{layouts!r:.60}"
        )


def check_document(document: Mapping[str, Any], path: str) -> None:
    """A ValueError naming ``path`` and the field when a module selection field has a wrong type."""
    for field in ("target_modules", "exclude_modules", "modules_to_save"):
        value = document.get(field)
        names = isinstance(value, list) and all(isinstance(v, str) for v in value)
        if value is not None and not isinstance(value, str) and not names:
            raise ValueError(
                f"`{path}` has `{field}`={value!r:.60}; PEFT expects null, a regex string or a "
                "list of module names"
            )
