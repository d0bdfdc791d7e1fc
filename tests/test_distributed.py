"""Multi-host: environment parsing (explicit variables, SLURM, TPU, errors) and two local CPU processes that train
two steps with the real trainer over a hybrid (dcn_data=2) mesh and agree with each other and with one process
training on the same global batch."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from latent_jax.distributed import DistributedConfig, first_slurm_host, initialize, resolve
from latent_jax.models import init_model
from latent_jax.testing import ToyMethod, quiet, tiny_config, toy_records
from latent_jax.train.trainer import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_env_parsing():
    assert resolve({}, tpu=False) == DistributedConfig("single")
    assert resolve({"LATENT_JAX_TPU_POD": "1"}) == DistributedConfig("tpu")
    assert resolve({"JAX_NUM_PROCESSES": "1"}, tpu=False).mode == "single"
    env = {"LATENT_JAX_COORDINATOR": "10.0.0.2:1234", "LATENT_JAX_NUM_PROCESSES": "4", "LATENT_JAX_PROCESS_ID": "3",
           "LATENT_JAX_LOCAL_DEVICE_IDS": "0,1"}
    assert resolve(env) == DistributedConfig("explicit", "10.0.0.2:1234", 4, 3, (0, 1))
    jax_env = {"JAX_COORDINATOR_ADDRESS": "host-a", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    assert resolve(jax_env).coordinator_address == "host-a:8476"
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_NODELIST": "gpu[003-006,010],cpu1"}
    assert resolve(slurm) == DistributedConfig("explicit", "gpu003:8476", 8, 5)
    assert resolve({**slurm, "LATENT_JAX_COORDINATOR_PORT": "9999"}).coordinator_address == "gpu003:9999"
    assert resolve({**slurm, "LATENT_JAX_COORDINATOR": "head:1"}).coordinator_address == "head:1"  # explicit wins
    assert resolve({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_NODELIST": "n1"}, tpu=False).mode == "single"
    assert [first_slurm_host(x) for x in ("node7", "a[1-4]", "n[01-02]-ib,x", "gpu-a[12,15]")] == [
        "node7", "a1", "n01-ib", "gpu-a12"]


def test_env_errors_name_what_is_missing():
    with pytest.raises(ValueError, match=r"LATENT_JAX_NUM_PROCESSES=2 asks for 2 processes, but a coordinator host:port"
                                         r" \(LATENT_JAX_COORDINATOR or JAX_COORDINATOR_ADDRESS"):
        resolve({"LATENT_JAX_NUM_PROCESSES": "2", "LATENT_JAX_PROCESS_ID": "0"})
    with pytest.raises(ValueError, match=r"the process id \(LATENT_JAX_PROCESS_ID or JAX_PROCESS_ID or SLURM_PROCID\)"):
        resolve({"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "h:1"})
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=2 is out of range for JAX_NUM_PROCESSES=2"):
        resolve({"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "2"})
    with pytest.raises(ValueError, match=r"no process count"):
        resolve({"LATENT_JAX_COORDINATOR": "h:1"})
    with pytest.raises(ValueError, match=r"SLURM_NTASKS='four' is not an integer"):
        resolve({"SLURM_NTASKS": "four"})
    assert initialize({}).mode == "single"  # nothing set: a no-op, safe to call anywhere


WORKER = textwrap.dedent("""
    import json, sys
    from latent_jax.distributed import initialize
    cfg = initialize()
    import jax
    from latent_jax.models import init_model
    from latent_jax.testing import ToyMethod, quiet, tiny_config, toy_records
    from latent_jax.train.trainer import train
    assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.device_count())
    g, p = init_model(tiny_config("gpt2", n_layers=1), seed=0)
    losses = []
    r = train(ToyMethod(), toy_records(8, seed=4), g, p, quiet(epochs=1, batch_size=2, lr=1e-2,
              mesh={"dcn_data": 2, "ici_fsdp": -1}), on_step=lambda rec: losses.append(rec["loss"]))
    w = r.params["blocks"][0]["mlp"]["w_in"][...]
    print("RESULT " + json.dumps({"pid": jax.process_index(), "losses": losses, "spec": str(w.sharding.spec),
                                  "w_in_sum": float(jax.numpy.sum(w))}), flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_and_agree(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_", "LATENT_JAX_"))}
    base.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
                LATENT_JAX_COORDINATOR=f"localhost:{port}", LATENT_JAX_NUM_PROCESSES="2")
    procs = [subprocess.Popen([sys.executable, str(script)], env={**base, "LATENT_JAX_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=240)
            outs.append(out)
            assert p.returncode == 0, out[-3000:]
    finally:
        for p in procs:
            p.kill()
    res = [json.loads(next(x for x in o.splitlines() if x.startswith("RESULT "))[7:]) for o in outs]
    assert sorted(r["pid"] for r in res) == [0, 1]
    assert len(res[0]["losses"]) == 2 and res[0]["losses"] == res[1]["losses"]
    assert res[0]["w_in_sum"] == res[1]["w_in_sum"] and res[0]["spec"] == "P('fsdp', 'tensor')"
    # one process, global batch 4 (= 2 per process x 2): the same rows per step, so the same losses
    g, p = init_model(tiny_config("gpt2", n_layers=1), seed=0)
    losses = []
    train(ToyMethod(), toy_records(8, seed=4), g, p, quiet(epochs=1, batch_size=4, lr=1e-2),
          on_step=lambda rec: losses.append(rec["loss"]))
    np.testing.assert_allclose(res[0]["losses"], losses, rtol=2e-5)
    assert jax.process_count() == 1
