"""sha256 digests of arrays, pytrees of arrays and JSON documents, and their verification.

A digest covers an array's dtype, shape and bytes, so a flipped byte, a truncated or reshaped
array, or a changed dtype all change it. Checkpoints and PEFT exports store the digests they were
written with; readers recompute them on what they read and raise, naming the leaf, on a mismatch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxlora._src import paths


def array_digest(array: Any) -> str | None:
    """The sha256 of ``array``'s dtype, shape and bytes; None for an array this process cannot
    read whole (sharded across processes)."""
    if not getattr(array, "is_fully_addressable", True):
        return None
    host = np.ascontiguousarray(np.asarray(array))
    digest = hashlib.sha256(f"{host.dtype.str}{host.shape}".encode())
    digest.update(host.tobytes())
    return digest.hexdigest()


def tree_digests(tree: Any) -> dict[str, str]:
    """``{"l1/lora_a": sha256, …}`` for every leaf of ``tree`` this process can read whole."""
    digests = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        digest = array_digest(leaf)
        if digest is not None:
            digests[paths.join(paths.leaf_path(keypath))] = digest
    return digests


def json_digest(document: Any) -> str:
    """The sha256 of ``document`` as canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def check_tree(tree: Any, stored: Mapping[str, str], where: str) -> None:
    """Raises a ValueError naming every leaf of ``tree`` whose digest is not the ``stored`` one.

    Leaves without a stored digest (written sharded across processes) are not checked.
    """
    computed = tree_digests(tree)
    bad = sorted(path for path, digest in stored.items() if computed.get(path, digest) != digest)
    missing = sorted(set(stored) - set(computed) - set(bad))
    if bad or missing:
        leaves = paths.preview([*bad, *missing], 8)
        raise ValueError(
            f"{where} is corrupt: the sha256 of {leaves} differs from the one stored when it was "
            "written (a changed, truncated or damaged file); restore another step or re-save it"
        )
