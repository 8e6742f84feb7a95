#!/usr/bin/env bash
# N training processes on this machine, coordinated over localhost (tests multi-host code paths
# on CPU; on a multi-GPU box use one process per GPU via CUDA_VISIBLE_DEVICES instead).
#   launch/local_multiprocess.sh 2 --config=configs/mae.py:tiny --workdir=runs/mae_tiny_2proc
set -euo pipefail
n=${1:?usage: $0 NUM_PROCESSES MAIN_FLAGS...}; shift
port=${MEDFM_PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} MEDFM_COORDINATOR="127.0.0.1:${port}" MEDFM_NUM_PROCESSES="$n" \
    MEDFM_PROCESS_ID="$i" python -m medfm_jax.main "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
