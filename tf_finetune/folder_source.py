"""The `folder:` source: class folders -> usable files, split three ways.

Everything here runs once, up front, in plain Python and one tf.data pass:
list the class folders, find the files that cannot be decoded, and assign
the rest to train, val and test. `data.py` turns the result into pipelines.

Which files count: every visible file whose name ends in an image extension
(any case) is a candidate; everything else (hidden entries, `.txt`, `.csv`,
...) is ignored. Candidates are decoded by content, so a PNG named `.jpg` is
used, and those that cannot be decoded (empty, truncated, not an image, a
format TensorFlow cannot read such as TIFF or HEIC) are skipped and listed
with the reason.

Why check every file up front rather than drop bad ones on the fly: the
split sizes, steps per epoch and `report.json` must say exactly which files
were used, and a bad file must not stop a run hours in. Checking decodes
each file once, in parallel, at a thumbnail size (libjpeg then skips most
of the work); `tools/bench_input.py` prints the files/second.

Layouts (hidden entries and non-image files are ignored everywhere):

  DIR/CLASS/...                  classes only: val and test are carved from
                                 each class (`assign_splits`).
  DIR/train/CLASS/... [DIR/val/CLASS/...] [DIR/test/CLASS/...]
                                 explicit splits: those present are used as
                                 they are, the missing ones carved from train.
"""

import hashlib
import os
import re
import time
from typing import Dict, List, Optional, Sequence, Tuple

import keras
import tensorflow as tf
from absl import logging

from tf_finetune import decode
from tf_finetune.config import Config, UserError

SPLITS = ("train", "val", "test")
# Decodable formats (by content; see decode.py).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp",
                    ".dib", ".webp")
# Images TensorFlow cannot decode: listed as skipped (unless the content is
# in fact a decodable format), so that the user learns they were left out.
OTHER_IMAGE_EXTENSIONS = (".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl",
                          ".jp2")
# The check decodes at this side: a JPEG of 8x this or more is then decoded
# at 1/8 scale, by the same code path (decode.decode_and_resize) as training.
CHECK_SIZE = 16
# A progress bar is shown when checking at least this many files.
PROGRESS_MIN_FILES = 2000
# Folder names accepted for each split of an explicit split level.
_SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation"),
                  "test": ("test",)}


def list_folder_splits(root: str, config: Config):
  """Lists the usable files of a folder source and assigns them to splits.

  Args:
    root: the folder of `--dataset=folder:ROOT`.
    config: for `val_fraction`, `test_fraction` and `seed`.

  Returns:
    (class_names, {split: [(path, label), ...]}, skipped_files) with all of
    SPLITS as keys ("test" is empty when not requested), and skipped_files
    as in `Datasets`.

  Raises:
    UserError: see `create_datasets`.
  """
  if not os.path.isdir(root):
    raise UserError(f"--dataset=folder:{root}: {root!r} does not exist or is "
                    "not a folder.")
  split_dirs = _find_split_folders(root) or {"train": root}
  class_names = _list_class_names(split_dirs["train"])
  found = {split: _list_split_files(folder, class_names, split_dirs["train"])
           for split, folder in split_dirs.items()}
  bad = find_undecodable([path for per_class in found.values()
                          for paths in per_class.values() for path in paths])
  usable = {}
  for split, per_class in found.items():
    usable[split] = {name: [p for p in paths if p not in bad]
                     for name, paths in per_class.items()}
    _require_usable_images(split_dirs[split], usable[split], bad)
  splits = _assign_all(usable, class_names, root, config)
  _require_nonempty_splits(splits, split_dirs, root, config)
  skipped = [{"path": path, "reason": reason}
             for path, reason in sorted(bad.items())]
  return class_names, splits, skipped


def _visible_entries(folder: str) -> List[str]:
  """Sorted entries of `folder`, without hidden ones ('.DS_Store', '.git')."""
  return sorted(e for e in os.listdir(folder) if not e.startswith("."))


def _subfolders(folder: str) -> List[str]:
  return [e for e in _visible_entries(folder)
          if os.path.isdir(os.path.join(folder, e))]


def _find_split_folders(root: str) -> Dict[str, str]:
  """{split: folder} for an explicit split level, or {} when there is none.

  The level is recognised when every sub-folder of `root` is a split name,
  "train" is among them, and it holds class folders: classes named "train"
  and "cat" are read as two classes.
  """
  names = {name: split for split, names in _SPLIT_FOLDERS.items()
           for name in names}
  subdirs = _subfolders(root)
  if ("train" not in subdirs or not set(subdirs) <= set(names)
      or not _subfolders(os.path.join(root, "train"))):
    return {}
  return {names[d]: os.path.join(root, d) for d in subdirs}


def _list_class_names(folder: str) -> List[str]:
  """Sorted class folder names under `folder`; at least two."""
  names = _subfolders(folder)
  if len(names) < 2:
    found = f"only {names[0]!r}" if names else "none"
    raise UserError(
        f"--dataset: {folder!r} must hold one sub-folder of images per class, "
        f"at least two classes; found {found}.")
  return names


def _list_split_files(folder: str, class_names: Sequence[str],
                      train_folder: str) -> Dict[str, List[str]]:
  """{class name: sorted image paths} of one split folder.

  A val/ or test/ folder may lack some classes, but may not add any.
  """
  unknown = [e for e in _subfolders(folder) if e not in class_names]
  if unknown:
    raise UserError(
        f"--dataset: {folder!r} has class folders {unknown} that "
        f"{train_folder!r} lacks; the classes come from the train folder.")
  return {name: _list_images(os.path.join(folder, name))
          for name in class_names if os.path.isdir(os.path.join(folder, name))}


def _list_images(class_dir: str) -> List[str]:
  """Image files under `class_dir`, recursively, without hidden entries."""
  paths = []
  for parent, dirs, names in os.walk(class_dir):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    paths.extend(os.path.join(parent, n) for n in sorted(names)
                 if not n.startswith(".")
                 and n.lower().endswith(IMAGE_EXTENSIONS
                                        + OTHER_IMAGE_EXTENSIONS))
  return paths


def find_undecodable(paths: Sequence[str],
                     progress: Optional[bool] = None) -> Dict[str, str]:
  """Finds the files that `decode.decode_and_resize` cannot decode.

  One parallel tf.data pass decodes every file at CHECK_SIZE with the
  pipeline's own decoder (a header check would pass truncated files); only
  the few failures are read again, eagerly, to say why.

  Args:
    paths: candidate image files.
    progress: show a progress bar; None: only for PROGRESS_MIN_FILES or more.

  Returns:
    {path: reason} for every file that cannot be used.
  """
  if not paths:
    return {}
  started = time.perf_counter()

  def check(index, path):
    image = decode.decode_and_resize(tf.io.read_file(path), CHECK_SIZE)
    # Returning something computed from the pixels keeps the decode from
    # being optimised away.
    return index, tf.reduce_max(image)

  checked = (tf.data.Dataset.from_tensor_slices((tf.range(len(paths)),
                                                 list(paths)))
             .map(check, num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=False)
             .ignore_errors()
             .batch(256))
  if progress is None:
    progress = len(paths) >= PROGRESS_MIN_FILES
  bar = keras.utils.Progbar(len(paths), unit_name="file") if progress else None
  decoded = set()
  for indices, _ in checked.as_numpy_iterator():
    decoded.update(int(i) for i in indices)
    if bar:
      bar.update(len(decoded))
  bad = {path: describe_failure(path) for index, path in enumerate(paths)
         if index not in decoded}
  if bar:
    bar.update(len(paths), finalize=True)
  seconds = time.perf_counter() - started
  logging.info("Checked %d image files in %.1f s (%.0f files/s): %d cannot "
               "be used.", len(paths), seconds, len(paths) / seconds, len(bad))
  return bad


def describe_failure(path: str) -> str:
  """One line saying why `path` cannot be decoded."""
  try:
    with open(path, "rb") as f:
      content = f.read()
  except OSError as error:
    return f"unreadable: {error.strerror or error}"
  if not content:
    return "empty file (0 bytes)"
  found = decode.sniff_format(content[:32])
  supported = ", ".join(decode.SUPPORTED_FORMATS)
  if not found:
    return (f"not an image: the content is none of {supported} "
            f"(starts with {content[:8]!r})")
  if found not in decode.SUPPORTED_FORMATS:
    return (f"unsupported image format {found}; convert it to one of "
            f"{supported}")
  try:
    decode.decode_and_resize(tf.constant(content), CHECK_SIZE)
  except tf.errors.OpError as error:
    return (f"undecodable {found} (truncated, corrupt or an unsupported "
            f"variant): {_op_error_text(error)}")
  return f"could not be decoded as {found}"


def _op_error_text(error: tf.errors.OpError) -> str:
  """TF's own words, without the '{{function_node ...}}' and '[Op:...]'."""
  text = re.sub(r"\{\{.*?\}\}", "", error.message or "")
  text = re.sub(r"\[Op:.*", "", text, flags=re.DOTALL)
  # tf.debugging asserts append the compared values; the message says it.
  text = re.sub(r"Condition x .*", "", text, flags=re.DOTALL)
  return " ".join(text.split()) or type(error).__name__


def _require_usable_images(split_folder: str, per_class: Dict[str, List[str]],
                           bad: Dict[str, str]) -> None:
  for name, paths in per_class.items():
    if paths:
      continue
    class_dir = os.path.join(split_folder, name)
    undecodable = sum(p.startswith(class_dir + os.sep) for p in bad)
    detail = f" ({undecodable} could not be decoded)" if undecodable else ""
    raise UserError(
        f"--dataset: class folder {class_dir!r} has no usable images{detail}; "
        f"expected files ending in {', '.join(IMAGE_EXTENSIONS)} (any case). "
        "Add images or remove the folder.")


def assign_splits(paths: Sequence[str], root: str, fractions: Dict[str, float],
                  seed: int) -> Dict[str, List[str]]:
  """Assigns the files of ONE class to train, val and test.

  Each file's split depends only on a hash of (seed, its path relative to
  `root`), so adding or removing other files does not move it: a model's
  validation images never leak into a later run's training set. The hash,
  a number in [0, 1), puts the file in val below `fractions["val"]`, in test
  below `fractions["val"] + fractions["test"]`, else in train. Doing that per
  class makes the split stratified. Small classes would often get no val or
  test file by chance, so an empty split (train always; val and test when
  their fraction is > 0 and the class has >= 3 files) takes the file of the
  biggest split whose hash lies closest to its range.

  Args:
    paths: the class's usable files.
    root: the dataset folder; hashed paths are relative to it.
    fractions: {"val": f, "test": f}.
    seed: `--seed`.

  Returns:
    {split: sorted paths} for every split in SPLITS.
  """
  val, test = fractions.get("val", 0.0), fractions.get("test", 0.0)
  ranges = {"val": (0.0, val), "test": (val, val + test),
            "train": (val + test, 1.0)}
  position = {p: _hash_unit(seed, os.path.relpath(p, root)) for p in paths}
  buckets = {split: [] for split in SPLITS}
  for path in paths:
    split = next((s for s in ("val", "test") if position[path] < ranges[s][1]),
                 "train")
    buckets[split].append(path)
  needed = ["train"] + [s for s in ("val", "test")
                        if fractions.get(s, 0.0) > 0 and len(paths) >= 3]
  for split in needed:
    if buckets[split] or not paths:
      continue
    donor = max(SPLITS, key=lambda s: len(buckets[s]))
    low, high = ranges[split]
    moved = min(buckets[donor], key=lambda p: (
        max(low - position[p], position[p] - high, 0.0), p))
    buckets[donor].remove(moved)
    buckets[split].append(moved)
  return {split: sorted(files) for split, files in buckets.items()}


def _hash_unit(seed: int, relative_path: str) -> float:
  """A stable pseudo-random number in [0, 1) for (seed, path)."""
  key = f"{seed}:{relative_path.replace(os.sep, '/')}".encode("utf-8")
  digest = hashlib.sha256(key).digest()
  return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def _assign_all(usable: Dict[str, Dict[str, List[str]]],
                class_names: Sequence[str], root: str,
                config: Config) -> Dict[str, List[Tuple[str, int]]]:
  """{split: [(path, label)]}: split folders as given, the rest carved."""
  # Only splits without their own folder are carved from train.
  fractions = {"val": 0.0 if "val" in usable else config.val_fraction,
               "test": 0.0 if "test" in usable else config.test_fraction}
  splits = {split: [] for split in SPLITS}
  for label, name in enumerate(class_names):
    carved = assign_splits(usable["train"][name], root, fractions, config.seed)
    for split in SPLITS:
      own_folder = split != "train" and split in usable
      paths = usable[split].get(name, []) if own_folder else carved[split]
      splits[split].extend((path, label) for path in paths)
  return splits


def _require_nonempty_splits(splits, split_dirs: Dict[str, str], root: str,
                             config: Config) -> None:
  """Raises UserError for an empty split that the run needs."""
  for split, flag in (("val", "val_fraction"), ("test", "test_fraction")):
    if splits[split]:
      continue
    if split in split_dirs:
      raise UserError(f"--dataset=folder:{root}: the {split} split is empty: "
                      f"{split_dirs[split]!r} has no class folders with "
                      "images.")
    fraction = getattr(config, flag)
    if split == "val" and fraction == 0:
      raise UserError(
          f"--dataset=folder:{root}: the val split is empty: --val_fraction=0 "
          "and there is no val/ folder, but training needs validation data. "
          "Set --val_fraction above 0 or add a val/ folder next to train/.")
    if fraction > 0:
      raise UserError(
          f"--dataset=folder:{root}: the {split} split is empty with "
          f"--{flag}={fraction}: too few images (a class needs at least 3 "
          f"usable images to be sure of one {split} image). Raise --{flag}, "
          f"add images, or give the data an explicit {split}/ folder.")
