"""The TPU-pod and SLURM launchers print the exact commands they would run (--dry_run)."""
import shlex
import subprocess

import pytest

from tests import helpers


def _dry(*args):
  result = subprocess.run(["bash", *args], cwd=helpers.REPO, capture_output=True, text=True, timeout=60)
  return result.returncode, result.stdout.splitlines(), result.stderr


@pytest.mark.slow
def test_tpu_pod_creates_copies_installs_runs_on_all_workers_and_deletes():
  rc, lines, err = _dry("launch/tpu_pod.sh", "--name=pod1", "--zone=us-east5-a", "--accelerator=v5p-256",
                        "--project=proj", "--dry_run", "--", "--config=configs/mae.py:vit_h14",
                        "--workdir=gs://b/run one", "--config.mesh.fsdp=-1")
  assert rc == 0, err
  where = "--zone=us-east5-a --project=proj"
  assert lines[0] == (f"gcloud compute tpus tpu-vm describe pod1 {where} >/dev/null 2>&1 || "
                      f"gcloud compute tpus tpu-vm create pod1 {where} --accelerator-type=v5p-256 "
                      "--version=v2-alpha-tpuv5")
  assert lines[1] == f"gcloud compute tpus tpu-vm delete pod1 {where} --quiet  # at exit (omit with --keep)"
  assert lines[2].startswith("tar czf /tmp/medfm_jax_pod1.tgz -C ") and "--exclude=.git" in lines[2]
  assert lines[3] == f"gcloud compute tpus tpu-vm scp /tmp/medfm_jax_pod1.tgz pod1:medfm_jax.tgz {where} --worker=all"
  install = shlex.split(lines[4])
  assert install[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1"] and "--worker=all" in install
  assert "pip install -q -e ~/medfm_jax 'jax[tpu]'" in install[-1]
  run, _, tee = lines[5].partition(" 2>&1 | tee ")
  command = shlex.split(run)[-1]
  assert command.startswith("--command=cd ~/medfm_jax && python -m medfm_jax.main ")
  assert shlex.split(command.split("&& ", 1)[1]) == [
      "python", "-m", "medfm_jax.main", "--config=configs/mae.py:vit_h14", "--workdir=gs://b/run one",
      "--config.mesh.fsdp=-1"]
  assert tee.startswith("tpu_pod_") and len(lines) == 6


@pytest.mark.slow
def test_tpu_pod_keep_and_bad_options():
  rc, lines, _ = _dry("launch/tpu_pod.sh", "--name=p", "--zone=z", "--accelerator=v6e-8", "--keep", "--spot",
                      "--dry_run", "--", "--config=c", "--workdir=w")
  assert rc == 0 and not any(" delete " in line for line in lines)
  assert lines[0].endswith("--version=v2-alpha-tpuv6e --spot")
  rc, _, err = _dry("launch/tpu_pod.sh", "--name=p", "--zone=z", "--accelerator=v9-8", "--dry_run", "--", "x")
  assert rc == 2 and "--accelerator=v9-8: expected v4-N, v5litepod-N, v5p-N or v6e-N" in err
  rc, _, err = _dry("launch/tpu_pod.sh", "--name=p", "--dry_run", "--", "x")
  assert rc == 2 and "usage:" in err


@pytest.mark.slow
@pytest.mark.parametrize("per, tasks, cpus", [("node", 1, 32), ("gpu", 8, 4)])
def test_slurm_wrapper_submits_one_process_per_node_or_gpu(per, tasks, cpus):
  rc, lines, err = _dry("launch/slurm.sh", "--nodes=4", f"--per={per}", "--time=24:00:00", "--dry_run", "--",
                        "--config=configs/mae.py:vit_l16", "--workdir=/shared/r 1")
  assert rc == 0, err
  assert shlex.split(lines[0]) == [
      "sbatch", "--nodes=4", "--gpus-per-node=8", f"--ntasks-per-node={tasks}", f"--cpus-per-task={cpus}",
      "--time=24:00:00", "launch/slurm.sbatch", "--config=configs/mae.py:vit_l16", "--workdir=/shared/r 1"]


@pytest.mark.slow
def test_slurm_batch_script_runs_main_under_srun():
  rc, lines, err = _dry("launch/slurm.sbatch", "--dry_run", "--config=configs/mae.py:tiny", "--workdir=a b")
  assert rc == 0, err
  assert shlex.split(lines[0]) == ["srun", "--kill-on-bad-exit=1", "python", "-m", "medfm_jax.main",
                                   "--config=configs/mae.py:tiny", "--workdir=a b"]
  rc, _, err = _dry("launch/slurm.sh", "--nodes=2", "--per=socket", "--dry_run", "--", "x")
  assert rc == 2 and "--per=socket: allowed node, gpu" in err
