"""Size and save/load time of one checkpoint of the default model.

  python tools/measure_checkpoint.py

ResNet50 at 224 px, 5 classes, --unfreeze_blocks=3: the stage "head"
checkpoint holds the weights and the head's Adam state, the "finetune" one
also Adam's two moments of the unfrozen blocks. Prints one line per stage.
"""

import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from tf_finetune import model as model_lib  # noqa: E402
from tf_finetune import stages  # noqa: E402


def main():
  model = model_lib.build_model(5, 224, "none")
  plan = stages.StagePlan(1, 1, 1e-3, 1e-5, unfreeze_blocks=3)
  for stage in (stages.HEAD, stages.FINETUNE):
    stages.apply_stage(model, plan, stage)
    path = os.path.join(tempfile.mkdtemp(), "ckpt.weights.h5")
    started = time.perf_counter()
    model.save_weights(path)
    saved = time.perf_counter()
    model.load_weights(path)
    loaded = time.perf_counter()
    print(f"{stage}: {os.path.getsize(path) / 1e6:.0f} MB, save "
          f"{saved - started:.2f} s, load {loaded - saved:.2f} s")


if __name__ == "__main__":
  main()
