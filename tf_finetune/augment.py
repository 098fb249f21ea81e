"""Batch augmentation: seeded Keras preprocessing layers, training split only.

`data.py` maps `augment_batch` over BATCHES of the training split, after
`Dataset.batch`: one vectorised call per batch is much cheaper than one per
image, and every image in a batch still gets its own random transform
(the layers draw per-image parameters). The model itself stays free of
augmentation, so the exported serving graph never contains it.

Names accepted by `--augment`:

  flip        random horizontal flip.
  rotation    random rotation of up to +-36 degrees (reflected borders).
  zoom        random zoom in or out by up to 20% (reflected borders).
  contrast    random contrast change by up to 20%.
  brightness  random brightness shift by up to 20% of the value range.
  crop        random resized crop: a random window of 70-100% of each side,
              anywhere in the image, scaled back to full size. Keras 3.15
              has no RandomResizedCrop layer, and RandomCrop needs the image
              size when it is built, so this is RandomTranslation (moves the
              window) followed by a zoom-in-only RandomZoom with independent
              height and width factors (scales it, changing the aspect ratio
              as RandomResizedCrop does).
"""

from typing import Callable, Dict, List, Optional, Sequence

import keras
import tensorflow as tf

from tf_finetune.config import UserError

# The layers compute in float32 whatever the global Keras dtype policy is:
# under mixed precision they would otherwise round pixel values to float16.
_DTYPE = "float32"


def _flip(seed: int) -> List[keras.layers.Layer]:
  return [keras.layers.RandomFlip("horizontal", seed=seed, dtype=_DTYPE)]


def _rotation(seed: int) -> List[keras.layers.Layer]:
  # Factor is a fraction of a full turn: 0.1 -> +-36 degrees.
  return [keras.layers.RandomRotation(0.1, fill_mode="reflect", seed=seed,
                                      dtype=_DTYPE)]


def _zoom(seed: int) -> List[keras.layers.Layer]:
  return [keras.layers.RandomZoom(0.2, fill_mode="reflect", seed=seed,
                                  dtype=_DTYPE)]


def _contrast(seed: int) -> List[keras.layers.Layer]:
  return [keras.layers.RandomContrast(0.2, value_range=(0, 255), seed=seed,
                                      dtype=_DTYPE)]


def _brightness(seed: int) -> List[keras.layers.Layer]:
  return [keras.layers.RandomBrightness(0.2, value_range=(0, 255), seed=seed,
                                        dtype=_DTYPE)]


def _crop(seed: int) -> List[keras.layers.Layer]:
  # A 30% zoom-in leaves a window 70% of the side; moving its centre by up to
  # 15% keeps it inside the image. Smaller zooms may show a reflected border
  # strip, the same trade-off the `zoom` augmentation makes.
  return [
      keras.layers.RandomTranslation(0.15, 0.15, fill_mode="reflect",
                                     seed=seed, dtype=_DTYPE),
      keras.layers.RandomZoom((-0.3, 0.0), (-0.3, 0.0), fill_mode="reflect",
                              seed=seed + 1, dtype=_DTYPE),
  ]


AUGMENTATIONS: Dict[str, Callable[[int], List[keras.layers.Layer]]] = {
    "flip": _flip,
    "rotation": _rotation,
    "zoom": _zoom,
    "contrast": _contrast,
    "brightness": _brightness,
    "crop": _crop,
}

# Seeds of consecutive augmentations are this far apart, so that no two
# layers share a seed (equal seeds would draw correlated random numbers).
_SEED_STRIDE = 10


def build_augmenter(names: Sequence[str],
                    seed: int) -> Optional[keras.Sequential]:
  """Builds the augmentation model for the given `--augment` names.

  Args:
    names: augmentation names, applied in this order (see the module
      docstring); an empty sequence or just "none" means no augmentation.
    seed: base seed; each layer gets its own seed derived from it, so a new
      augmenter with the same names and seed produces the same sequence of
      transforms.

  Returns:
    A `keras.Sequential` of preprocessing layers, or None when there is
    nothing to apply.

  Raises:
    UserError: a name is not one of `AUGMENTATIONS`.
  """
  names = [name.strip().lower() for name in names if name.strip()]
  if names in ([], ["none"]):
    return None
  unknown = [name for name in names if name not in AUGMENTATIONS]
  if unknown:
    raise UserError(
        f"--augment: unknown augmentation(s) {', '.join(map(repr, unknown))}. "
        f"Valid names are {', '.join(AUGMENTATIONS)} (comma separated), or "
        "'none' to disable augmentation.")
  layers = []
  for index, name in enumerate(names):
    layers.extend(AUGMENTATIONS[name](seed + _SEED_STRIDE * index))
  return keras.Sequential(layers, name="augmenter")


def augment_batch(augmenter: Optional[keras.Sequential],
                  images: tf.Tensor) -> tf.Tensor:
  """Applies `augmenter` to a batch of uint8 images, eagerly or in tf.data.

  Args:
    augmenter: the result of `build_augmenter`; None returns `images` as is.
    images: uint8 [B, H, W, 3].

  Returns:
    uint8 [B, H, W, 3]: the augmented images, rounded and clipped back to
    the pixel range so that the model sees the same dtype and value range
    as in evaluation and serving.
  """
  if augmenter is None:
    return images
  augmented = augmenter(tf.cast(images, tf.float32), training=True)
  augmented = tf.cast(tf.clip_by_value(tf.round(augmented), 0, 255), tf.uint8)
  # The layers lose the static shape on some paths (e.g. inside tf.data);
  # the model's Input needs it.
  augmented.set_shape(images.shape)
  return augmented
