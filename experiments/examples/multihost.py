"""Multi-process LoRA training: FSDP + data parallel over 2 processes x 4 CPU devices.

One command launches the whole run on this machine (2 local processes, gloo CPU collectives,
coordinator on 127.0.0.1 at a free port) and checks it against a single-device run:

    python experiments/examples/multihost.py --out experiments/results/multihost
    python experiments/examples/multihost.py --model nnx --out experiments/results/multihost_nnx
    python experiments/examples/multihost.py --model linen,nnx --out /tmp/both  # /tmp/both/<model>

Each worker (``--process-id I --port P``) joins with ``jax.distributed.initialize``, builds the
global (data=2, fsdp=4) mesh, initialises the base and the adapter directly into their shardings,
loads only its own rows of every batch (``jax.make_array_from_process_local_data``), trains, writes
the adapter checkpoint collectively with orbax (Θ plus the config JSON), restores it and compares.
Process 0 then retrains on one of its devices for the reference. ``--model nnx`` runs the same LM
written in NNX (``train_parallel.NnxTinyLM``: an ``nnx.State`` base whose partitioning metadata
gives the shardings, trained through ``jaxlora.apply`` on its graphdef). On a real cluster, start
one worker per host with ``jax.distributed.initialize()`` left to detect the cluster (see the
README).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

DEVICES_PER_PROCESS = 4
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out, num_processes=2, steps=4, timeout=TIMEOUT_S, xla_flags="", model="linen"):
    """Starts the workers, waits at most ``timeout`` seconds, kills them all on any failure."""
    os.makedirs(out, exist_ok=True)
    port = free_port()
    # The workers import this checkout's jaxlora, not an installed one.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
        # The caller's own XLA options first: the device count and ``xla_flags`` take precedence.
        "XLA_FLAGS": " ".join(
            [
                os.environ.get("XLA_FLAGS", ""),
                xla_flags,
                f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
            ]
        ),
    }
    env.pop("JAX_PLATFORMS", None)
    procs = []
    logs = []
    try:
        for i in range(num_processes):
            log = open(os.path.join(out, f"worker_{i}.log"), "w")
            logs.append(log)
            cmd = [sys.executable, __file__, "--process-id", str(i), "--port", str(port)]
            cmd += ["--num-processes", str(num_processes), "--steps", str(steps), "--out", out]
            cmd += ["--model", model]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for log in logs:
            log.close()
    return [p.returncode for p in procs]


def worker(args):
    import jax

    jax.config.update("jax_platforms", "cpu")  # this demo simulates hosts with CPU devices
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", DEVICES_PER_PROCESS)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}",
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=120,
    )
    # One run per model in the same processes; with several, each writes under out/<model>.
    models = args.model.split(",")
    for model in models:
        out = args.out if len(models) == 1 else os.path.join(args.out, model)
        os.makedirs(out, exist_ok=True)
        train(model, args.steps, out)
    jax.distributed.shutdown()


def train(model, steps, out):
    """Trains, checkpoints and checks one model in this (already initialised) worker."""
    # Only now may anything touch a JAX backend.
    import jax
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import train_parallel as tp

    import jaxlora
    from jaxlora.sharding import init_sharded, lora_shardings

    mode, lm = "fsdp", tp.MODELS[model]
    mesh = tp.make_mesh(mode)  # (data=2, fsdp=4) over all 8 devices of both processes
    base_sh = lm.base_shardings(mode, mesh)
    frozen = lm.init_base(base_sh)
    frozen_before = jax.tree.map(jnp.copy, frozen)
    lora_sh = lora_shardings(lm.abstract(), lm.config, mesh=mesh, rules=tp.RULES[mode])
    promised = jax.tree.map(lambda s: s.spec, lora_sh)
    lora = init_sharded(frozen, lm.config, jax.random.key(1), base_sh)
    replicated = NamedSharding(mesh, P())
    opt_sh = tp.opt_shardings(lora_sh, replicated)
    opt_state = jax.jit(tp.OPTIMIZER.init, out_shardings=opt_sh)(lora)
    step = tp.jit_step(lora_sh, opt_sh, replicated, lm=lm)
    all_equal = jax.jit(
        lambda a, b: jnp.all(jnp.stack([jnp.all(x == y) for x, y in zip(a, b, strict=True)])),
        out_shardings=replicated,
    )

    batch_sh = NamedSharding(mesh, P(tp.BATCH_AXES[mode]))
    global_shape = (tp.BATCH, tp.SEQ)
    # This process's devices hold one contiguous block of rows of every global batch.
    indices = batch_sh.addressable_devices_indices_map(global_shape).values()
    rows = sorted(idx[0].indices(tp.BATCH)[:2] for idx in indices)
    start, stop = rows[0][0], rows[-1][1]
    data = tp.batches(steps)  # stands in for a loader that reads only rows start:stop
    losses = []
    for tokens in data:
        local = tokens[start:stop]
        batch = jax.make_array_from_process_local_data(batch_sh, local, global_shape)
        lora, opt_state, loss = step(lora, opt_state, frozen, batch)
        losses.append(float(loss))
    specs_ok = tp.spec_tree(lora) == promised

    # Collective checkpoint: every process writes its shards, process 0 the config JSON.
    ckpt_dir = os.path.abspath(os.path.join(out, "checkpoint"))
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    checkpointer.save(
        ckpt_dir,
        args=ocp.args.Composite(
            lora=ocp.args.StandardSave(lora), config=ocp.args.JsonSave(lm.config.to_dict())
        ),
        force=True,
    )
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), lora
    )
    restored = checkpointer.restore(
        ckpt_dir,
        args=ocp.args.Composite(
            lora=ocp.args.StandardRestore(target), config=ocp.args.JsonRestore()
        ),
    )
    same = all_equal(jax.tree.leaves(restored["lora"]), jax.tree.leaves(lora))
    restore_ok = (
        bool(same)
        and tp.spec_tree(restored["lora"]) == promised
        and jaxlora.LoraConfig.from_dict(restored["config"]) == lm.config
    )
    base_unchanged = bool(all_equal(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before)))

    adapter = multihost_utils.process_allgather(lora, tiled=True)
    result = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "rows": [start, stop],
        "losses": losses,
        "specs_ok": specs_ok,
        "restore_ok": restore_ok,
        "base_unchanged": base_unchanged,
        "model": model,
        "specs": tp.spec_strings(promised),
    }
    if jax.process_index() == 0:
        ref_losses, ref_lora, _ = tp.train_single(data, lm=lm)
        result["max_loss_diff"] = max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True))
        result["max_adapter_diff"] = tp.max_diff(adapter, ref_lora)
    flat = jax.tree_util.tree_flatten_with_path(adapter)[0]
    np.savez(
        os.path.join(out, f"adapter_{jax.process_index()}.npz"),
        **{"/".join(str(k.key) for k in path): np.asarray(x) for path, x in flat},
    )
    with open(os.path.join(out, f"result_{jax.process_index()}.json"), "w") as f:
        json.dump(result, f, indent=1)
    multihost_utils.sync_global_devices(f"done {model}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for logs, results and checkpoint")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--process-id", type=int, default=None, help="run one worker")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--timeout", type=int, default=TIMEOUT_S)
    parser.add_argument(
        "--model", default="linen", help="linen, nnx, or both in the same workers: linen,nnx"
    )
    args = parser.parse_args(argv)
    if args.process_id is not None:
        worker(args)
        return 0
    models = args.model.split(",")
    if any(m not in ("linen", "nnx") for m in models):
        parser.error(f"--model: linen, nnx or a comma-separated list of them, not {args.model}")
    codes = launch(args.out, args.num_processes, args.steps, args.timeout, model=args.model)
    print(json.dumps({"return_codes": codes}))
    if any(codes):
        return 1
    for model in models:
        out = args.out if len(models) == 1 else os.path.join(args.out, model)
        with open(os.path.join(out, "result_0.json")) as f:
            result = json.load(f)
        print(json.dumps({k: v for k, v in result.items() if k != "specs"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
