"""Tests of the input stage: folder, demo and TFDS sources, splits, batches."""

import io
import math
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

import image_cases
from tf_finetune import data
from tf_finetune import decode
from tf_finetune import demo_data
from tf_finetune import file_check
from tf_finetune import folder_source
from tf_finetune.config import Config, UserError

SIZE = 32


def write_image(path, seed=0, size=(40, 48)):
  """Writes a small random image; the format follows the extension."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, size + (3,), np.uint8)
  fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".gif": "GIF", ".bmp": "BMP"}.get(
      os.path.splitext(path)[1].lower(), "PNG")
  Image.fromarray(pixels).save(path, format=fmt)


def make_folder(root, counts, prefix=""):
  """root/[prefix/]CLASS/img_NN.png for each class; returns the paths."""
  paths = []
  for class_index, (name, count) in enumerate(sorted(counts.items())):
    for i in range(count):
      path = os.path.join(root, prefix, name, f"img_{i:02d}.png")
      write_image(path, seed=100 * class_index + i)
      paths.append(path)
  return paths


def make_config(root, **overrides):
  values = dict(workdir=os.path.join(str(root), "work"),
                dataset=f"folder:{root}", image_size=SIZE, batch_size=4,
                augment=(), val_fraction=0.2, test_fraction=0.0, seed=7)
  values.update(overrides)
  return Config(**values)


@pytest.fixture(autouse=True)
def private_home(tmp_path_factory, monkeypatch):
  """Default caches (~/.cache/tf_finetune) go to a temporary home."""
  monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))


def split_paths(splits):
  return {split: {path for path, _ in files} for split, files in splits.items()}


# ------------------------------------------------------------------ splits


def test_splits_are_stratified_disjoint_and_cover_all_files(tmp_path):
  paths = make_folder(tmp_path, {"a": 12, "b": 12, "c": 12})
  config = make_config(tmp_path, val_fraction=0.25, test_fraction=0.25)
  names, splits, skipped = folder_source.list_folder_splits(str(tmp_path),
                                                            config)
  assert names == ["a", "b", "c"] and skipped == []
  by_split = split_paths(splits)
  assert set.union(*by_split.values()) == set(paths)
  assert sum(len(files) for files in splits.values()) == len(paths)
  for split, files in splits.items():
    assert {label for _, label in files} == {0, 1, 2}, split
    for path, label in files:
      assert os.path.basename(os.path.dirname(path)) == names[label]


def test_split_of_a_file_stays_when_files_are_added(tmp_path):
  make_folder(tmp_path, {"a": 20, "b": 20})
  config = make_config(tmp_path, val_fraction=0.2, test_fraction=0.1)
  before = split_paths(
      folder_source.list_folder_splits(str(tmp_path), config)[1])
  for name in ("a", "b"):
    for i in range(5):
      write_image(os.path.join(tmp_path, name, f"new_{i}.png"), seed=900 + i)
  after = split_paths(
      folder_source.list_folder_splits(str(tmp_path), config)[1])
  for split in data.SPLITS:
    assert before[split] <= after[split], split


def test_split_depends_on_seed(tmp_path):
  make_folder(tmp_path, {"a": 20, "b": 20})
  first = folder_source.list_folder_splits(
      str(tmp_path), make_config(tmp_path, seed=1))[1]
  second = folder_source.list_folder_splits(
      str(tmp_path), make_config(tmp_path, seed=2))[1]
  assert split_paths(first)["val"] != split_paths(second)["val"]


def test_small_classes_get_one_file_in_each_requested_split():
  paths = [f"/d/a/{i}.png" for i in range(3)]
  for seed in range(20):
    splits = folder_source.assign_splits(paths, "/d",
                                         {"val": 0.01, "test": 0.01}, seed)
    assert [len(splits[s]) for s in data.SPLITS] == [1, 1, 1], seed
    splits = folder_source.assign_splits(paths, "/d",
                                         {"val": 0.9, "test": 0.0}, seed)
    assert splits["train"] and splits["val"] and not splits["test"]


def test_explicit_split_folders_are_honoured(tmp_path):
  train = make_folder(tmp_path, {"a": 3, "b": 3}, prefix="train")
  val = make_folder(tmp_path, {"a": 2, "b": 1}, prefix="val")
  test = make_folder(tmp_path, {"b": 2}, prefix="test")  # May lack classes.
  config = make_config(tmp_path, val_fraction=0.5, test_fraction=0.5)
  names, splits, _ = folder_source.list_folder_splits(str(tmp_path), config)
  assert names == ["a", "b"]
  assert split_paths(splits) == {"train": set(train), "val": set(val),
                                 "test": set(test)}


def test_missing_split_folders_are_carved_from_train(tmp_path):
  train = make_folder(tmp_path, {"a": 10, "b": 10}, prefix="train")
  config = make_config(tmp_path, val_fraction=0.2, test_fraction=0.0)
  datasets = data.create_datasets(config)
  assert datasets.class_names == ["a", "b"]
  assert datasets.test is None
  assert datasets.num_examples["test"] == 0
  assert datasets.num_examples["train"] + datasets.num_examples["val"] == len(
      train)
  assert datasets.num_examples["val"] >= 2


def test_class_names_are_sorted_and_hidden_or_non_image_files_ignored(
    tmp_path):
  make_folder(tmp_path, {"zebra": 3, "apple": 3, "mango": 3})
  write_image(os.path.join(tmp_path, "apple", "upper.JPG"))
  write_image(os.path.join(tmp_path, "apple", "pic.bmp"))
  write_image(os.path.join(tmp_path, "apple", "nested", "deep.gif"))
  write_image(os.path.join(tmp_path, "apple", ".hidden.png"))
  write_image(os.path.join(tmp_path, "apple", ".thumbs", "t.png"))
  write_image(os.path.join(tmp_path, ".git", "x", "y.png"))
  (tmp_path / "apple" / "notes.txt").write_text("not an image")
  (tmp_path / "README.md").write_text("top-level files are not classes")
  names, splits, skipped = folder_source.list_folder_splits(
      str(tmp_path), make_config(tmp_path))
  assert names == ["apple", "mango", "zebra"]
  assert skipped == []
  apple = {os.path.relpath(p, tmp_path) for files in splits.values()
           for p, label in files if label == 0}
  assert apple == {"apple/img_00.png", "apple/img_01.png", "apple/img_02.png",
                   "apple/upper.JPG", "apple/pic.bmp", "apple/nested/deep.gif"}


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
  """A folder with every case a real one holds.

  Returns:
    (root, used, skipped): the relative paths that must be used, and
    {relative path: fragment of its skip reason}.
  """
  root = tmp_path_factory.mktemp("messy")
  good, bad = image_cases.decodable_cases(), image_cases.undecodable_cases()

  def put(relative, content):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)

  used = set()
  for name, (content, _, _) in good.items():  # Every format and colour type.
    put(f"a/{name}", content)
    used.add(f"a/{name}")
  renamed = {  # Upper-case extensions, extensions that lie, nested folders.
      "b/UPPER.JPG": "baseline.jpg", "b/Mixed.Png": "palette.png",
      "b/png_named.jpg": "rgba.png", "b/jpeg_named.png": "progressive.jpg",
      "b/gif_named.bmp": "still.gif", "b/bmp_named.gif": "palette4.bmp",
      "b/nested/deeper/photo.JPEG": "cmyk.jpg", "b/camera.jfif": "gray.jpg",
  }
  for relative, name in renamed.items():
    put(relative, good[name][0])
    used.add(relative)
  skipped = {}
  for name, (content, reason) in bad.items():
    put(f"b/{name}", content)
    skipped[f"b/{name}"] = reason
  jpeg = good["baseline.jpg"][0]
  for relative in ("a/.hidden.jpg", "a/.thumbs/t.png", ".git/x/y.png",
                   "b/._photo.jpg"):  # Hidden: ignored even if decodable.
    put(relative, jpeg)
  for relative in ("a/notes.txt", "a/labels.csv", "b/Thumbs.db",
                   "b/photo.jpg.json", "README.md"):  # Not images: ignored.
    put(relative, b"not an image")
  return root, used, skipped


def test_messy_folder_uses_every_decodable_file_and_skips_the_rest(
    messy_folder):
  root, used, skipped = messy_folder
  config = make_config(root, val_fraction=0.25)
  datasets = data.create_datasets(config)
  assert datasets.class_names == ["a", "b"]
  reasons = {os.path.relpath(s["path"], root): s["reason"]
             for s in datasets.skipped_files}
  assert set(reasons) == set(skipped)
  for relative, fragment in skipped.items():
    assert fragment in reasons[relative], (relative, reasons[relative])
  _, splits, _ = folder_source.list_folder_splits(str(root), config)
  assert {os.path.relpath(path, root) for files in splits.values()
          for path, _ in files} == used
  assert sum(datasets.num_examples.values()) == len(used)
  seen = 0
  for split in (datasets.train, datasets.val):
    for images, labels in split:
      assert images.dtype == tf.uint8 and images.shape[1:] == (SIZE, SIZE, 3)
      seen += int(labels.shape[0])
  assert seen == len(used)


def test_up_front_check_agrees_with_the_training_decoder(messy_folder):
  root, used, skipped = messy_folder
  for relative in used | set(skipped):
    content = (root / relative).read_bytes()
    try:
      decode.decode_and_resize(tf.constant(content), SIZE)
      decodable = True
    except tf.errors.InvalidArgumentError:
      decodable = False
    assert decodable == (relative in used), relative


def test_check_results_are_reused_until_a_file_changes(tmp_path):
  paths = make_folder(tmp_path / "images", {"a": 2})
  cache = str(tmp_path / "cache" / "checks.json")
  assert file_check.find_undecodable(paths, cache_file=cache) == {}
  # Same size and time, new bytes: the earlier verdict is reused.
  stat = os.stat(paths[0])
  with open(paths[0], "r+b") as f:
    f.write(b"garbage!")
  os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
  assert file_check.find_undecodable(paths, cache_file=cache) == {}
  # A new modification time: checked again, and now it fails.
  os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  assert set(file_check.find_undecodable(paths, cache_file=cache)) == {
      paths[0]}
  assert set(file_check.find_undecodable(paths)) == {paths[0]}


def test_a_changed_pixel_limit_checks_the_files_again(tmp_path):
  paths = make_folder(tmp_path / "images", {"a": 2})
  height, width = tf.io.decode_png(tf.io.read_file(paths[0])).shape[:2]
  cache = str(tmp_path / "cache" / "checks.json")
  assert file_check.find_undecodable(paths, cache_file=cache) == {}
  # A limit one pixel below the images' size: every file is refused.
  small = int(height * width) - 1
  refused = file_check.find_undecodable(paths, cache_file=cache,
                                           max_pixels=small)
  assert set(refused) == set(paths)
  assert refused[paths[0]] == (
      f"image too large to decode: {width} x {height} pixels "
      f"({height * width / 1e6:.1f} megapixels) is above the limit of "
      f"{small} pixels ({small / 1e6:.1f} megapixels) set by "
      "--max_image_pixels")
  # No limit (0) or the first limit again: nothing stale is reused.
  assert file_check.find_undecodable(paths, cache_file=cache,
                                        max_pixels=0) == {}
  assert set(file_check.find_undecodable(
      paths, cache_file=cache, max_pixels=small)) == set(paths)


def test_progress_bar_on_large_folders_or_on_request(tmp_path, capsys):
  paths = make_folder(tmp_path, {"a": 3})
  bad = os.path.join(tmp_path, "a", "bad.png")
  with open(bad, "wb") as f:
    f.write(b"garbage")
  assert set(file_check.find_undecodable(paths + [bad])) == {bad}
  assert capsys.readouterr().out == ""  # Few files: no bar.
  assert set(file_check.find_undecodable(paths + [bad],
                                            progress=True)) == {bad}
  assert "4/4" in capsys.readouterr().out


def test_undecodable_files_are_skipped_with_reasons(tmp_path):
  good = make_folder(tmp_path, {"a": 4, "b": 4})
  (tmp_path / "a" / "empty.png").write_bytes(b"")
  (tmp_path / "a" / "garbage.jpg").write_bytes(b"this is not a jpeg" * 10)
  encoded = io.BytesIO()
  Image.new("RGB", (40, 40), (10, 200, 30)).save(encoded, format="PNG")
  (tmp_path / "b" / "truncated.png").write_bytes(encoded.getvalue()[:60])
  datasets = data.create_datasets(make_config(tmp_path))
  reasons = {os.path.basename(s["path"]): s["reason"]
             for s in datasets.skipped_files}
  assert set(reasons) == {"empty.png", "garbage.jpg", "truncated.png"}
  assert "empty" in reasons["empty.png"]
  assert all(reason for reason in reasons.values())
  assert sum(datasets.num_examples.values()) == len(good)
  seen = sum(int(labels.shape[0]) for split in (datasets.train, datasets.val)
             for _, labels in split)
  assert seen == len(good)


# ------------------------------------------------------------------ errors


def assert_user_error(config, *fragments):
  with pytest.raises(UserError) as raised:
    data.create_datasets(config)
  for fragment in fragments:
    assert fragment in str(raised.value)


def test_missing_folder_is_a_user_error(tmp_path):
  missing = os.path.join(tmp_path, "nope")
  assert_user_error(make_config(tmp_path, dataset=f"folder:{missing}"),
                    missing)


def test_folder_without_classes_is_a_user_error(tmp_path):
  write_image(os.path.join(tmp_path, "loose.png"))
  assert_user_error(make_config(tmp_path), str(tmp_path), "found none")
  make_folder(tmp_path, {"only": 3})
  assert_user_error(make_config(tmp_path), "only 'only'")


def test_class_without_usable_images_is_a_user_error(tmp_path):
  make_folder(tmp_path, {"a": 3})
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG broken")
  (tmp_path / "b" / "notes.txt").write_text("x")
  assert_user_error(make_config(tmp_path), os.path.join(tmp_path, "b"),
                    "no usable images", "1 could not be decoded")


def test_empty_split_is_a_user_error_naming_the_flag(tmp_path):
  make_folder(tmp_path, {"a": 4, "b": 4})
  assert_user_error(make_config(tmp_path, val_fraction=0.0), "val split",
                    "--val_fraction=0")
  # Two images a class are too few to be sure of a test image.
  make_folder(tmp_path / "tiny", {"a": 2, "b": 2}, prefix="train")
  make_folder(tmp_path / "tiny", {"a": 1, "b": 1}, prefix="val")
  assert_user_error(make_config(tmp_path / "tiny", test_fraction=0.01),
                    "test split", "--test_fraction=0.01")


def test_class_folder_outside_train_is_a_user_error(tmp_path):
  make_folder(tmp_path, {"a": 3, "b": 3}, prefix="train")
  make_folder(tmp_path, {"c": 2}, prefix="val")
  assert_user_error(make_config(tmp_path), "'c'", "train")


# ---------------------------------------------------------------- pipeline


def test_batches_are_uint8_images_and_int32_labels(tmp_path):
  make_folder(tmp_path, {"a": 6, "b": 6})
  write_image(os.path.join(tmp_path, "a", "photo.jpg"), size=(50, 30))
  datasets = data.create_datasets(
      make_config(tmp_path, augment=("flip", "brightness")))
  for split in (datasets.train, datasets.val):
    images_spec, labels_spec = split.element_spec
    assert images_spec.dtype == tf.uint8 and labels_spec.dtype == tf.int32
    assert images_spec.shape.as_list() == [None, SIZE, SIZE, 3]
    images, labels = next(iter(split))
    assert images.shape[1:] == (SIZE, SIZE, 3) and images.shape[0] <= 4
    assert labels.dtype == tf.int32


def test_train_is_reshuffled_each_epoch_and_seeded_val_is_fixed(tmp_path):
  make_folder(tmp_path, {"a": 12, "b": 12})
  config = make_config(tmp_path, batch_size=64)

  def labels_of(dataset):
    return [list(l.numpy()) for _, l in dataset]

  first = data.create_datasets(config)
  epoch1, epoch2 = labels_of(first.train), labels_of(first.train)
  assert epoch1 != epoch2
  again = data.create_datasets(config)
  assert labels_of(again.train) == epoch1
  assert labels_of(first.val) == labels_of(first.val) == labels_of(again.val)


def test_augmented_train_batches_are_the_same_for_the_same_seed(tmp_path):
  make_folder(tmp_path, {"a": 10, "b": 10})
  names = ("flip", "rotation", "zoom", "crop", "contrast", "mixup")

  def two_epochs(seed):
    train_split = data.create_datasets(
        make_config(tmp_path, augment=names, seed=seed, batch_size=2)).train
    return [(x.numpy(), y.numpy()) for _ in range(2) for x, y in train_split]

  first, again, other = two_epochs(3), two_epochs(3), two_epochs(4)
  for (a, la), (b, lb) in zip(first, again):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
  assert not all(np.array_equal(a, b) for (a, _), (b, _) in zip(first, other))


def test_val_is_not_augmented(tmp_path):
  make_folder(tmp_path, {"a": 4, "b": 4})
  plain = data.create_datasets(make_config(tmp_path))
  augmented = data.create_datasets(
      make_config(tmp_path, augment=("flip", "contrast")))
  for (a, _), (b, _) in zip(plain.val, augmented.val):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


# -------------------------------------------------------------------- demo


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
  return demo_data.ensure_demo_dataset(str(tmp_path_factory.mktemp("demo")))


def read_tree(folder):
  files = {}
  for parent, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(parent, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, folder)] = f.read()
  return files


def test_demo_dataset_is_deterministic_and_written_once(demo_dir, tmp_path):
  other = demo_data.ensure_demo_dataset(str(tmp_path))
  assert os.path.basename(other) == demo_data.DEMO_VERSION
  assert read_tree(demo_dir) == read_tree(other)
  # Reused, not rewritten; no staging folder left behind.
  stamp = os.stat(os.path.join(other, "circle", "circle_000.png")).st_mtime_ns
  assert demo_data.ensure_demo_dataset(str(tmp_path)) == other
  assert os.stat(os.path.join(other, "circle",
                              "circle_000.png")).st_mtime_ns == stamp
  assert os.listdir(tmp_path) == [demo_data.DEMO_VERSION]


def test_demo_dataset_goes_through_the_folder_source(demo_dir):
  config = Config(workdir="unused", dataset="demo",
                  data_dir=os.path.dirname(demo_dir), image_size=SIZE,
                  batch_size=50, augment=(), test_fraction=0.1)
  datasets = data.create_datasets(config)
  assert datasets.class_names == list(demo_data.demo_class_names())
  assert len(datasets.class_names) >= 4
  assert sum(datasets.num_examples.values()) == (
      len(datasets.class_names) * demo_data.IMAGES_PER_CLASS)
  assert datasets.skipped_files == [] and datasets.test is not None


def test_demo_classes_are_separable(demo_dir):
  # A nearest-class-mean classifier on 8x8 thumbnails: far above the 20%
  # of chance, or the demo would not show whether training works.
  config = Config(workdir="unused", dataset=f"folder:{demo_dir}",
                  image_size=SIZE, batch_size=500, augment=())
  datasets = data.create_datasets(config)

  def features(dataset):
    images, labels = next(iter(dataset))
    small = tf.image.resize(tf.cast(images, tf.float32), [8, 8])
    return tf.reshape(small, [len(labels), -1]).numpy(), labels.numpy()

  x_train, y_train = features(datasets.train)
  x_val, y_val = features(datasets.val)
  means = np.stack([x_train[y_train == c].mean(0)
                    for c in range(len(datasets.class_names))])
  distances = ((x_val[:, None, :] - means[None]) ** 2).sum(-1)
  accuracy = (distances.argmin(1) == y_val).mean()
  assert accuracy > 0.6


# -------------------------------------------------------------------- tfds


def write_tfds_metadata(data_dir, name, split_sizes):
  """Writes dataset_info.json with the given splits, as a prepare would."""
  builder = tfds.builder(name, data_dir=str(data_dir))
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=split, shard_lengths=[count], num_bytes=0,
                          filename_template=None)
      for split, count in split_sizes.items()]))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)


def mock_tfds(data_dir, num_examples):
  # USE_FILES: the mock takes split names from the metadata written above;
  # it yields `num_examples` random examples for any split or slice.
  return tfds.testing.mock_data(num_examples=num_examples,
                                policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=str(data_dir))


def test_tfds_grayscale_dataset_with_val_carved_from_train(tmp_path):
  write_tfds_metadata(tmp_path, "mnist", {"train": 50, "test": 10})
  config = Config(workdir="unused", dataset="tfds:mnist",
                  data_dir=str(tmp_path), image_size=SIZE, batch_size=8,
                  augment=("flip",), val_fraction=0.2)
  with mock_tfds(tmp_path, num_examples=12):
    datasets = data.create_datasets(config)
    assert datasets.class_names == [str(i) for i in range(10)]
    assert datasets.test is not None and datasets.skipped_files == []
    for split in ("train", "val", "test"):
      dataset = getattr(datasets, split)
      images_spec, labels_spec = dataset.element_spec
      assert images_spec.shape.as_list() == [None, SIZE, SIZE, 3]
      assert images_spec.dtype == tf.uint8 and labels_spec.dtype == tf.int32
      assert sum(len(l) for _, l in dataset) == datasets.num_examples[split]
      images, _ = next(iter(dataset))
      # Grayscale copied to RGB (and flips keep it so): equal channels.
      np.testing.assert_array_equal(images[..., 0], images[..., 2])


def test_tfds_split_names_slice_missing_splits_off_train(tmp_path):
  write_tfds_metadata(tmp_path, "mnist", {"train": 100})
  info = tfds.builder("mnist", data_dir=str(tmp_path)).info
  config = Config(workdir="unused", val_fraction=0.1, test_fraction=0.2)
  assert data._tfds_split_names(info, "mnist", config) == {
      "train": "train[30:]", "val": "train[0:10]", "test": "train[10:30]"}
  with pytest.raises(UserError, match="--val_fraction"):
    data._tfds_split_names(
        info, "mnist", Config(workdir="unused", val_fraction=0.001))


def test_unknown_tfds_dataset_is_a_user_error(tmp_path):
  assert_user_error(make_config(tmp_path, dataset="tfds:no_such_dataset_xyz"),
                    "no_such_dataset_xyz")


def test_tfds_own_validation_split_label_names_and_mixed_labels(tmp_path):
  name = "oxford_flowers102"  # JPEG photos; train, validation and test.
  write_tfds_metadata(tmp_path, name, {"train": 20, "validation": 10,
                                       "test": 10})
  info = tfds.builder(name, data_dir=str(tmp_path)).info
  config = Config(workdir="unused", dataset=f"tfds:{name}",
                  data_dir=str(tmp_path), image_size=SIZE, batch_size=4,
                  augment=("flip", "mixup"), val_fraction=0.3,
                  test_fraction=0.3)
  # Its own splits are used, whatever the fractions say.
  assert data._tfds_split_names(info, name, config) == {
      "train": "train", "val": "validation", "test": "test"}
  with mock_tfds(tmp_path, num_examples=6):
    datasets = data.create_datasets(config)
    assert datasets.class_names == list(info.features["label"].names)
    assert len(datasets.class_names) == 102
    images, labels = next(iter(datasets.train))
    assert images.dtype == tf.uint8 and images.shape[1:] == (SIZE, SIZE, 3)
    assert labels.dtype == tf.float32 and labels.shape[1] == 102
    np.testing.assert_allclose(labels.numpy().sum(axis=1), 1.0, atol=1e-5)
    for split in ("val", "test"):
      dataset = getattr(datasets, split)
      assert dataset.element_spec[1].dtype == tf.int32  # Never mixed.
      assert sum(len(l) for _, l in dataset) == datasets.num_examples[split]


def test_an_epoch_is_the_same_whichever_epoch_the_input_starts_at(tmp_path):
  """What a resumed run relies on: epoch e's batches, augmentation included,
  depend on the seed and e only, not on the epochs drawn before."""
  make_folder(tmp_path, {"a": 9, "b": 9})
  config = make_config(tmp_path, batch_size=4,
                       augment=("flip", "rotation", "contrast", "mixup"))

  def batches(dataset, count):
    return [(x.numpy(), y.numpy()) for x, y in dataset.take(count)]

  first = data.create_datasets(config)
  steps = math.ceil(first.num_examples["train"] / config.batch_size)
  straight = batches(first.train_from(0, 3), 3 * steps)
  later = data.create_datasets(config)  # as in a resumed process
  batches(later.train, steps)  # draws that must not matter
  resumed = batches(later.train_from(2, 3).skip(1), steps - 1)
  for (x, y), (x_resumed, y_resumed) in zip(straight[2 * steps + 1:],
                                            resumed, strict=True):
    np.testing.assert_array_equal(x_resumed, x)
    np.testing.assert_array_equal(y_resumed, y)
  # Each epoch draws its own order and augmentation.
  assert not np.array_equal(straight[0][0], straight[steps][0])
