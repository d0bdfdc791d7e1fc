#!/usr/bin/env bash
# Run N processes of the same command on this machine (CPU by default), as a multi-host job would:
#   NPROC=2 DEVICES_PER_PROC=4 launch/local.sh latent-jax train prosqa_coconut_cpu train.mesh.dcn_data=2 train.mesh.ici_fsdp=-1
# Each process gets LATENT_JAX_COORDINATOR / LATENT_JAX_NUM_PROCESSES / LATENT_JAX_PROCESS_ID, which
# latent_jax.distributed.initialize() (called by the CLI) reads. Logs: $LOG_DIR/proc_<i>.log (process 0 also on stdout).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: NPROC=2 $0 COMMAND [ARGS...]" >&2; exit 2; }
NPROC=${NPROC:-2}
DEVICES_PER_PROC=${DEVICES_PER_PROC:-1}
PORT=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("localhost",0)); print(s.getsockname()[1])')}
LOG_DIR=${LOG_DIR:-runs/local_launch}
mkdir -p "$LOG_DIR"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROC}"
export LATENT_JAX_COORDINATOR="localhost:${PORT}" LATENT_JAX_NUM_PROCESSES="${NPROC}"
pids=()
for ((i = 1; i < NPROC; i++)); do
  LATENT_JAX_PROCESS_ID=$i "$@" > "$LOG_DIR/proc_$i.log" 2>&1 &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
LATENT_JAX_PROCESS_ID=0 "$@" 2>&1 | tee "$LOG_DIR/proc_0.log" || status=$?
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
