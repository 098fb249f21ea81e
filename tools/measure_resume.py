"""What a fault costs: checkpoint writes and the time a restart loses.

  python tools/measure_resume.py --workdir=/tmp/resume \\
      [--flagfile_path=configs/smoke.cfg] [--repeats=2]

Runs the command line with the flagfile and `--save_every_steps=1` from
scratch, SIGKILLs it at its first checkpoint in stage finetune after step
1, and runs the same command again, which resumes. It watches
WORKDIR/checkpoints from outside every 5 ms: a save starts when its hidden
temporary weights file appears (files.py) and ends when the pointer
`checkpoint.json` names the new file. Prints, per repeat:

  save_seconds       each save's duration, by stage (median, max)
  fresh_first_step   process start to the end of the first training step
                     (the first save starting) of the run from scratch
  resumed_first_step the same for the rerun: the time a restart costs
                     before training goes on, on top of the steps since
                     the last checkpoint
"""

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Scratch folder (deleted first).")
flags.DEFINE_string("flagfile_path", "configs/smoke.cfg",
                    "Training flags (passed as --flagfile).")
flags.DEFINE_integer("repeats", 1, "Kill-and-resume cycles.")
flags.mark_flag_as_required("workdir")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLL_SECONDS = 0.005


def watch(command, log_path, stop_when=None):
  """Runs `command`, timing each checkpoint save seen in the workdir.

  Returns:
    (process, saves): saves is [(start s, end s, pointer dict)] relative
    to the launch; the process is SIGKILLed once `stop_when(pointer)`.
  """
  folder = os.path.join(FLAGS.workdir, "work", "checkpoints")
  pointer_path = os.path.join(folder, "checkpoint.json")
  launched = time.monotonic()
  with open(log_path, "w") as log:
    process = subprocess.Popen(command, cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT)
  saves, started, last = [], None, read_pointer(pointer_path)
  while process.poll() is None:
    now = time.monotonic() - launched
    names = os.listdir(folder) if os.path.isdir(folder) else []
    if started is None and any(n.startswith(".tmp-") and "ckpt" in n
                               for n in names):
      started = now
    pointer = read_pointer(pointer_path)
    if pointer and pointer != last:
      last = pointer
      saves.append((started if started is not None else now, now, pointer))
      started = None
      if stop_when and stop_when(pointer):
        process.kill()
        break
    time.sleep(POLL_SECONDS)
  process.wait()
  return process, saves


def read_pointer(path):
  try:
    with open(path) as f:
      payload = json.load(f)
    return {k: payload[k] for k in ("epoch", "step", "stage", "file")}
  except (OSError, ValueError, KeyError):
    return None


def describe_saves(saves):
  by_stage = {}
  for start, end, pointer in saves:
    by_stage.setdefault(pointer["stage"], []).append(end - start)
  return {stage: f"median {statistics.median(d):.2f} s, max {max(d):.2f} s "
                 f"({len(d)} saves)" for stage, d in by_stage.items()}


def main(argv):
  del argv
  shutil.rmtree(FLAGS.workdir, ignore_errors=True)
  os.makedirs(FLAGS.workdir)
  command = [sys.executable, "-m", "tf_finetune.main",
             f"--flagfile={FLAGS.flagfile_path}",
             f"--workdir={os.path.join(FLAGS.workdir, 'work')}",
             f"--data_dir={os.path.join(FLAGS.workdir, 'data')}",
             "--save_every_steps=1"]
  for repeat in range(FLAGS.repeats):
    logs = [os.path.join(FLAGS.workdir, f"{name}{repeat}.log")
            for name in ("fresh", "resumed")]
    _, fresh = watch([*command, "--fresh"], logs[0],
                     lambda p: p["stage"] == "finetune" and p["step"] >= 1)
    process, resumed = watch(command, logs[1])
    if process.returncode != 0 or not fresh or not resumed:
      sys.exit(f"run failed, see {logs}")
    killed_at = fresh[-1][2]
    print(f"repeat {repeat}: killed after {killed_at['file']}")
    print(f"  save_seconds       {describe_saves(fresh + resumed)}")
    print(f"  fresh_first_step   {fresh[0][0]:.1f} s")
    print(f"  resumed_first_step {resumed[0][0]:.1f} s")


if __name__ == "__main__":
  app.run(main)
