#!/usr/bin/env bash
# Run the same command on every host of a Cloud TPU pod slice (e.g. v5e-32 = 8 hosts):
#   TPU=my-pod ZONE=us-west4-a launch/tpu_pod.sh latent-jax train prosqa_coconut --model gpt2 train.mesh.ici_fsdp=-1
# SETUP=1 first clones/installs the repo on every host (REPO_URL, default this checkout's origin).
# jax.distributed.initialize() then needs no arguments: LATENT_JAX_TPU_POD=1 tells latent_jax.distributed to call it.
set -euo pipefail
: "${TPU:?set TPU=<tpu name>}" "${ZONE:?set ZONE=<zone>}"
[ $# -ge 1 ] || { echo "usage: TPU=... ZONE=... $0 COMMAND [ARGS...]" >&2; exit 2; }
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
WORKDIR=${WORKDIR:-latent_jax}
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$1"; }
if [ "${SETUP:-0}" = 1 ]; then
  REPO_URL=${REPO_URL:-$(git config --get remote.origin.url)}
  ssh_all "set -e; [ -d $WORKDIR ] || git clone $REPO_URL $WORKDIR; cd $WORKDIR && git pull --ff-only &&
           python3 -m venv .venv && . .venv/bin/activate && pip install -q -U 'jax[tpu]' -e ."
fi
CMD=$(printf '%q ' "$@")
ssh_all "cd $WORKDIR && . .venv/bin/activate && LATENT_JAX_TPU_POD=1 $CMD"
