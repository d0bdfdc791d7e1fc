#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per host, each sees all of its host's GPUs.
#   sbatch --nodes=4 --gpus-per-node=8 launch/gpu_slurm.sh latent-jax train prosqa_coconut --model gpt2 \
#          train.mesh.dcn_data=4 train.mesh.ici_fsdp=-1
# (or salloc ... then run it). latent_jax.distributed.initialize() reads SLURM_PROCID / SLURM_NTASKS and makes
# the first host of SLURM_NODELIST the coordinator (port LATENT_JAX_COORDINATOR_PORT, default 8476).
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: sbatch --nodes=N $0 COMMAND [ARGS...]" >&2; exit 2; }
: "${SLURM_JOB_NUM_NODES:?run inside a SLURM allocation (sbatch / salloc)}"
export LATENT_JAX_COORDINATOR_PORT=${LATENT_JAX_COORDINATOR_PORT:-8476}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
srun --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 "$@"
