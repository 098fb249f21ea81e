"""Batch augmentation: seeded Keras preprocessing layers, training split only.

Design notes: ARCHITECTURE.md, "Module notes", `augment.py`.
"""

import math
from typing import Optional, Sequence

import keras
import tensorflow as tf

from tf_finetune.config import UserError

GEOMETRIC = ("flip", "rotation", "zoom", "crop")
COLOUR = ("contrast", "brightness")
MIXING = ("mixup", "cutmix")
AUGMENTATIONS = GEOMETRIC + COLOUR + ("randaugment",) + MIXING
# The layers compute in float32 whatever the global Keras dtype policy is:
# under mixed precision they would otherwise round pixel values to float16.
_DTYPE = "float32"
# Seeds of different layers are this far apart: equal seeds would draw
# correlated random numbers.
_SEED_STRIDE = 10


@keras.saving.register_keras_serializable(package="tf_finetune")
class RandomGeometry(keras.layers.Layer):
  """Random flip, rotation, zoom and resized crop as one transform per image.

  Args:
    flip: mirror half of the images horizontally.
    rotation: maximum rotation as a fraction of a full turn (0.1: 36 deg).
    zoom: maximum relative zoom in or out (0.2: 80% to 120%).
    crop: the crop window's sides are drawn from [1 - crop, 1] of the
      image's, independently; 0 disables cropping.
    seed: seed of the layer's SeedGenerator.
  """

  def __init__(self, flip: bool = False, rotation: float = 0.0,
               zoom: float = 0.0, crop: float = 0.0, seed: int = 0,
               **kwargs):
    super().__init__(**kwargs)
    self.flip, self.rotation, self.zoom, self.crop = flip, rotation, zoom, crop
    self.seed = seed
    self.generator = keras.random.SeedGenerator(seed)

  def call(self, images, training=True):
    if not training:
      return images
    return self.transform_images(images,
                                 self.get_random_transformation(images))

  def get_random_transformation(self, images, training=True, seed=None):
    """{"transforms": float32 [B, 8]}: one projective transform per image."""
    del training, seed  # Always random, from the layer's SeedGenerator.
    shape = keras.ops.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]

    def draw(low, high):
      return keras.random.uniform((batch,), low, high, seed=self.generator)

    ones, zeros = keras.ops.ones((batch,)), keras.ops.zeros((batch,))
    flip = (keras.ops.where(draw(0.0, 1.0) < 0.5, -1.0, 1.0) if self.flip
            else ones)
    angle = (draw(-self.rotation, self.rotation) * 2 * math.pi
             if self.rotation else zeros)
    zoom = draw(1 - self.zoom, 1 + self.zoom) if self.zoom else ones
    if self.crop:
      window_x, window_y = draw(1 - self.crop, 1.0), draw(1 - self.crop, 1.0)
      # Centre offsets that keep the window inside the image.
      half_x = (keras.ops.cast(width, "float32") - 1) / 2
      half_y = (keras.ops.cast(height, "float32") - 1) / 2
      shift_x = draw(-1.0, 1.0) * (1 - window_x) * half_x
      shift_y = draw(-1.0, 1.0) * (1 - window_y) * half_y
    else:
      window_x = window_y = ones
      shift_x = shift_y = zeros
    return {"transforms": affine_transforms(flip, angle, zoom, window_x,
                                            window_y, shift_x, shift_y,
                                            height, width)}

  def transform_images(self, images, transformation, training=True):
    del training
    return keras.ops.image.affine_transform(
        keras.ops.cast(images, self.compute_dtype),
        transformation["transforms"], interpolation="bilinear",
        fill_mode="reflect")

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), "flip": self.flip,
            "rotation": self.rotation, "zoom": self.zoom, "crop": self.crop,
            "seed": self.seed}


def affine_transforms(flip, angle, zoom, window_x, window_y, shift_x, shift_y,
                      height, width):
  """Rows [a0, a1, a2, b0, b1, b2, 0, 0] for `keras.ops.image.affine_transform`.

  Each maps an output pixel (x, y) to the input point it samples. Relative
  to the image centre c, the output point q goes through the crop window
  (scale by window, move by shift), the zoom, the rotation and the flip:
  input = c + F R z (W q + t). All arguments but height and width are [B].
  """
  cx = (keras.ops.cast(width, "float32") - 1) / 2
  cy = (keras.ops.cast(height, "float32") - 1) / 2
  cos, sin = keras.ops.cos(angle), keras.ops.sin(angle)
  m00 = flip * cos * zoom * window_x
  m01 = -flip * sin * zoom * window_y
  m10 = sin * zoom * window_x
  m11 = cos * zoom * window_y
  offset_x = flip * zoom * (cos * shift_x - sin * shift_y)
  offset_y = zoom * (sin * shift_x + cos * shift_y)
  zeros = keras.ops.zeros_like(m00)
  return keras.ops.stack([
      m00, m01, cx + offset_x - m00 * cx - m01 * cy,
      m10, m11, cy + offset_y - m10 * cx - m11 * cy,
      zeros, zeros], axis=1)


class FastRandAugment(keras.layers.RandAugment):
  """keras.layers.RandAugment that runs only the ops it picked.

  Workaround: Keras 3.15's `RandAugment.transform_images` applies all 11 ops
  `num_ops` times to the whole batch and keeps the picked result with
  `where` (introduced by keras-team/keras#21499, the fix of #21169, whose
  review flagged the cost): 13-26 images/s at 224 px on 2 cores. Same
  transformation dict, same result, but `tf.switch_case` runs one branch.
  """

  def transform_images(self, images, transformation, training=True):
    if not training:
      return super().transform_images(images, transformation, training)
    images = tf.cast(images, self.compute_dtype)
    transforms = transformation["transforms"]
    for i in range(self.num_ops):
      branches = [self._branch(name, images, value)
                  for name, value in transforms.items()]
      index = tf.cast(transformation["layer_idxes"][i], tf.int32)
      images = tf.switch_case(index, branches)
    return images

  def _branch(self, name, images, value):
    def apply():
      out = getattr(self, name).transform_images(images, value)
      return tf.ensure_shape(tf.cast(out, self.compute_dtype), images.shape)
    return apply


class Augmenter:
  """The augmentation of one run: image layers, then label mixing.

  Split in two so that a pipeline can be both deterministic and parallel:
  `draw` takes the random parameters of a batch from the layers' seed
  generators (cheap, but stateful: must run in order), `apply` does the
  pixel work from them (a pure function: may run on several batches at
  once). Both use the Keras preprocessing layer methods
  `get_random_transformation` and `transform_images` / `transform_labels`,
  which is what `layer(x)` does in one go.

  Attributes:
    layers: per-image layers, applied in order.
    mixers: MixUp / CutMix layers; one of them, chosen per batch, mixes.
  """

  def __init__(self, layers: list, mixers: list, seed: int):
    self.layers = layers
    self.mixers = mixers
    self.choice_seed = keras.random.SeedGenerator(seed)
    # Augmentation layers hold no weights: their variables are the states
    # of their seed generators (sub-layers' included), [seed, counter].
    self.seed_states = [variable for layer in layers + mixers
                        for variable in layer.variables]
    self.seed_states.append(self.choice_seed.state)
    self.initial_seeds = [int(state.numpy()[0]) for state in self.seed_states]

  @property
  def mixes_labels(self) -> bool:
    return bool(self.mixers)

  def draw(self, images, labels=None, key=None) -> dict:
    """The random parameters for one batch (advances the seed generators).

    Args:
      images: [B, H, W, 3]; only the shape is used.
      labels: one-hot [B, C] when mixing, else unused.
      key: (epoch, batch index) int64 tensors: the draws then depend on the
        key alone, not on the batches drawn before (`seed_for_batch`).
    """
    if key is not None:
      with tf.control_dependencies(self.seed_for_batch(*key)):
        return self.draw(images, labels)
    params = {"layers": [layer.get_random_transformation(images, training=True)
                         for layer in self.layers]}
    if self.mixers:
      data = {"images": images, "labels": labels}
      params["mixer"] = keras.random.randint((), 0, len(self.mixers),
                                             seed=self.choice_seed)
      params["mixers"] = [mixer.get_random_transformation(data, training=True)
                          for mixer in self.mixers]
    return params

  def seed_for_batch(self, epoch, batch) -> list:
    """Sets every seed generator to a state made of (its seed, epoch, batch)
    alone; returns the assignments.

    The first word moves by 2**20 per epoch (seeds of different layers are
    _SEED_STRIDE apart, so they never meet); the second leaves 2**12 draws
    per batch, far more than a batch makes.
    """
    return [state.assign(tf.cast(tf.stack([
        seed + tf.cast(epoch, tf.int64) * (1 << 20),
        tf.cast(batch, tf.int64) * (1 << 12)]), state.dtype))
            for state, seed in zip(self.seed_states, self.initial_seeds)]

  def apply(self, images, labels, params: dict):
    """Augments float32 images (and mixes one-hot labels) as `params` say."""
    for layer, transformation in zip(self.layers, params["layers"]):
      images = tf.cast(layer.transform_images(images, transformation,
                                              training=True), tf.float32)
    if not self.mixers:
      return images, labels

    def mixer_branch(mixer, transformation):
      def apply_one():
        mixed = mixer.transform_images(images, transformation, training=True)
        mixed_labels = mixer.transform_labels(labels, transformation,
                                              training=True)
        return (tf.ensure_shape(tf.cast(mixed, tf.float32), images.shape),
                tf.ensure_shape(tf.cast(mixed_labels, tf.float32),
                                labels.shape))
      return apply_one

    branches = [mixer_branch(m, t)
                for m, t in zip(self.mixers, params["mixers"])]
    return tf.switch_case(tf.cast(params["mixer"], tf.int32), branches)


def build_augmenter(names: Sequence[str], seed: int) -> Optional[Augmenter]:
  """Builds the augmentation for the given `--augment` names.

  Args:
    names: names from AUGMENTATIONS (ARCHITECTURE.md, "Module notes"), as
      `config.parse_augment` gives them; empty: no augmentation.
    seed: base seed; each layer gets its own seed derived from it.

  Returns:
    An Augmenter, or None when there is nothing to apply.

  Raises:
    UserError: a name is unknown.
  """
  if not names:
    return None
  unknown = [name for name in names if name not in AUGMENTATIONS]
  if unknown:
    raise UserError(
        f"--augment: unknown augmentation(s) {', '.join(map(repr, unknown))}. "
        f"Valid names are {', '.join(AUGMENTATIONS)} (comma separated), or "
        "'none' to disable augmentation.")
  layers = []
  geometric = [name for name in GEOMETRIC if name in names]
  if geometric == ["flip"]:
    layers.append(keras.layers.RandomFlip("horizontal", seed=seed,
                                          dtype=_DTYPE))
  elif geometric:
    layers.append(RandomGeometry(
        flip="flip" in names, rotation=0.1 * ("rotation" in names),
        zoom=0.2 * ("zoom" in names), crop=0.3 * ("crop" in names),
        seed=seed, dtype=_DTYPE))
  if "contrast" in names:
    layers.append(keras.layers.RandomContrast(
        0.2, value_range=(0, 255), seed=seed + _SEED_STRIDE, dtype=_DTYPE))
  if "brightness" in names:
    layers.append(keras.layers.RandomBrightness(
        0.2, value_range=(0, 255), seed=seed + 2 * _SEED_STRIDE, dtype=_DTYPE))
  if "randaugment" in names:
    layers.append(FastRandAugment(value_range=(0, 255),
                                  seed=seed + 3 * _SEED_STRIDE, dtype=_DTYPE))
  mixers = []
  if "mixup" in names:
    mixers.append(keras.layers.MixUp(seed=seed + 4 * _SEED_STRIDE,
                                     dtype=_DTYPE))
  if "cutmix" in names:
    mixers.append(keras.layers.CutMix(seed=seed + 5 * _SEED_STRIDE,
                                      dtype=_DTYPE))
  return Augmenter(layers, mixers, seed + 6 * _SEED_STRIDE)


def augment_batch(augmenter: Optional[Augmenter],
                  images: tf.Tensor) -> tf.Tensor:
  """Applies the per-image layers to a batch of uint8 images.

  Eagerly or inside tf.data. Label-mixing augmenters need the labels: use
  `augment_labelled_batch`.

  Returns:
    uint8 [B, H, W, 3], rounded and clipped back to the pixel range so that
    the model sees the same dtype and range as in evaluation and serving.
  """
  if augmenter is None:
    return images
  if augmenter.mixes_labels:
    raise ValueError("This augmenter mixes labels; use "
                     "augment_labelled_batch.")
  augmented, _ = augmenter.apply(tf.cast(images, tf.float32), None,
                                 augmenter.draw(images))
  return _to_uint8(augmented, images.shape)


def augment_labelled_batch(augmenter: Optional[Augmenter], images: tf.Tensor,
                           labels: tf.Tensor, num_classes: int):
  """Augments a batch of (uint8 images, int labels), eagerly or in tf.data.

  Returns:
    (uint8 [B, H, W, 3], labels): the labels as given (int [B]) unless the
    augmenter mixes labels, then float32 [B, num_classes] mixtures summing
    to 1.
  """
  if augmenter is None:
    return images, labels
  labels = _prepare_labels(augmenter, labels, num_classes)
  augmented, labels = augmenter.apply(tf.cast(images, tf.float32), labels,
                                      augmenter.draw(images, labels))
  return _to_uint8(augmented, images.shape), labels


def augment_dataset(augmenter: Optional[Augmenter], dataset: tf.data.Dataset,
                    num_classes: int, first_epoch: Optional[int] = None,
                    steps_per_epoch: int = 0) -> tf.data.Dataset:
  """`augment_labelled_batch` over a dataset of batches, deterministic and
  parallel.

  The random parameters are drawn in a sequential map, in batch order, so a
  seed always gives the same transforms (one parallel map of the stateful
  layers would not); the pixel work runs in a parallel map (AUTOTUNE, order
  kept), so several batches can be augmented at once (BUILD_NOTES.md).

  Args:
    augmenter: from `build_augmenter`, or None (nothing to do).
    dataset: batches of (uint8 images, int labels); with `first_epoch`,
      those of consecutive epochs from it, `steps_per_epoch` each.
    num_classes: for the one-hot labels of label-mixing augmentation.
    first_epoch: batch i of epoch e draws from (seed, e, i) only
      (`Augmenter.seed_for_batch`); None: from the generators' running
      state, so every pass over `dataset` differs.
    steps_per_epoch: batches per epoch, with `first_epoch`.
  """
  if augmenter is None:
    return dataset
  # tf.data passes only tensors between maps: `draw_batch` sends the
  # tensors of the parameters and records the rest of their structure (None,
  # Python ints) here when tf.data traces it, which is before `apply_batch`.
  template = {}

  def draw_batch(images, labels, key=None):
    labels = _prepare_labels(augmenter, labels, num_classes)
    params = augmenter.draw(images, labels, key)
    flat = tf.nest.flatten(params)
    template.update(params=params, flat=flat,
                    is_tensor=[tf.is_tensor(leaf) for leaf in flat])
    return images, labels, tuple(leaf for leaf in flat if tf.is_tensor(leaf))

  def apply_batch(images, labels, tensors):
    tensors = iter(tensors)
    flat = [next(tensors) if is_tensor else leaf for leaf, is_tensor in
            zip(template["flat"], template["is_tensor"])]
    params = tf.nest.pack_sequence_as(template["params"], flat)
    augmented, labels = augmenter.apply(tf.cast(images, tf.float32), labels,
                                        params)
    return _to_uint8(augmented, images.shape), labels

  if first_epoch is None:
    drawn = dataset.map(draw_batch)
  else:
    drawn = dataset.enumerate().map(
        lambda index, batch: draw_batch(*batch, key=(
            first_epoch + index // steps_per_epoch, index % steps_per_epoch)))
  return drawn.map(apply_batch, num_parallel_calls=tf.data.AUTOTUNE,
                   deterministic=True)


def _prepare_labels(augmenter: Augmenter, labels, num_classes: int):
  """One-hot float labels when mixing (what MixUp/CutMix mix), else as is."""
  if augmenter.mixes_labels:
    return tf.one_hot(labels, num_classes)
  return labels


def _to_uint8(images: tf.Tensor, shape) -> tf.Tensor:
  images = tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8)
  # The layers lose the static shape on some paths (e.g. inside tf.data);
  # the model's Input needs it.
  images.set_shape(shape)
  return images
