"""Which multi-process initialisation each environment gets (fake environments, no cluster)."""
import pytest

from medfm_jax.parallel import distributed

_SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-4]", "SLURM_NTASKS": "4",
          "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}
_OMPI = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911", "OMPI_COMM_WORLD_SIZE": "16",
         "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "3", "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}


def test_explicit_flags_win_over_env_and_clusters():
  env = dict(_SLURM, MEDFM_COORDINATOR="h:1", MEDFM_NUM_PROCESSES="9", MEDFM_PROCESS_ID="8")
  c = distributed.choose(env, "10.0.0.1:1234", 2, 1, on_tpu_vm=True)
  assert c == distributed.Choice("explicit", dict(coordinator_address="10.0.0.1:1234",
                                                  num_processes=2, process_id=1))


def test_env_fallback_then_auto_detection_order():
  env = dict(_SLURM, MEDFM_COORDINATOR="h:1", MEDFM_NUM_PROCESSES="3", MEDFM_PROCESS_ID="2")
  assert distributed.choose(env).kwargs == dict(coordinator_address="h:1", num_processes=3, process_id=2)
  assert distributed.choose(dict(_SLURM, TPU_WORKER_HOSTNAMES="a,b")).mode == "tpu"
  assert distributed.choose({}, on_tpu_vm=True).mode == "tpu"
  assert distributed.choose(dict(_SLURM, **_OMPI)).mode == "slurm"
  assert distributed.choose(_OMPI) == distributed.Choice("openmpi")
  assert distributed.choose({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "0"}).mode == "kubernetes"


@pytest.mark.parametrize("env", [
    {}, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"},               # a pod that is not part of a Job
    dict(_SLURM, SLURM_NTASKS="1"),                             # single-task allocation
    dict(_OMPI, OMPI_COMM_WORLD_SIZE="1"), {"SLURM_JOB_ID": "7"}])
def test_single_process_when_nothing_multi_process_applies(env):
  assert distributed.choose(env) == distributed.Choice("single")


def test_one_process_per_node_gets_all_local_gpus():
  per_node = dict(_SLURM, SLURM_STEP_TASKS_PER_NODE="1(x4)", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
  assert distributed.choose(per_node).kwargs == {"local_device_ids": list(range(8))}
  assert distributed.choose(dict(per_node, CUDA_VISIBLE_DEVICES="", SLURM_GPUS_ON_NODE="4")).kwargs == {
      "local_device_ids": [0, 1, 2, 3]}
  # one process per GPU: JAX's own default (the process's local rank) stays
  assert distributed.choose(dict(per_node, SLURM_STEP_TASKS_PER_NODE="8(x4)")).kwargs == {}
  assert distributed.choose(dict(_OMPI, OMPI_COMM_WORLD_LOCAL_SIZE="1",
                                 CUDA_VISIBLE_DEVICES="0,1")).kwargs == {"local_device_ids": [0, 1]}


@pytest.mark.parametrize("args, env, message", [
    (("h:1", None, 0), {}, "--num_processes: required together with --coordinator_address, --process_id"),
    ((None, 2, None), {}, "--coordinator_address, --process_id: required together with --num_processes"),
    (("localhost", 2, 0), {}, "--coordinator_address='localhost': expected host:port"),
    (("h:1", 2, 2), {}, "--process_id=2: must be in [0, 2) for --num_processes=2"),
    (("h:1", 0, 0), {}, "--num_processes=0: must be >= 1"),
    ((None, None, None), {"MEDFM_COORDINATOR": "h:1", "MEDFM_NUM_PROCESSES": "two", "MEDFM_PROCESS_ID": "0"},
     "MEDFM_NUM_PROCESSES='two': must be an integer"),
    ((None, None, None), {"MEDFM_COORDINATOR": "h:1"},
     "MEDFM_NUM_PROCESSES, MEDFM_PROCESS_ID: required together with MEDFM_COORDINATOR"),
])
def test_bad_settings_raise_one_line_naming_them(args, env, message):
  with pytest.raises(distributed.DistributedError) as e:
    distributed.choose(env, *args)
  assert str(e.value) == message


def test_single_process_initialize_logs_devices(caplog):
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  assert distributed.initialize(env={}).mode == "single"
  assert "process 0 of 1, 8 local / 8 global devices (cpu; single)" in caplog.text
