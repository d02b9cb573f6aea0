"""An Equinox model and its PyTorch twin share PEFT adapters both ways, with equal outputs.

Equinox stores weights as PyTorch does (Linear ``(out, in)``, Conv ``(out, in, k)``, Embedding
``(vocab, dim)``), so the twin's weights are copied as they are, and jaxlora's adapter must land on
the same modules with the same update.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from tests.treeutil import perturbed

pytestmark = pytest.mark.slow  # PyTorch and PEFT

eqx = pytest.importorskip("equinox")
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

VOCAB, DIM, OUT, TOKENS = 10, 4, 6, 5
TARGETS = ["emb", "conv", "head"]


class TorchTagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.conv = torch.nn.Conv1d(DIM, DIM, 3, padding=1)
        self.head = torch.nn.Linear(DIM, OUT)

    def forward(self, ids):
        h = self.emb(ids)  # (T, D)
        h = self.conv(h.T[None])[0].T
        return self.head(h)


class Tagger(eqx.Module):
    emb: eqx.nn.Embedding
    conv: eqx.nn.Conv1d
    head: eqx.nn.Linear

    def __call__(self, ids):
        h = jax.vmap(self.emb)(ids)
        return jax.vmap(self.head)(self.conv(h.T).T)


def _twins():
    torch.manual_seed(0)
    model = TorchTagger().eval()
    state = {k: jnp.asarray(v.detach().numpy()) for k, v in model.state_dict().items()}
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    twin = Tagger(
        eqx.nn.Embedding(VOCAB, DIM, key=k1),
        eqx.nn.Conv1d(DIM, DIM, 3, padding=1, key=k2),
        eqx.nn.Linear(DIM, OUT, key=k3),
    )
    twin = eqx.tree_at(
        lambda m: (m.emb.weight, m.conv.weight, m.conv.bias, m.head.weight, m.head.bias),
        twin,
        (
            state["emb.weight"],
            state["conv.weight"],
            state["conv.bias"][:, None],
            state["head.weight"],
            state["head.bias"],
        ),
    )
    return model, twin


IDS = np.array([1, 4, 0, 9, 3])


def _torch_out(model):
    with torch.no_grad():
        return model(torch.as_tensor(IDS)).numpy()


def test_export_loads_in_peft_with_equal_outputs(tmp_path):
    model, twin = _twins()
    np.testing.assert_allclose(twin(jnp.asarray(IDS)), _torch_out(model), atol=1e-5)
    config = jaxlora.LoraConfig(r=2, target_modules=TARGETS, bias="lora_only")
    frozen, lora = jaxlora.split(twin, config, jax.random.key(1))
    lora = perturbed(lora, 2)
    jaxlora.save_peft(tmp_path, lora, config, frozen)
    ours = np.asarray(jaxlora.merge(frozen, lora, config)(jnp.asarray(IDS)))
    theirs = _torch_out(peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval())
    assert np.abs(ours - _torch_out(model)).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_peft_made_adapter_loads_with_equal_outputs(tmp_path):
    model, twin = _twins()
    peft_config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False
    )
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft_config).eval()
    peft_model.save_pretrained(tmp_path)
    lora, config = jaxlora.load_peft(tmp_path, twin)
    ours = np.asarray(jaxlora.merge(twin, lora, config)(jnp.asarray(IDS)))
    np.testing.assert_allclose(ours, _torch_out(peft_model), rtol=0, atol=1e-5)
