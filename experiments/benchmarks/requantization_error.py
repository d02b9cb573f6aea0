"""What merging a LoRA update into a quantised base loses: the figures quoted in ``jaxlora.quant``.

A 1024x1024 kernel drawn from N(0, 0.02^2), a random rank-8 update scaled to
||s dW|| / ||W|| = 0.05, merged and requantised with int8 and NF4.
Run: ``python -m experiments.benchmarks.requantization_error``.
"""

import jax
import jax.numpy as jnp

import jaxlora
from jaxlora import quant


def main() -> None:
    w = 0.02 * jax.random.normal(jax.random.key(0), (1024, 1024))
    config = jaxlora.LoraConfig(r=8, lora_alpha=8, target_modules=["d"], init_lora_weights=False)
    for method in ("int8", "nf4"):
        qfrozen = quant.quantize({"d": {"kernel": w}}, ["d"], method)
        _, lora = quant.split_quantized(qfrozen, config, jax.random.key(1))
        size = jnp.linalg.norm(jaxlora.delta(lora["d"]["lora_a"], lora["d"]["lora_b"]))
        rel = float(size / jnp.linalg.norm(w))
        lora = jax.tree.map(lambda x, rel=rel: x * jnp.sqrt(0.05 / rel), lora)
        print(method, quant.requantization_error(qfrozen, lora, config))


if __name__ == "__main__":
    main()
