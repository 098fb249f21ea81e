"""The `folder:` source: class folders -> usable files, split three ways.

Design notes: ARCHITECTURE.md, "Module notes", `folder_source.py`.
"""

import hashlib
import os
from typing import Dict, List, Sequence, Tuple

from tf_finetune import file_check
from tf_finetune.config import Config, UserError

SPLITS = ("train", "val", "test")
# Decodable formats (by content; see decode.py).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp",
                    ".dib", ".webp")
# Images TensorFlow cannot decode: listed as skipped (unless the content is
# in fact a decodable format), so that the user learns they were left out.
OTHER_IMAGE_EXTENSIONS = (".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl",
                          ".jp2")
# Folder names accepted for each split of an explicit split level.
_SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation"),
                  "test": ("test",)}


def list_folder_splits(root: str, config: Config):
  """Lists the usable files of a folder source and assigns them to splits.

  Args:
    root: the folder of `--dataset=folder:ROOT`.
    config: for `val_fraction`, `test_fraction`, `seed`, `data_dir`
      (where the file check keeps its results) and `max_image_pixels`.

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
  bad = file_check.find_undecodable(
      [path for per_class in found.values()
       for paths in per_class.values() for path in paths],
      cache_file=file_check.cache_file_for(root, config.data_dir),
      max_pixels=config.max_image_pixels)
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
