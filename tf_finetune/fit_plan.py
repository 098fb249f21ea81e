"""Fit planning: the `model.fit` calls that train what is left of a run,
and the steps of an epoch.

Keras runs every epoch of one `fit` over the whole dataset, so a run
resumed mid-epoch, or one whose stage head trains on cached features (a fit
of its own, features.py), trains in several fits on one epoch axis.
"""

import dataclasses
import math
from typing import List, Optional

from tf_finetune.checkpoints import TrainingState


@dataclasses.dataclass(frozen=True)
class FitSegment:
  """One `model.fit` call: epochs [initial_epoch, epochs), first skipping
  `skip_batches` batches of the training data."""
  initial_epoch: int
  epochs: int
  skip_batches: int


def fit_segments(resume: Optional[TrainingState], total_epochs: int,
                 split_at: int = 0) -> List[FitSegment]:
  """The fits that train what is left after the checkpoint `resume`.

  Keras runs every epoch of one `fit` over the whole dataset, so an epoch
  interrupted at step S is finished by a fit of its own over the dataset
  without its first S batches; the remaining epochs follow in a second fit.
  A fit that would run across epoch `split_at` (> 0) is split there: stage
  head on cached features and stage finetune on images are different fits.
  """
  epoch, step = (resume.epoch, resume.step) if resume else (0, 0)
  segments = []
  if step > 0 and epoch < total_epochs:
    segments.append(FitSegment(epoch, epoch + 1, step))
    epoch += 1
  if 0 < split_at < total_epochs and epoch < split_at:
    segments.append(FitSegment(epoch, split_at, 0))
    epoch = split_at
  if epoch < total_epochs:
    segments.append(FitSegment(epoch, total_epochs, 0))
  return segments


def count_steps(num_examples: int, batch_size: int) -> int:
  """Training batches per epoch (the last batch may be partial)."""
  return math.ceil(num_examples / batch_size)
