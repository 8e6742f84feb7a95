"""``python -m tests.crash_main [--crash_at_step=N] [--sleep_per_step=S] [--file_size_limit_at_step=M]
[--read_only_checkpoints_at_step=M] [--kill_process_at_step=M:PID] <medfm_jax.main flags>``: the
train CLI, killed by SIGKILL right after step N, slowed by S seconds after every step, or after
step M unable to write files over 16 KiB, or to write in the checkpoint directory, or with process
PID (the GCS emulator) killed (hooks passed to the trainer; none changes the numbers), for the
kill/preempt/failing-save tests."""
import asyncio
import os
import pwd
import resource
import signal
import time

import gcsfs.retry
import jax
from absl import app, flags

from medfm_jax import main

_CRASH_AT = flags.DEFINE_integer("crash_at_step", None, "SIGKILL the process right after this step.")
_SLEEP = flags.DEFINE_float("sleep_per_step", 0.0, "Seconds to sleep after every step.")
_FSIZE_AT = flags.DEFINE_integer("file_size_limit_at_step", None, "After this step, files can grow "
                                 "to 16 KiB at most (RLIMIT_FSIZE: writes fail as on a full disk).")

_READ_ONLY_AT = flags.DEFINE_integer(
    "read_only_checkpoints_at_step", None, "After this step, WORKDIR/checkpoints is read-only "
    "(mode 555, and a process running as root drops to user 'nobody' so that the mode applies).")
_KILL_AT = flags.DEFINE_string("kill_process_at_step", None, "STEP:PID: SIGKILL process PID right "
                               "after STEP (the GCS emulator: the bucket becomes unreachable; gcsfs "
                               "then retries without its backoff, see _NoBackoff).")


class _NoBackoff:
  """Stands in for ``asyncio`` in ``gcsfs.retry``, whose only use of it is the backoff between
  retries (1 + 2 + 4 + 8 + 16 s per request): with the emulator killed for good, the waits only
  delayed the error the test reads (73 s of the test's wall time, 2026-11-30). The retries
  themselves still run."""

  @staticmethod
  async def sleep(_):
    await asyncio.sleep(0)


def _hook(step, state):
  if step == _CRASH_AT.value:
    os.kill(os.getpid(), signal.SIGKILL)
  if step == _FSIZE_AT.value:    # Python ignores SIGXFSZ: the write fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
  if step == _READ_ONLY_AT.value:
    os.chmod(os.path.join(flags.FLAGS.workdir, "checkpoints"), 0o555)
    if os.geteuid() == 0:   # root ignores permission bits
      # glibc changes the user of every thread by signalling it: not while XLA's run the step.
      jax.block_until_ready(state)
      nobody = pwd.getpwnam("nobody")
      os.setgid(nobody.pw_gid)
      os.setuid(nobody.pw_uid)
  if _KILL_AT.value and step == int(_KILL_AT.value.split(":")[0]):
    os.kill(int(_KILL_AT.value.split(":")[1]), signal.SIGKILL)
    gcsfs.retry.asyncio = _NoBackoff
  time.sleep(_SLEEP.value)


if __name__ == "__main__":
  app.run(lambda argv: main.main(argv, hooks=[_hook]))
