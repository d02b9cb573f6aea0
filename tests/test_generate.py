"""KV-cache generation (jaxlora/models/decoding/) on a tiny random Llama, with and without LoRA.

Compilations are the cost here: the tests share shapes (a batch of three prompts, one stop token)
so that most of them reuse one compiled generation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora.models import llama
from jaxlora.models.decoding import generate, left_pad, sample_logits

CONFIG = llama.LlamaConfig(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=4,
    max_position_embeddings=64,
)
MODEL = llama.LlamaForCausalLM(CONFIG)
PROMPTS = [[1, 5, 7, 9, 11], [1, 9, 3], [1, 4]]
NEW = 8
EOS = CONFIG.eos_token_id
LORA_CONFIG = jaxlora.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj"])


def _random_like(tree, seed, scale=1.0):
    """Normal noise in ``tree``'s shapes, drawn with NumPy: no compilation per leaf shape."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), tree)


def _strict(make):
    """Module fixtures under the tests' strict numerics (also part of jit's cache key)."""

    @functools.wraps(make)
    def made(*args, **kwargs):
        with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
            return make(*args, **kwargs)

    return made


@pytest.fixture(scope="module")
@_strict
def params():
    # Unit-variance kernels and embedding (norm scales 1): a tiny model whose greedy output varies.
    shapes = jax.eval_shape(MODEL.init, jax.random.key(0), jnp.ones((1, 2), jnp.int32))["params"]
    noise = _random_like(shapes, 5)
    return jax.tree.map(lambda s, n: jnp.ones(s.shape, s.dtype) if s.ndim < 2 else n, shapes, noise)


@pytest.fixture(scope="module")
@_strict
def adapters(params):
    _, shapes = jax.eval_shape(lambda: jaxlora.split(params, LORA_CONFIG, jax.random.key(1)))
    fresh = _random_like(shapes, 1)
    fresh = jax.tree.map_with_path(
        lambda path, x: jnp.zeros_like(x) if "lora_b" in jax.tree_util.keystr(path) else x, fresh
    )
    first, second = (_random_like(shapes, seed, 0.5) for seed in (2, 3))
    return params, [first, second, fresh]


@pytest.fixture(scope="module")
@_strict
def greedy_batch(params):
    return generate(MODEL, params, PROMPTS, max_new_tokens=NEW, stop_tokens=[EOS])


def test_left_pad():
    ids, mask = left_pad(PROMPTS, pad_id=0)
    assert ids.tolist() == [[1, 5, 7, 9, 11], [0, 0, 1, 9, 3], [0, 0, 0, 1, 4]]
    assert mask.sum(axis=1).tolist() == [5, 3, 2]


@pytest.mark.slow  # seconds of compiling: full suite only
def test_cached_greedy_equals_uncached_generate(params, greedy_batch):
    # The no-cache `llama.generate` re-runs the full forward each step; same tokens, eos padding.
    row = 2  # the shortest prompt: the most left padding in the batch
    expected = np.asarray(llama.generate(params, CONFIG, PROMPTS[row], NEW, eos_id=EOS))
    alone = generate(MODEL, params, [PROMPTS[row]], max_new_tokens=NEW, stop_tokens=[EOS])
    np.testing.assert_array_equal(alone.tokens[0], expected)
    # The same prompt left-padded inside the batch gives the same tokens.
    np.testing.assert_array_equal(greedy_batch.tokens[row], expected)
    assert len(set(expected.tolist())) > 2  # the tiny model's output is not one repeated token


def test_result_fields(greedy_batch):
    assert greedy_batch.tokens.shape == (3, NEW) and greedy_batch.tokens.dtype == jnp.int32
    assert greedy_batch.lengths.tolist() == [NEW] * 3
    assert not greedy_batch.finished.any()
    assert int(greedy_batch.steps) == NEW - 1


def test_padded_array_input_matches_list(params, greedy_batch):
    ids, mask = left_pad(PROMPTS, pad_id=EOS)
    out = generate(MODEL, params, jnp.asarray(ids), attention_mask=mask, max_new_tokens=NEW,
                   stop_tokens=[EOS])  # fmt: skip
    np.testing.assert_array_equal(out.tokens, greedy_batch.tokens)


def test_stop_token_ends_a_row_and_pads(params, greedy_batch):
    free = np.asarray(greedy_batch.tokens)
    stop = int(free[1, 2])  # row 1's third token: row 1 stops there at the latest
    out = generate(MODEL, params, PROMPTS, max_new_tokens=NEW, stop_tokens=[stop], pad_id=0)
    for row in range(3):
        hits = np.flatnonzero(free[row] == stop)
        length = hits[0] + 1 if hits.size else NEW
        expected = np.concatenate([free[row, :length], np.zeros(NEW - length, np.int32)])
        np.testing.assert_array_equal(out.tokens[row], expected)
        assert int(out.lengths[row]) == length
        assert bool(out.finished[row]) == bool(hits.size)


def test_loop_stops_early_when_all_rows_are_done(params, greedy_batch):
    free = np.asarray(greedy_batch.tokens)
    stops = sorted({int(t) for t in free[:, 1]})  # every row stops by its second token
    out = generate(MODEL, params, PROMPTS, max_new_tokens=NEW, stop_tokens=stops, pad_id=63)
    assert out.finished.all() and int(out.lengths.max()) <= 2
    assert int(out.steps) == int(out.lengths.max()) - 1 < NEW - 1
    assert (np.asarray(out.tokens)[:, 2:] == 63).all()


def test_tiny_top_p_is_greedy(params, greedy_batch):
    out = generate(MODEL, params, PROMPTS, max_new_tokens=NEW, stop_tokens=[EOS],
                   temperature=1.0, top_p=1e-6, key=jax.random.key(7))  # fmt: skip
    np.testing.assert_array_equal(out.tokens, greedy_batch.tokens)


def test_sampling_is_reproducible_with_a_key(params, greedy_batch):
    def run(seed):
        return np.asarray(generate(MODEL, params, PROMPTS, max_new_tokens=NEW, stop_tokens=[EOS],
                                   temperature=2.0, key=jax.random.key(seed)).tokens)  # fmt: skip

    first, again, other = run(0), run(0), run(1)
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()
    assert (first != np.asarray(greedy_batch.tokens)).any()


@pytest.mark.slow  # seconds of compiling: full suite only
def test_factored_equals_merged(adapters, greedy_batch):
    frozen, (lora, _, _) = adapters
    runs = {
        mode: generate(MODEL, frozen, PROMPTS, max_new_tokens=NEW, stop_tokens=[EOS],
                       lora=lora, lora_config=LORA_CONFIG, mode=mode).tokens
        for mode in ("factored", "merged")
    }  # fmt: skip
    np.testing.assert_array_equal(runs["factored"], runs["merged"])
    assert (np.asarray(runs["factored"]) != np.asarray(greedy_batch.tokens)).any()  # it acts


@pytest.mark.slow  # seconds of compiling: full suite only
def test_per_row_adapters_match_each_adapter_alone(adapters, greedy_batch):
    frozen, members = adapters
    stacked = jaxlora.adapters.stack(members)
    index = [1, 0, 2]
    mixed = generate(MODEL, frozen, PROMPTS, max_new_tokens=NEW, stop_tokens=[EOS],
                     lora=stacked, lora_config=LORA_CONFIG, adapter_index=index)  # fmt: skip
    for row, member in enumerate(index):
        alone = generate(MODEL, frozen, PROMPTS, max_new_tokens=NEW, stop_tokens=[EOS],
                         lora=members[member], lora_config=LORA_CONFIG)  # fmt: skip
        np.testing.assert_array_equal(mixed.tokens[row], alone.tokens[row])
    # Row 2 runs the fresh adapter (B = 0): the base model's tokens.
    np.testing.assert_array_equal(mixed.tokens[2], greedy_batch.tokens[2])
    assert (np.asarray(mixed.tokens[:2]) != np.asarray(greedy_batch.tokens[:2])).any()


# sample_logits on its own: the laws of greedy, top-k, nucleus and temperature sampling.
LOGITS = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
DRAWS = 4000


@functools.partial(jax.jit, static_argnames="top_k")
def _sample_many(temperature, top_p, top_k):
    keys = jax.random.split(jax.random.key(0), DRAWS)
    return jax.vmap(lambda k: sample_logits(LOGITS, k, temperature, top_p, top_k)[0])(keys)


def _draws(temperature=1.0, top_p=1.0, top_k=None):
    """Frequencies of each token in many draws from ``LOGITS``."""
    tokens = _sample_many(jnp.float32(temperature), jnp.float32(top_p), top_k)
    return np.bincount(np.asarray(tokens), minlength=LOGITS.shape[-1]) / DRAWS


@pytest.mark.slow  # seconds of compiling: full suite only
def test_sample_logits_greedy_and_temperature():
    np.testing.assert_array_equal(_draws(temperature=0.0), [1, 0, 0, 0])
    frequencies = _draws(temperature=2.0)
    target = np.asarray(jax.nn.softmax(LOGITS[0] / 2.0))
    np.testing.assert_allclose(frequencies, target, atol=0.03)


@pytest.mark.slow  # seconds of compiling: full suite only
def test_sample_logits_top_k():
    np.testing.assert_array_equal(_draws(temperature=1.0, top_k=1), [1, 0, 0, 0])
    frequencies = _draws(temperature=1.0, top_k=2)
    np.testing.assert_allclose(frequencies, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.03)


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [(0.7, [0.5 / 0.8, 0.3 / 0.8, 0, 0]), (0.45, [1, 0, 0, 0]), (0.9, [0.5, 0.3, 0.15, 0]),
     (1e-6, [1, 0, 0, 0])],
)  # fmt: skip
def test_sample_logits_nucleus(top_p, expected):
    # The nucleus is the fewest most likely tokens whose mass reaches top_p.
    frequencies = _draws(temperature=1.0, top_p=top_p)
    np.testing.assert_allclose(frequencies, np.asarray(expected) / np.sum(expected), atol=0.03)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"prompts": []}, ValueError, "`prompts` must be a non-empty"),
        ({"prompts": [[1, 2], []]}, ValueError, r"`prompts\[1\]` must be a non-empty"),
        ({"prompts": [["a"]]}, ValueError, r"`prompts\[0\]`"),
        # 0-D arrays used to fail with a TypeError from len()
        ({"prompts": np.array(5)}, ValueError, "`prompts` must be a non-empty list"),
        ({"prompts": jnp.array(5)}, ValueError, "`prompts` must be a non-empty list"),
        ({"prompts": np.zeros((0,), np.int32)}, ValueError, "`prompts` must be a non-empty list"),
        ({"max_new_tokens": 0}, ValueError, "`max_new_tokens` must be at least 1"),
        ({"max_new_tokens": 2.5}, TypeError, "`max_new_tokens` must be an int"),
        ({"max_new_tokens": 60}, ValueError, "`max_position_embeddings` \\(64\\)"),
        ({"top_p": 0.0}, ValueError, r"`top_p` must lie in \(0, 1\]"),
        ({"top_p": 1.5}, ValueError, r"`top_p` must lie in \(0, 1\]"),
        ({"temperature": -1.0}, ValueError, "`temperature` must be >= 0"),
        ({"temperature": 1.0}, ValueError, "needs `key`"),
        ({"top_k": 0}, ValueError, "`top_k` must be None or a positive int"),
        ({"top_k": 65, "temperature": 1.0, "key": jax.random.key(0)}, ValueError,
         "larger than the vocabulary"),
        ({"stop_tokens": [-2]}, ValueError, "`stop_tokens` must be non-negative"),
        ({"mode": "fused"}, ValueError, "`mode` must be 'factored' or 'merged'"),
        ({"lora": {}}, ValueError, "`lora` and `lora_config` go together"),
        ({"adapter_index": [0, 0, 0]}, ValueError, "`adapter_index` needs `lora`"),
        ({"prompts": np.array([[1, 2], [3, 4]]), "attention_mask": [[1, 0], [1, 1]]},
         ValueError, r"`attention_mask` rows \[0\] are not left-padded"),
        ({"attention_mask": [[1]]}, ValueError, "`attention_mask` goes with a left-padded"),
    ],
)  # fmt: skip
def test_bad_inputs_name_the_argument(params, kwargs, error, match):
    call = {"prompts": PROMPTS, "max_new_tokens": 4, **kwargs}
    with pytest.raises(error, match=match):
        generate(MODEL, params, call.pop("prompts"), **call)


@pytest.mark.parametrize(
    ("index", "match"),
    [([0, 3, 1], r"must lie in \[0, 3\)"), ([0, 1], r"int\[batch=3\]"), ([-1, 0, 0], r"\[0, 3\)")],
)
def test_bad_adapter_index(adapters, index, match):
    frozen, members = adapters
    with pytest.raises(ValueError, match=match):
        generate(MODEL, frozen, PROMPTS, max_new_tokens=4, lora=jaxlora.adapters.stack(members),
                 lora_config=LORA_CONFIG, adapter_index=index)  # fmt: skip
    with pytest.raises(ValueError, match="runs factored"):
        generate(MODEL, frozen, PROMPTS, max_new_tokens=4, lora=jaxlora.adapters.stack(members),
                 lora_config=LORA_CONFIG, adapter_index=[0, 0, 0], mode="merged")  # fmt: skip
