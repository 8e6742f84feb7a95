"""``python -m tests.crash_main --crash_at_step=N <medfm_jax.main flags>``: the train CLI, killed
by SIGKILL right after step N (a hook passed to the trainer), for the kill-and-resume tests."""
import os
import signal

from absl import app, flags

from medfm_jax import main

_CRASH_AT = flags.DEFINE_integer("crash_at_step", None, "SIGKILL the process right after this step.")
flags.mark_flag_as_required("crash_at_step")


def _kill_at(step, state):
  del state
  if step == _CRASH_AT.value:
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
  app.run(lambda argv: main.main(argv, hooks=[_kill_at]))
