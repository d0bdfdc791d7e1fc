"""Multi-host setup: one idempotent, environment-driven `initialize()`, called before anything touches a device.

Every host runs the same command (see launch/). Where the processes find each other:

    TPU pod      LATENT_JAX_TPU_POD=1 (set by launch/tpu_pod.sh) or TPU_WORKER_HOSTNAMES, and no coordinator
                 variable: plain `jax.distributed.initialize()`, JAX reads the TPU metadata
    coordinator  LATENT_JAX_COORDINATOR or JAX_COORDINATOR_ADDRESS (host:port), else the first host of
                 SLURM_NODELIST with port LATENT_JAX_COORDINATOR_PORT (default 8476)
    count        LATENT_JAX_NUM_PROCESSES, JAX_NUM_PROCESSES or SLURM_NTASKS
    id           LATENT_JAX_PROCESS_ID, JAX_PROCESS_ID or SLURM_PROCID
    local devices LATENT_JAX_LOCAL_DEVICE_IDS (e.g. "0,1"; default: all of the host's)

No count (or a count of 1) and no TPU: a single process, nothing to do. A count > 1 with the coordinator or the id
missing raises ValueError naming what is missing. CPU processes talk through gloo collectives.
Only process 0 logs and writes metrics (`trainer` / `checkpoint.MetricsLog`); orbax checkpoints are written by
all processes together (each its own shards).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Mapping

import jax

DEFAULT_PORT = 8476
_VARS = {
    "coordinator": ("LATENT_JAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
    "count": ("LATENT_JAX_NUM_PROCESSES", "JAX_NUM_PROCESSES", "SLURM_NTASKS"),
    "id": ("LATENT_JAX_PROCESS_ID", "JAX_PROCESS_ID", "SLURM_PROCID"),
}
_TPU_VARS = ("LATENT_JAX_TPU_POD", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """mode: "single" (nothing to initialise), "tpu" (jax.distributed.initialize() with no arguments) or
    "explicit" (coordinator / count / id below)."""

    mode: str
    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0
    local_device_ids: tuple[int, ...] | None = None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[003-004,010],cpu1" -> "gpu003", "n[1-2]-ib" -> "n1-ib"."""
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    if not m or not (m.group(1) or m.group(2)):
        raise ValueError(f"cannot read a host from SLURM_NODELIST={nodelist!r}")
    first = (m.group(2) or "").split(",")[0].split("-")[0]
    return f"{m.group(1)}{first}{m.group(3)}"


def _get(env: Mapping[str, str], what: str) -> tuple[str | None, str | None]:
    for name in _VARS[what]:
        if env.get(name, "").strip():
            return name, env[name].strip()
    return None, None


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def on_tpu_pod(env: Mapping[str, str]) -> bool:
    return any(env.get(v, "").strip() not in ("", "0") for v in _TPU_VARS)


def resolve(env: Mapping[str, str] | None = None, tpu: bool | None = None) -> DistributedConfig:
    """What `initialize` will do for the environment `env` (default os.environ). tpu: override TPU detection."""
    env = os.environ if env is None else env
    count_var, count = _get(env, "count")
    coord_var, coord = _get(env, "coordinator")
    id_var, pid = _get(env, "id")
    n = _int(count_var, count) if count is not None else None
    if coord is None and count_var == "SLURM_NTASKS" and env.get("SLURM_NODELIST", "").strip():
        port = env.get("LATENT_JAX_COORDINATOR_PORT", str(DEFAULT_PORT))
        coord, coord_var = f"{first_slurm_host(env['SLURM_NODELIST'])}:{port}", "SLURM_NODELIST"
    if coord is None and (n is None or n <= 1):
        is_tpu = on_tpu_pod(env) if tpu is None else tpu
        return DistributedConfig("tpu" if is_tpu else "single")
    if n is None or n < 1:
        raise ValueError(f"coordinator {coord} ({coord_var}) is set but no process count >= 1: set one of"
                         f" {', '.join(_VARS['count'])}")
    if n == 1:
        return DistributedConfig("single")
    missing = ([f"a coordinator host:port ({' or '.join(_VARS['coordinator'])}, or SLURM_NODELIST under SLURM)"]
               if coord is None else []) + ([f"the process id ({' or '.join(_VARS['id'])})"] if pid is None else [])
    if missing:
        raise ValueError(f"{count_var}={n} asks for {n} processes, but " + " and ".join(missing) + " is not set")
    i = _int(id_var, pid)
    if not 0 <= i < n:
        raise ValueError(f"{id_var}={i} is out of range for {count_var}={n} processes")
    if ":" not in coord:
        coord = f"{coord}:{env.get('LATENT_JAX_COORDINATOR_PORT', DEFAULT_PORT)}"
    local = env.get("LATENT_JAX_LOCAL_DEVICE_IDS", "").strip()
    ids = tuple(_int("LATENT_JAX_LOCAL_DEVICE_IDS", x) for x in local.split(",")) if local else None
    return DistributedConfig("explicit", coord, n, i, ids)


def initialize(env: Mapping[str, str] | None = None) -> DistributedConfig:
    """Initialise jax.distributed from the environment, once (later calls return at once). Returns what was done."""
    if jax.distributed.is_initialized():
        return DistributedConfig("explicit", None, jax.process_count(), jax.process_index())
    cfg = resolve(env)
    if cfg.mode == "tpu":
        jax.distributed.initialize()
    elif cfg.mode == "explicit":
        if "cpu" in (os.environ if env is None else env).get("JAX_PLATFORMS", "").split(","):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id, local_device_ids=cfg.local_device_ids)
    if cfg.mode != "single" and not is_main():
        logging.getLogger("latent_jax").setLevel(logging.WARNING)  # only process 0 reports progress
    return cfg


def is_main() -> bool:
    """Process 0: the one that logs, prints and writes metrics / result files."""
    return jax.process_index() == 0
