"""Benchmark: one train step of the two-stage model under each speed switch.

For `--stage` (head: frozen backbone; finetune: top `--unfreeze_blocks`
blocks train) it times the first step (tracing, and XLA's compile) and the
steady steps after it, for float32, float32 + XLA, mixed_bfloat16 and
mixed_float16, each in a fresh process, and prints each against float32
without XLA measured in the same run:

  python tools/bench_step.py --image_size=64 --stage=finetune

Per-step figures only: whether a switch pays off over a whole run is what
tools/bench_train.py measures.
"""

import os
import subprocess
import sys
import time

# The checkout's own package, not whichever tf_finetune is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("image_size", 64, "Input side in pixels.")
flags.DEFINE_enum("stage", "head", ["head", "finetune"], "Stage to time.")
flags.DEFINE_integer("unfreeze_blocks", 3, "Blocks training in finetune.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_integer("steps", 10, "Steady steps timed after the first.")
flags.DEFINE_string("variant", "", "Internal: POLICY:JIT, run one variant.")

VARIANTS = ("float32:0", "float32:1", "mixed_bfloat16:0", "mixed_float16:0")


def time_variant(policy: str, jit: bool):
  """(first step seconds, steady seconds per step) of one variant."""
  import keras
  import numpy as np
  import tensorflow as tf
  from tf_finetune import model as model_lib, speed, stages
  keras.utils.set_random_seed(0)
  with speed.dtype_policy(policy):
    model = model_lib.build_model(5, FLAGS.image_size, "none")
  plan = stages.StagePlan(1, 1, 1e-3, 1e-4, FLAGS.unfreeze_blocks,
                          jit_compile=jit)
  stages.apply_stage(model, plan, FLAGS.stage)
  size, batch = FLAGS.image_size, FLAGS.batch_size
  images = np.random.default_rng(0).integers(
      0, 256, (batch * (FLAGS.steps + 1), size, size, 3), dtype=np.uint8)
  labels = keras.utils.to_categorical(np.arange(len(images)) % 5, 5)
  dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch)
  times = []

  class Timer(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
      self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
      times.append(time.perf_counter() - self.start)

  model.fit(dataset.cache(), epochs=1, verbose=0, callbacks=[Timer()])
  return times[0], sum(times[1:]) / len(times[1:])


def main(argv):
  del argv
  if FLAGS.variant:
    policy, jit = FLAGS.variant.split(":")
    first, steady = time_variant(policy, jit == "1")
    print(f"RESULT {first} {steady}")
    return
  print(f"bench_step: stage {FLAGS.stage}, {FLAGS.image_size} px, batch "
        f"{FLAGS.batch_size}, {FLAGS.steps} steady steps; load average "
        f"{os.getloadavg()[0]:.2f}")
  baseline = None
  for variant in VARIANTS:
    output = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *sys.argv[1:],
         f"--variant={variant}"], capture_output=True, text=True, check=True)
    line = [l for l in output.stdout.splitlines() if l.startswith("RESULT")]
    first, steady = map(float, line[0].split()[1:])
    baseline = baseline or steady
    policy, jit = variant.split(":")
    print(f"{policy:15} xla={jit}: first step {first:6.1f} s, then "
          f"{FLAGS.batch_size / steady:6.1f} images/s "
          f"({baseline / steady:.2f}x float32 without XLA)", flush=True)
  print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  app.run(main)
