"""A small PyTorch model and its Flax linen twin, for PEFT round trips.

The twin covers every kind of PEFT tensor jaxlora maps: an embedding, a stack of Dense layers
under ``nn.scan`` (one PyTorch ``Linear`` per layer), an N-D ``DenseGeneral`` (a flat PyTorch
``Linear``), a 2-D convolution, a LayerNorm (for ``modules_to_save``) and a head. PyTorch's random
initial weights are copied into the Flax params, so both compute the same function.
"""

import json
import os

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import torch
from safetensors.numpy import load_file, save_file

import jaxlora
from jaxlora import peft as jpeft

VOCAB, DIM, LAYERS, CHANNELS, CLASSES = 20, 8, 2, 4, 5
#: Layouts jaxlora needs for the twin's kernels that are not plain 2-D.
LAYOUTS = {"blocks/fc": "sio", "proj": "ioo", "conv": "wwio"}


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict({"fc": torch.nn.Linear(DIM, DIM)}) for _ in range(LAYERS)
        )
        self.norm = torch.nn.LayerNorm(DIM)
        self.proj = torch.nn.Linear(DIM, 2 * 3)
        self.conv = torch.nn.Conv2d(3, CHANNELS, 3, padding=1)
        self.head = torch.nn.Linear(DIM + 6 + CHANNELS, CLASSES)

    def forward(self, ids, image):
        h = self.embed(ids)
        for block in self.blocks:
            h = h + torch.tanh(block["fc"](h))
        h = self.norm(h).mean(1)
        c = torch.relu(self.conv(image)).mean((2, 3))
        return self.head(torch.cat([h, self.proj(h), c], -1))


class _Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return h + jnp.tanh(nn.Dense(DIM, name="fc")(h)), None


class FlaxNet(nn.Module):
    """Takes ``image`` NHWC (PyTorch's is NCHW)."""

    @nn.compact
    def __call__(self, ids, image):
        h = nn.Embed(VOCAB, DIM, name="embed")(ids)
        blocks = nn.scan(
            _Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=LAYERS,
        )
        h, _ = blocks(name="blocks")(h, None)
        h = nn.LayerNorm(epsilon=1e-5, name="norm")(h).mean(1)
        p = nn.DenseGeneral((2, 3), name="proj")(h).reshape(h.shape[0], 6)
        c = nn.relu(nn.Conv(CHANNELS, (3, 3), padding=1, name="conv")(image)).mean((1, 2))
        return nn.Dense(CLASSES, name="head")(jnp.concatenate([h, p, c], -1))


def module_name(path: str, index: tuple[int, ...]) -> str:
    """Flax path -> PyTorch module name; the scanned stack is one ``Linear`` per layer."""
    if path == "blocks/fc":
        return f"blocks.{index[0]}.fc"
    return path.replace("/", ".")


def flax_params(model: TorchNet) -> dict:
    """The Flax twin's params holding ``model``'s weights."""
    w = {k: v.detach().numpy() for k, v in model.state_dict().items()}

    def dense(name):
        return {
            "kernel": jnp.asarray(w[f"{name}.weight"].T),
            "bias": jnp.asarray(w[f"{name}.bias"]),
        }

    fc = [dense(f"blocks.{i}.fc") for i in range(LAYERS)]
    return {
        "embed": {"embedding": jnp.asarray(w["embed.weight"])},
        "blocks": {"fc": {k: jnp.stack([layer[k] for layer in fc]) for k in ("kernel", "bias")}},
        "norm": {"scale": jnp.asarray(w["norm.weight"]), "bias": jnp.asarray(w["norm.bias"])},
        "proj": {
            "kernel": jnp.asarray(w["proj.weight"].T.reshape(DIM, 2, 3)),
            "bias": jnp.asarray(w["proj.bias"].reshape(2, 3)),
        },
        "conv": {
            "kernel": jnp.asarray(w["conv.weight"].transpose(2, 3, 1, 0)),
            "bias": jnp.asarray(w["conv.bias"]),
        },
        "head": dense("head"),
    }


def inputs(seed: int = 0, batch: int = 3, length: int = 5):
    """``(ids, image_nchw)`` as numpy arrays."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (batch, length)).astype(np.int32)
    return ids, rng.standard_normal((batch, 3, 6, 6)).astype(np.float32)


def torch_logits(model, ids, image) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids).long(), torch.from_numpy(image)).numpy()


def flax_logits(params, ids, image) -> np.ndarray:
    nhwc = jnp.asarray(image.transpose(0, 2, 3, 1))
    return np.asarray(FlaxNet().apply({"params": params}, jnp.asarray(ids), nhwc))


# Helpers shared by the PEFT interop tests (tests/test_peft.py, tests/test_peft_dora.py).


def lora_config(targets, **overrides):
    """The interop tests' config: per-path ranks and alphas, trainable biases, a saved module."""
    fields = dict(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        rank_pattern={"proj": 2},
        alpha_pattern={"conv": 4.0},
        bias="lora_only",
        modules_to_save=["norm"],
        init_lora_weights=False,
        layouts=LAYOUTS,
    )
    return jaxlora.LoraConfig(**{**fields, **overrides})


def rewrite(directory, edit_tensors=None, edit_config=None):
    """Edits a saved PEFT adapter in place: its tensors and/or its config document."""
    weights = os.path.join(directory, "adapter_model.safetensors")
    if edit_tensors:
        tensors = load_file(weights)
        edit_tensors(tensors)
        save_file(tensors, weights)
    if edit_config:
        with open(os.path.join(directory, "adapter_config.json")) as f:
            document = json.load(f)
        edit_config(document)
        with open(os.path.join(directory, "adapter_config.json"), "w") as f:
            json.dump(document, f)


def load(directory, params):
    """``load_peft`` with this model's module names and layouts."""
    return jpeft.load_peft(directory, params, module_name=module_name, layouts=LAYOUTS)


def peft_made(directory, model, perturb=True, **overrides):
    """An adapter made by real PEFT on ``model`` (the interop config, ``overrides`` on top), with
    every trainable tensor moved when ``perturb`` (B non-zero, DoRA magnitudes off their norms),
    saved to ``directory``; returns the PEFT model in eval mode."""
    import peft  # the PyTorch side; imported here so the linen helpers above need only torch

    fields = dict(
        r=4,
        lora_alpha=8,
        target_modules=["embed", "fc", "proj", "conv"],
        rank_pattern={"proj": 2},
        alpha_pattern={"conv": 4},
        bias="lora_only",
        modules_to_save=["norm"],
        init_lora_weights=False,
    )
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**{**fields, **overrides}))
    if perturb:
        with torch.no_grad():
            for param in peft_model.parameters():
                if param.requires_grad:
                    param.add_(0.1 * torch.randn_like(param))
    peft_model.save_pretrained(directory)
    return peft_model.eval()
