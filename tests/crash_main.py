"""``python -m tests.crash_main [--crash_at_step=N] [--sleep_per_step=S] <medfm_jax.main flags>``: the
train CLI, killed by SIGKILL right after step N, or slowed by S seconds after every step (hooks
passed to the trainer; neither changes the numbers), for the kill/preempt-and-resume tests."""
import os
import signal
import time

from absl import app, flags

from medfm_jax import main

_CRASH_AT = flags.DEFINE_integer("crash_at_step", None, "SIGKILL the process right after this step.")
_SLEEP = flags.DEFINE_float("sleep_per_step", 0.0, "Seconds to sleep after every step.")


def _hook(step, state):
  del state
  if step == _CRASH_AT.value:
    os.kill(os.getpid(), signal.SIGKILL)
  time.sleep(_SLEEP.value)


if __name__ == "__main__":
  app.run(lambda argv: main.main(argv, hooks=[_hook]))
