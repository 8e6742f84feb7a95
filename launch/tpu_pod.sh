#!/usr/bin/env bash
# Runs the same command on every worker of a Cloud TPU pod slice (JAX auto-detects the pod).
# The repo must be at the same path on every worker (e.g. cloned by a startup script).
#   launch/tpu_pod.sh my-tpu us-central2-b --config=configs/mae.py:vit_h14 \
#       --workdir=gs://BUCKET/mae_h14 --config.mesh.fsdp=-1 --config.dtype=bfloat16
set -euo pipefail
tpu=${1:?usage: $0 TPU_NAME ZONE MAIN_FLAGS...}; zone=${2:?zone}; shift 2
repo=${MEDFM_REPO_DIR:-\$HOME/medfm_jax}
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all \
  --command="cd $repo && python -m medfm_jax.main $(printf '%q ' "$@")"
