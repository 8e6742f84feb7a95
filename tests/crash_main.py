"""``python -m tests.crash_main [--crash_at_step=N] [--sleep_per_step=S] [--file_size_limit_at_step=M]
<medfm_jax.main flags>``: the train CLI, killed by SIGKILL right after step N, slowed by S seconds
after every step, or unable to write files over 16 KiB after step M (hooks passed to the trainer;
none changes the numbers), for the kill/preempt/failing-save tests."""
import os
import resource
import signal
import time

from absl import app, flags

from medfm_jax import main

_CRASH_AT = flags.DEFINE_integer("crash_at_step", None, "SIGKILL the process right after this step.")
_SLEEP = flags.DEFINE_float("sleep_per_step", 0.0, "Seconds to sleep after every step.")
_FSIZE_AT = flags.DEFINE_integer("file_size_limit_at_step", None, "After this step, files can grow "
                                 "to 16 KiB at most (RLIMIT_FSIZE: writes fail as on a full disk).")


def _hook(step, state):
  del state
  if step == _CRASH_AT.value:
    os.kill(os.getpid(), signal.SIGKILL)
  if step == _FSIZE_AT.value:    # Python ignores SIGXFSZ: the write fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
  time.sleep(_SLEEP.value)


if __name__ == "__main__":
  app.run(lambda argv: main.main(argv, hooks=[_hook]))
