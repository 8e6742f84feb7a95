#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it (or reuse one of that name), copy this working tree to
# every worker and install it, run `python -m medfm_jax.main` on --worker=all (JAX detects the pod
# and each worker's process id), stream the logs of all workers here, then delete the slice
# (keep it with --keep).
#   launch/tpu_pod.sh --name=mae-h14 --zone=us-east5-a --accelerator=v5p-256 -- \
#       --config=configs/mae.py:vit_h14 --workdir=gs://BUCKET/mae_h14 \
#       --config.mesh.data=1 --config.mesh.fsdp=-1 --config.dtype=bfloat16
# Options: --version=RUNTIME (TPU software version), --project=P, --spot, --keep, --log=FILE,
# --dry_run (print every command instead of running it). Everything after `--` goes to main.
set -euo pipefail
name="" zone="" accelerator="v5p-8" version="" project="" spot="" keep=0 dry=0
log="tpu_pod_$(date +%Y%m%d_%H%M%S).log"
usage() { echo "usage: $0 --name=NAME --zone=ZONE [--accelerator=TYPE] [--version=V] [--project=P] [--spot] [--keep] [--log=FILE] [--dry_run] -- MAIN_FLAGS..." >&2; exit 2; }
while (($#)); do
  case "$1" in
    --name=*) name=${1#*=} ;; --zone=*) zone=${1#*=} ;; --accelerator=*) accelerator=${1#*=} ;;
    --version=*) version=${1#*=} ;; --project=*) project=${1#*=} ;; --spot) spot="--spot" ;;
    --keep) keep=1 ;; --log=*) log=${1#*=} ;; --dry_run) dry=1 ;;
    --) shift; break ;;
    *) echo "$0: unknown option $1 (main's flags go after --)" >&2; usage ;;
  esac
  shift
done
[[ -n $name && -n $zone ]] || usage
if [[ -z $version ]]; then   # the TPU VM software image for the accelerator generation
  case "$accelerator" in
    v4-*) version=tpu-ubuntu2204-base ;; v5litepod-*|v5e-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;; v6e-*) version=v2-alpha-tpuv6e ;;
    *) echo "$0: --accelerator=$accelerator: expected v4-N, v5litepod-N, v5p-N or v6e-N (or pass --version)" >&2; exit 2 ;;
  esac
fi
(($#)) || { echo "$0: no main flags after -- (need at least --config and --workdir)" >&2; usage; }

repo=$(cd "$(dirname "$0")/.." && pwd)
tarball=/tmp/medfm_jax_${name}.tgz
vm=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[[ -n $project ]] && where+=(--project="$project")
main_cmd="cd ~/medfm_jax && python -m medfm_jax.main $(printf '%q ' "$@")"
install_cmd="rm -rf ~/medfm_jax && mkdir -p ~/medfm_jax && tar xzf ~/medfm_jax.tgz -C ~/medfm_jax && pip install -q -e ~/medfm_jax 'jax[tpu]'"

run() {   # prints the command (dry run) or runs it
  if ((dry)); then printf '%s\n' "$*"; else eval "$*"; fi
}
q() { local s; s=$(printf '%q ' "$@"); printf '%s' "${s% }"; }

run "$(q "${vm[@]}" describe "$name" "${where[@]}") >/dev/null 2>&1 || $(q "${vm[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator" --version="$version")${spot:+ $spot}"
if ((!keep)); then
  if ((dry)); then run "$(q "${vm[@]}" delete "$name" "${where[@]}" --quiet)  # at exit (omit with --keep)"
  else trap "$(q "${vm[@]}" delete "$name" "${where[@]}" --quiet)" EXIT; fi
fi
run "$(q tar czf "$tarball" -C "$repo" --exclude=.git --exclude=runs --exclude=__pycache__ .)"
run "$(q "${vm[@]}" scp "$tarball" "$name":medfm_jax.tgz "${where[@]}" --worker=all)"
run "$(q "${vm[@]}" ssh "$name" "${where[@]}" --worker=all --command="$install_cmd")"
run "$(q "${vm[@]}" ssh "$name" "${where[@]}" --worker=all --command="$main_cmd") 2>&1 | tee $(q "$log")"
