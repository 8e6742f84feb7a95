r"""N training processes on this machine, coordinated over localhost (multi-host code paths on CPU).

  python launch/local.py --num_processes=2 --devices_per_process=2 -- \
      --config=configs/mae.py:tiny --workdir=runs/mae_tiny_2proc

Everything after ``--`` (or any flag this launcher does not know) goes to
``python -m medfm_jax.main``. Each process gets ``--coordinator_address=127.0.0.1:PORT
--num_processes=N --process_id=i``, ``JAX_PLATFORMS=cpu`` (unless set) and, with
``--devices_per_process``, that many fake CPU devices. Output lines are prefixed ``[i]``; if one
process fails the others are stopped. ``--dry_run`` prints the commands instead of running them.
"""
from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def commands(num_processes: int, main_args: list[str], port: int,
             devices_per_process: int = 0, python: str = sys.executable) -> list[tuple[dict, list[str]]]:
  """(environment additions, argv) of each process."""
  env = {"JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
  if devices_per_process:
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count={devices_per_process}"])
  return [(env, [python, "-m", "medfm_jax.main", *main_args, f"--coordinator_address=127.0.0.1:{port}",
                 f"--num_processes={num_processes}", f"--process_id={i}"])
          for i in range(num_processes)]


def _pump(i: int, stream, out) -> None:
  for line in stream:
    out.write(f"[{i}] {line}")
    out.flush()


def run(cmds: list[tuple[dict, list[str]]], timeout: float | None = None) -> int:
  """Starts every process, streams their output, returns the first non-zero exit status (or 0)."""
  procs, pumps = [], []
  for i, (extra, argv) in enumerate(cmds):
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    procs.append(p)
    pumps.append(threading.Thread(target=_pump, args=(i, p.stdout, sys.stdout), daemon=True))
    pumps[-1].start()
  deadline = None if timeout is None else time.monotonic() + timeout
  status = 0
  while any(p.poll() is None for p in procs):
    failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
    late = deadline is not None and time.monotonic() > deadline
    if failed or late:
      status = failed[0] if failed else 124
      for p in procs:           # a lone survivor would wait for its peers forever
        if p.poll() is None:
          p.terminate()
      break
    time.sleep(0.2)
  for p in procs:
    p.wait()
  for t in pumps:
    t.join()
  return status or next((p.returncode for p in procs if p.returncode), 0)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--devices_per_process", type=int, default=0,
                      help="fake CPU devices per process (0 = leave XLA_FLAGS as it is)")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0 = a free one)")
  parser.add_argument("--timeout", type=float, default=None, help="seconds before stopping all")
  parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  args, main_args = parser.parse_known_args(argv)
  main_args = [a for a in main_args if a != "--"]
  if args.num_processes < 1 or args.devices_per_process < 0:
    parser.error(f"--num_processes={args.num_processes} must be >= 1 and "
                 f"--devices_per_process={args.devices_per_process} >= 0")
  cmds = commands(args.num_processes, main_args, args.port or free_port(), args.devices_per_process)
  if args.dry_run:
    for extra, cmd in cmds:
      print(" ".join(f"{k}={shlex.quote(v)}" for k, v in extra.items()), shlex.join(cmd))
    return 0
  return run(cmds, args.timeout)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
