"""Input pipelines: image sources -> decoded, resized uint8 batches via tf.data.

Design notes: ARCHITECTURE.md, "Module notes", `data.py`.
"""

import dataclasses
import functools
import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from tf_finetune import augment as augment_lib
from tf_finetune import decode
from tf_finetune import demo_data
from tf_finetune import folder_source
from tf_finetune import weighting
from tf_finetune.config import Config, UserError, first_line, parse_dataset
from tf_finetune.folder_source import SPLITS

# Decoded splits up to this size are cached in memory after the first epoch
# (the shuffle buffer then holds about as much again).
CACHE_BUDGET_BYTES = 1 << 30
# Shuffle buffer (in examples) of a split too big to cache: shuffling then
# happens on undecoded records, before decoding.
RECORD_SHUFFLE_BUFFER = 10_000


@dataclasses.dataclass
class Datasets:
  """The input of one run.

  Attributes:
    train: batches of (uint8 [B, S, S, 3], int32 [B]); reshuffled (seeded)
      and augmented on every pass; one pass is one epoch. When the
      augmentation mixes labels (MixUp, CutMix) the labels are float32
      [B, C] instead, one-hot mixtures summing to 1.
    train_from: (first epoch, end epoch) -> the training batches of epochs
      [first, end), `ceil(num_examples["train"] / batch size)` per epoch.
      Epoch e's order and augmentation depend only on --seed and e, so a
      run resumed at any epoch and step trains on the batches an
      uninterrupted run would. The fits on images train on these; `train`
      is the source of stage head's augmented feature views (features.py).
    val: batches in a fixed order, not augmented.
    test: like `val`, or None when the run has no test split.
    class_names: sorted class folder names, or the TFDS label names;
      label i is class_names[i].
    num_examples: examples per split actually used, e.g. {"train": 850,
      "val": 150, "test": 0}.
    skipped_files: [{"path": ..., "reason": ...}] for files that could not
      be used (folder sources only).
    train_unaugmented: the training split like `val`: fixed order, not
      augmented (stage head's cached features with --feature_views=1,
      features.py); None: `train` stands in for it.
    class_counts: examples per class of each split, e.g. {"train": [50,
      25], "val": [10, 10], "test": []}, in class_names order (class
      weighting, weighting.py; a TFDS source counts train and val only);
      None: unknown (stand-ins in tests).
  """
  train: tf.data.Dataset
  train_from: Callable[[int, int], tf.data.Dataset]
  val: tf.data.Dataset
  test: Optional[tf.data.Dataset]
  class_names: list
  num_examples: dict
  skipped_files: list
  train_unaugmented: Optional[tf.data.Dataset] = None
  class_counts: Optional[Dict[str, list]] = None


def create_datasets(config: Config) -> Datasets:
  """Builds the train, validation and test pipelines described by `config`.

  Raises:
    UserError: the source is missing, malformed, has no usable images for a
      class, or a split would be empty.
  """
  scheme, source = parse_dataset(config.dataset)
  if scheme == "demo":
    source = demo_data.ensure_demo_dataset(config.data_dir)
  if scheme == "tfds":
    return _tfds_datasets(source, config)
  return _folder_datasets(source, config)


# ---------------------------------------------------------------- pipeline


def _batches(records: tf.data.Dataset, load, num_examples: int,
             config: Config, training: bool, augmenter=None,
             num_classes: int = 0,
             cache: Optional[bool] = None) -> tf.data.Dataset:
  """Turns undecoded records into prefetched batches of (image, label).

  Args:
    records: one element per example, in a fixed order.
    load: maps one record to (uint8 [S, S, 3], int32 label).
    num_examples: number of records.
    config: for image size, batch size and seed.
    training: shuffle each pass (seeded) and augment (`_training_inputs`).
    augmenter: from `augment.build_augmenter`, or None.
    num_classes: for the one-hot labels of label-mixing augmentation.
    cache: keep decoded images in memory; None: when they fit
      CACHE_BUDGET_BYTES.
  """
  if training:
    return _training_inputs(records, load, num_examples, config, augmenter,
                            num_classes, cache)[0]
  dataset = _decode(records, load,
                    _caches_in_memory(cache, num_examples, config))
  return shard_by_data(dataset.batch(config.batch_size).prefetch(
      tf.data.AUTOTUNE))


def _caches_in_memory(cache: Optional[bool], num_examples: int,
                      config: Config) -> bool:
  """`cache`, or when None, whether the split's decoded images fit
  CACHE_BUDGET_BYTES."""
  if cache is not None:
    return cache
  return num_examples * config.image_size ** 2 * 3 <= CACHE_BUDGET_BYTES


def _decode(records: tf.data.Dataset, load, cache: bool) -> tf.data.Dataset:
  """Decoded examples in the records' order, cached in memory when `cache`."""
  # Deterministic order: with a seed, the same run sees the same batches.
  dataset = records.map(load, num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=True)
  return dataset.cache() if cache else dataset


def _training_inputs(records: tf.data.Dataset, load, num_examples: int,
                     config: Config, augmenter, num_classes: int,
                     cache: Optional[bool] = None
                     ) -> Tuple[tf.data.Dataset,
                                Callable[[int, int], tf.data.Dataset]]:
  """(`Datasets.train`, `Datasets.train_from`) of a training split; both
  read one decode cache.

  A cached split is shuffled after decoding, in one buffer; one too big to
  cache is shuffled before decoding (the buffer then holds records, not
  images). Epoch e of `train_from` is shuffled with a seed made of --seed
  and e, and augmented with draws keyed by (e, batch index).
  """
  cache = _caches_in_memory(cache, num_examples, config)
  decoded = _decode(records, load, cache)

  def shuffled(seed) -> tf.data.Dataset:
    if cache:
      return decoded.shuffle(num_examples, seed=seed,
                             reshuffle_each_iteration=True)
    return records.shuffle(
        min(num_examples, RECORD_SHUFFLE_BUFFER), seed=seed,
        reshuffle_each_iteration=True).map(
            load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def finish(dataset: tf.data.Dataset) -> tf.data.Dataset:
    return shard_by_data(dataset.prefetch(tf.data.AUTOTUNE))

  # Random parameters drawn in order, pixels transformed in parallel:
  # deterministic for a seed, and the costly part uses every core.
  train = finish(augment_lib.augment_dataset(
      augmenter, shuffled(config.seed).batch(config.batch_size), num_classes))
  steps_per_epoch = math.ceil(num_examples / config.batch_size)

  def train_from(first_epoch: int, end_epoch: int) -> tf.data.Dataset:
    # One shuffle per epoch, seeded in Python: a tensor seed (e.g. from a
    # flat_map over epoch numbers) fails in tf.data when the global seed
    # is 0 (TensorFlow compares the pair of seeds with Python's ==).
    epochs = [shuffled(epoch_seed(config.seed, epoch)).batch(config.batch_size)
              for epoch in range(first_epoch, end_epoch)]
    batches = functools.reduce(tf.data.Dataset.concatenate, epochs)
    return finish(augment_lib.augment_dataset(
        augmenter, batches, num_classes, first_epoch=first_epoch,
        steps_per_epoch=steps_per_epoch))

  return train, train_from


def epoch_seed(seed: int, epoch: int) -> int:
  """The shuffle seed of one epoch: --seed and the epoch's number."""
  return seed * (1 << 20) + epoch


def shard_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Sets how a multi-worker strategy splits this dataset: by DATA, on purpose.

  Every worker runs the whole pipeline (same seed, so the same shuffled
  global batches) and keeps its own slice of each batch. So every worker
  runs the same number of steps, which collective training needs, and a
  step trains on the images a one-device run's step would. FILE sharding,
  AUTO's first choice, does not fit: the folder source reads from a tensor
  of paths, not files (AUTO would fall back to DATA with a warning), and a
  TFDS split has few files, often fewer than workers or of uneven size,
  which would leave workers with different step counts. The cost: each
  worker decodes every image (once, when the split fits the cache budget).
  Single-machine strategies ignore the option.
  """
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.DATA)
  return dataset.with_options(options)


# ------------------------------------------------------------------ folder


def _folder_datasets(root: str, config: Config) -> Datasets:
  """Datasets from a folder of class folders (see `folder_source`)."""
  class_names, splits, skipped = folder_source.list_folder_splits(root, config)
  augmenter = augment_lib.build_augmenter(config.augment, config.seed)

  def make(split: str) -> Optional[tf.data.Dataset]:
    if not splits[split]:
      return None
    return files_pipeline(splits[split], config, len(class_names),
                          training=False)

  train, train_from = _training_inputs(
      *_file_records(splits["train"], config), len(splits["train"]), config,
      augmenter, len(class_names))
  return Datasets(
      train=train, val=make("val"), test=make("test"),
      class_names=class_names,
      num_examples={split: len(splits[split]) for split in SPLITS},
      skipped_files=skipped, train_unaugmented=make("train"),
      train_from=train_from,
      class_counts={split: np.bincount(
          np.array([label for _, label in splits[split]], np.int64),
          minlength=len(class_names)).tolist() for split in SPLITS})


def files_pipeline(files: Sequence[Tuple[str, int]], config: Config,
                   num_classes: int, training: bool, augmenter=None,
                   cache: Optional[bool] = None) -> tf.data.Dataset:
  """The batches of one split of a folder source, from its (path, label)s.

  What `create_datasets` builds for each split; public for tools such as
  `tools/bench_input.py`. The files must be decodable (`folder_source`
  checks them up front).

  Args:
    files: [(path, label)].
    config: image size, batch size, seed.
    num_classes: for label-mixing augmentation.
    training: shuffle every pass and augment.
    augmenter: from `augment.build_augmenter`, or None.
    cache: keep decoded images in memory; None decides by CACHE_BUDGET_BYTES.
  """
  records, load = _file_records(files, config)
  return _batches(records, load, len(files), config, training, augmenter,
                  num_classes, cache)


def _file_records(files: Sequence[Tuple[str, int]], config: Config):
  """(records of (path, label), the function that loads one)."""
  paths, labels = zip(*files)
  records = tf.data.Dataset.from_tensor_slices(
      (list(paths), tf.constant(labels, tf.int32)))

  def load(path, label):
    image = decode.decode_and_resize(tf.io.read_file(path), config.image_size,
                                     config.max_image_pixels)
    return image, label

  return records, load


# -------------------------------------------------------------------- tfds


def _tfds_datasets(spec: str, config: Config) -> Datasets:
  """Datasets from `tfds:NAME[:VERSION]`, prepared into `--data_dir`."""
  # Imported here: it is slow to import and only this source needs it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name, _, version = spec.partition(":")
  builder = _prepare_tfds_builder(tfds, name, version or None, config.data_dir)
  image_key, label_key = _tfds_feature_keys(builder.info, name)
  image_feature = builder.info.features[image_key]
  # Encoded (PNG/JPEG) images are decoded by decode.decode_and_resize, like
  # files and like the serving graph: same pixels, 16-bit PNGs scaled to 8
  # bits, large JPEGs decoded at reduced scale.
  encoded = image_feature.np_dtype in (np.uint8, np.uint16)
  channels = image_feature.shape[-1]
  augmenter = augment_lib.build_augmenter(config.augment, config.seed)
  num_classes = builder.info.features[label_key].num_classes

  def load(example):
    label = tf.cast(example[label_key], tf.int32)
    if encoded:
      return decode.decode_and_resize(example[image_key], config.image_size,
                                      config.max_image_pixels), label
    image = example[image_key]
    if channels == 1:
      image = tf.image.grayscale_to_rgb(image)
    return decode.resize_image(tf.cast(image, tf.uint8),
                               config.image_size), label

  decoders = {image_key: tfds.decode.SkipDecoding()} if encoded else None
  datasets, counts = {}, {}

  def count_classes(tfds_split: str) -> list:
    # One pass over the split's labels; the images are read, not decoded.
    return weighting.count_labels(read(tfds_split, False)[0].map(
        lambda example: example[label_key]).batch(4096), num_classes)

  def read(tfds_split: str, training: bool) -> Tuple[tf.data.Dataset, int]:
    records = builder.as_dataset(
        split=tfds_split, shuffle_files=training, decoders=decoders,
        read_config=tfds.ReadConfig(shuffle_seed=config.seed))
    return records, _count(records, builder.info, tfds_split)

  def make(tfds_split: str) -> Tuple[tf.data.Dataset, int]:
    records, count = read(tfds_split, False)
    return _batches(records, load, count, config, False), count

  split_names = _tfds_split_names(builder.info, name, config)
  for split, tfds_split in split_names.items():
    if split != "train":
      datasets[split], counts[split] = make(tfds_split)
  records, counts["train"] = read(split_names["train"], True)
  train, train_from = _training_inputs(records, load, counts["train"], config,
                                       augmenter, num_classes)
  return Datasets(
      train=train, val=datasets["val"], test=datasets.get("test"),
      class_names=list(builder.info.features[label_key].names),
      num_examples={split: counts.get(split, 0) for split in SPLITS},
      skipped_files=[],
      train_unaugmented=make(split_names["train"])[0], train_from=train_from,
      class_counts={split: count_classes(split_names[split])
                    for split in ("train", "val")})


def _prepare_tfds_builder(tfds, name: str, version: Optional[str],
                          data_dir: str):
  """tfds.builder(...) with download_and_prepare(), errors as UserError."""
  shown = f"--dataset=tfds:{name}" + (f":{version}" if version else "")
  try:
    builder = tfds.builder(name, version=version, data_dir=data_dir or None)
  except (tfds.core.registered.DatasetNotFoundError, AssertionError,
          ValueError) as error:
    # AssertionError is what TFDS raises for an unknown version.
    raise UserError(
        f"{shown}: TFDS cannot load it "
        f"({first_line(error) or type(error).__name__}). "
        "tfds.list_builders() lists the dataset names.") from error
  try:
    builder.download_and_prepare()
  except Exception as error:  # pylint: disable=broad-except
    # Whatever fails here (network, disk, a missing optional TFDS module) is
    # for the user to fix; the original error stays chained for debugging.
    where = (f"--data_dir={data_dir!r}" if data_dir
             else "--data_dir (unset: ~/tensorflow_datasets)")
    raise UserError(
        f"{shown}: download_and_prepare failed ({type(error).__name__}: "
        f"{first_line(error) or type(error).__name__}). Without internet, "
        f"prepare the dataset on another machine and copy it into {where}."
    ) from error
  return builder


def _tfds_feature_keys(info, name: str) -> Tuple[str, str]:
  """(image key, label key): the supervised keys, else the first fitting."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  features = info.features
  keys = info.supervised_keys
  if not (isinstance(keys, tuple) and len(keys) == 2
          and all(isinstance(k, str) for k in keys)):
    keys = (next((k for k, f in features.items()
                  if isinstance(f, tfds.features.Image)), None),
            next((k for k, f in features.items()
                  if isinstance(f, tfds.features.ClassLabel)), None))
  image_key, label_key = keys
  if not (image_key in features
          and isinstance(features[image_key], tfds.features.Image)
          and label_key in features
          and isinstance(features[label_key], tfds.features.ClassLabel)):
    raise UserError(
        f"--dataset=tfds:{name}: not an image classification dataset; need "
        f"an Image and a ClassLabel feature, found {features}.")
  return image_key, label_key


def _tfds_split_names(info, name: str, config: Config) -> Dict[str, str]:
  """{split: TFDS split string}; missing val/test are sliced off train.

  Slicing takes the first examples of train: deterministic and independent
  of the seed, not stratified, and as random as the order TFDS wrote.
  """
  available = set(info.splits.keys())
  if "train" not in available:
    raise UserError(f"--dataset=tfds:{name}: has no 'train' split (splits: "
                    f"{sorted(available)}).")
  names = {"val": "validation" if "validation" in available else None,
           "test": "test" if "test" in available else None}
  total = info.splits["train"].num_examples
  start = 0
  for split, flag in (("val", "val_fraction"), ("test", "test_fraction")):
    if names[split]:
      continue
    count = int(round(total * getattr(config, flag)))
    if count == 0 and (split == "val" or getattr(config, flag) > 0):
      raise UserError(
          f"--dataset=tfds:{name}: the {split} split is empty: it has no "
          f"{split} split and --{flag}={getattr(config, flag)} of {total} "
          f"training examples is none. Raise --{flag}.")
    if count:
      names[split] = f"train[{start}:{start + count}]"
      start += count
  names["train"] = f"train[{start}:]" if start else "train"
  return {split: names[split] for split in SPLITS if names[split]}


def _count(records: tf.data.Dataset, info, tfds_split: str) -> int:
  """Examples in a split: the dataset's own count, else the metadata's."""
  cardinality = int(records.cardinality())
  if cardinality >= 0:
    return cardinality
  return info.splits[tfds_split].num_examples
