"""The built-in `demo` dataset: generated shapes, written once as PNG files.

Design notes: ARCHITECTURE.md, "Module notes", `demo_data.py`.
"""

import os
from typing import Callable, Dict, Tuple

import numpy as np
import tensorflow as tf

from tf_finetune import files

DEMO_VERSION = "demo-v1"
IMAGE_SIZE = 64
IMAGES_PER_CLASS = 100
# Fixed, and independent of `--seed`: the demo data is the same for every
# run, only the split and the training vary with the seed.
_GENERATOR_SEED = 20240601
# Mean RGB of each class's shape; every image jitters it.
_CLASS_COLOURS = {
    "circle": (220, 60, 60),
    "cross": (200, 60, 200),
    "square": (60, 200, 80),
    "stripes": (230, 210, 50),
    "triangle": (60, 100, 230),
}

_Mask = Callable[[np.ndarray, np.ndarray, float, float, float], np.ndarray]


def _circle(yy, xx, cy, cx, half):
  return (yy - cy) ** 2 + (xx - cx) ** 2 <= half ** 2


def _square(yy, xx, cy, cx, half):
  return (np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)


def _triangle(yy, xx, cy, cx, half):
  # Apex at the top, base at the bottom, as wide as it is high.
  depth = yy - (cy - half)
  return (depth >= 0) & (yy <= cy + half) & (np.abs(xx - cx) <= depth / 2)


def _cross(yy, xx, cy, cx, half):
  arm = max(half / 3, 2.0)
  vertical = (np.abs(xx - cx) <= arm) & (np.abs(yy - cy) <= half)
  horizontal = (np.abs(yy - cy) <= arm) & (np.abs(xx - cx) <= half)
  return vertical | horizontal


def _stripes(yy, xx, cy, cx, half):
  period = max(int(half // 3), 2)
  bands = ((yy - (cy - half)) // period) % 2 == 0
  return _square(yy, xx, cy, cx, half) & bands


_SHAPES: Dict[str, _Mask] = {
    "circle": _circle,
    "cross": _cross,
    "square": _square,
    "stripes": _stripes,
    "triangle": _triangle,
}


def draw_image(class_name: str, rng: np.random.Generator) -> np.ndarray:
  """Draws one demo image of `class_name`.

  Args:
    class_name: one of the demo classes.
    rng: the random generator; its state decides size, position and colours.

  Returns:
    uint8 [IMAGE_SIZE, IMAGE_SIZE, 3].
  """
  size = IMAGE_SIZE
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  half = rng.uniform(0.16, 0.34) * size
  cy, cx = rng.uniform(half, size - half, size=2)
  background = rng.uniform(30, 170, size=3)
  canvas = background + rng.normal(0, 18, size=(size, size, 3))
  colour = np.asarray(_CLASS_COLOURS[class_name]) + rng.uniform(-35, 35, 3)
  mask = _SHAPES[class_name](yy, xx, cy, cx, half)
  canvas[mask] = colour + rng.normal(0, 10, size=(int(mask.sum()), 3))
  return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


def write_demo_images(folder: str) -> None:
  """Writes every demo image as `folder/CLASS/CLASS_NNN.png`.

  Deterministic: the same bytes on every call (one seeded generator, images
  drawn in a fixed order, PNG encoding is deterministic).

  Args:
    folder: an existing, empty folder.
  """
  rng = np.random.default_rng(_GENERATOR_SEED)
  for class_name in sorted(_CLASS_COLOURS):
    class_dir = os.path.join(folder, class_name)
    files.makedirs(class_dir)
    for index in range(IMAGES_PER_CLASS):
      png = tf.io.encode_png(draw_image(class_name, rng)).numpy()
      files.write_bytes(
          os.path.join(class_dir, f"{class_name}_{index:03d}.png"), png)


def ensure_demo_dataset(data_dir: str = "") -> str:
  """Returns the folder of the demo dataset, generating it on first use.

  Generation writes into a temporary sibling folder and moves it into
  place whole (files.move_folder_into_place), so an interrupted run never
  leaves a half-written dataset that a later run would take for complete.
  If two processes generate at once, the first move wins and the other
  discards its copy.

  Args:
    data_dir: where to keep it; default `~/.cache/tf_finetune`.

  Returns:
    `DATA_DIR/demo-v1`, one sub-folder of PNG files per class.
  """
  root = data_dir or os.path.expanduser("~/.cache/tf_finetune")
  folder = os.path.join(root, DEMO_VERSION)
  if files.isdir(folder):
    return folder
  with files.temp_folder(root) as staging:
    write_demo_images(staging)
    try:
      files.move_folder_into_place(staging, folder)
    except FileExistsError:
      pass  # Another process generated the same images first.
  return folder


def demo_class_names() -> Tuple[str, ...]:
  """The demo classes, sorted as the folder source sorts them."""
  return tuple(sorted(_CLASS_COLOURS))
