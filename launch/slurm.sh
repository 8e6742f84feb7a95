#!/usr/bin/env bash
# Submits launch/slurm.sbatch for N nodes with one process per node (all its GPUs) or per GPU.
#   launch/slurm.sh --nodes=4 --gpus_per_node=8 --per=node -- \
#       --config=configs/mae.py:vit_l16 --workdir=/shared/runs/mae_l16 --config.mesh.fsdp=-1 \
#       --config.mesh.data=1 --config.dtype=bfloat16
# Options: --partition=P, --time=HH:MM:SS, --account=A, --dry_run (print the sbatch command).
# Everything after `--` goes to python -m medfm_jax.main.
set -euo pipefail
nodes="" gpus=8 per=node extra=() dry=0
usage() { echo "usage: $0 --nodes=N [--gpus_per_node=8] [--per=node|gpu] [--partition=P] [--time=T] [--account=A] [--dry_run] -- MAIN_FLAGS..." >&2; exit 2; }
while (($#)); do
  case "$1" in
    --nodes=*) nodes=${1#*=} ;; --gpus_per_node=*) gpus=${1#*=} ;; --per=*) per=${1#*=} ;;
    --partition=*|--time=*|--account=*) extra+=("$1") ;;
    --dry_run) dry=1 ;;
    --) shift; break ;;
    *) echo "$0: unknown option $1 (main's flags go after --)" >&2; usage ;;
  esac
  shift
done
[[ $nodes =~ ^[1-9][0-9]*$ && $gpus =~ ^[1-9][0-9]*$ ]] || { echo "$0: --nodes=$nodes and --gpus_per_node=$gpus must be positive integers" >&2; usage; }
case "$per" in
  node) tasks=1 cpus=32 ;;
  gpu) tasks=$gpus cpus=$((32 / gpus > 0 ? 32 / gpus : 1)) ;;
  *) echo "$0: --per=$per: allowed node, gpu" >&2; exit 2 ;;
esac
(($#)) || { echo "$0: no main flags after -- (need at least --config and --workdir)" >&2; usage; }
cmd=(sbatch --nodes="$nodes" --gpus-per-node="$gpus" --ntasks-per-node="$tasks" --cpus-per-task="$cpus"
     "${extra[@]}" "$(dirname "$0")/slurm.sbatch" "$@")
if ((dry)); then printf '%q ' "${cmd[@]}" | sed 's/ $/\n/'; else exec "${cmd[@]}"; fi
