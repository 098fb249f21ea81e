"""Model selection: the weights kept, saved and exported are those of the
best validation epoch over both stages (selection.BestWeights), through the
training run's own path (`train.start_stages` / `train.fit_remaining`) on
the tiny stand-in model of test_fault_tolerance.py."""

import keras
import numpy as np
import pytest

from test_fault_tolerance import CrashAt, tiny_config, tiny_run
from tf_finetune import checkpoints, plots, train
from tf_finetune import workdir as workdir_lib


class WeightsAtEpochEnd(keras.callbacks.Callback):
  """Every weight of `model` at each epoch's end, as the callbacks after the
  best-weights keeper see them: at a stage's end, the weights it restored."""

  def __init__(self, model):
    super().__init__()
    self.kept_model = model
    self.weights, self.val_accuracy, self.rank = {}, {}, {}

  def on_epoch_end(self, epoch, logs=None):
    self.weights[epoch] = [v.numpy().copy() for v in self.kept_model.weights]
    self.val_accuracy[epoch] = logs["val_accuracy"]
    # Best accuracy first; on a tie, the lower validation loss.
    self.rank[epoch] = (logs["val_accuracy"], -logs["val_loss"])

  def best_of(self, epochs):
    return max(epochs, key=self.rank.get)


def train_tiny(config, resume=None, extra=()):
  run = tiny_run(config)
  callback, best = train.start_stages(run, resume)
  # Runs after the best-weights keeper (fit_stages puts the keeper first).
  # At a stage's last epoch it records the restored weights, which are that
  # epoch's own only when it is the best; the tests compare kept weights
  # with the best epoch's, for which both agree.
  watch = WeightsAtEpochEnd(run.model)
  run_callbacks = [watch, *extra]
  train.fit_remaining(run, callback, best, resume, run_callbacks)
  return run.model, best, watch


@pytest.fixture
def diverging(tmp_path):
  """Stage head learns; stage finetune's rate is so high that validation
  accuracy falls."""
  return tiny_config(tmp_path, head_epochs=3, finetune_epochs=2,
                     head_learning_rate=3e-2, finetune_learning_rate=50.0,
                     lr_schedule="constant", save_every_steps=0,
                     cache_features=False)


def test_falling_finetune_keeps_the_best_head_epoch(diverging):
  model, best, watch = train_tiny(diverging)
  head_best = watch.best_of(range(3))
  assert max(watch.val_accuracy[e] for e in (3, 4)) < watch.val_accuracy[
      head_best]
  assert (best.best.stage, best.best.epoch) == ("head", head_best)
  for kept, actual in zip(watch.weights[head_best], model.weights):
    np.testing.assert_array_equal(actual.numpy(), kept)


def test_improving_finetune_keeps_its_best_epoch(tmp_path):
  config = tiny_config(tmp_path, head_epochs=1, finetune_epochs=3,
                       head_learning_rate=1e-4, finetune_learning_rate=3e-2,
                       lr_schedule="constant", save_every_steps=0)
  model, best, watch = train_tiny(config)
  epoch = best.best.epoch
  assert epoch == watch.best_of(range(4))
  for kept, actual in zip(watch.weights[epoch], model.weights):
    np.testing.assert_array_equal(actual.numpy(), kept)


def test_stage_finetune_starts_from_the_best_head_epoch(tmp_path):
  config = tiny_config(tmp_path, head_epochs=4, finetune_epochs=1,
                       head_learning_rate=0.5, lr_schedule="constant",
                       save_every_steps=0, cache_features=False)
  starts = {}

  class AtFinetuneStart(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
      if epoch == 4:
        starts["weights"] = [v.numpy().copy() for v in self.model.weights]

  model, best, watch = train_tiny(config, extra=[AtFinetuneStart()])
  head_best = watch.best_of(range(4))
  for kept, start in zip(watch.weights[head_best], starts["weights"]):
    np.testing.assert_array_equal(start, kept)


def test_a_resumed_run_keeps_the_best_epoch_of_before_the_crash(diverging):
  straight_model, straight_best, _ = train_tiny(diverging)
  expected = [v.numpy() for v in straight_model.weights]
  checkpoints.remove_checkpoints(diverging.workdir)
  with pytest.raises(RuntimeError, match="simulated crash"):
    train_tiny(diverging, extra=[CrashAt(epoch=4, step=1)])
  state = workdir_lib.check_workdir(diverging)
  assert state.epoch == 4 and state.best.kept.stage == "head"
  model, best, _ = train_tiny(diverging, resume=state)
  assert best.best == straight_best.best
  for a, b in zip(expected, model.weights):
    np.testing.assert_array_equal(b.numpy(), a)


def test_curves_mark_the_kept_epoch(tmp_path):
  stages_ = [{"name": "head", "history": {"accuracy": [0.4, 0.6],
                                          "val_accuracy": [0.5, 0.7]}},
             {"name": "finetune", "history": {"accuracy": [0.8],
                                              "val_accuracy": [0.6]}}]
  figure = plots.build_curves_figure(stages_, kept={"epoch": 1})
  lines = figure.axes[0].get_lines()
  kept = [l for l in lines if l.get_linestyle() == ":"]
  assert len(kept) == 1 and list(kept[0].get_xdata()) == [2, 2]
  assert any(t.get_text() == "kept" for t in figure.axes[0].texts)
