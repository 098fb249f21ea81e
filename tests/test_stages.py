"""Stage semantics on a real ResNet50 (32 px, random weights from a file)."""

import numpy as np
import keras
import pytest
import tensorflow as tf

from conftest import write_backbone_weights
from tf_finetune import model as model_lib
from tf_finetune import stages
from tf_finetune.config import RESNET50_BLOCKS

# Trains both stages on the ResNet50: the tests using it are `slow`
# (conftest.py).
SLOW_FIXTURES = {"trained"}

SIZE, CLASSES, UNFREEZE = 32, 3, 2
PLAN = stages.StagePlan(head_epochs=1, finetune_epochs=1,
                        head_learning_rate=1e-3, finetune_learning_rate=1e-4,
                        unfreeze_blocks=UNFREEZE)


def _values(layer):
  return {v.path: v.numpy().copy() for v in layer.weights}


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
  """A backbone file with non-trivial BatchNorm statistics."""
  path = tmp_path_factory.mktemp("weights") / "resnet50.weights.h5"
  return str(path), write_backbone_weights(path, SIZE, seed=1)


@pytest.fixture(scope="module")
def trained(weights_file):
  """Runs both stages in one fit; snapshots the backbone after stage head."""
  path, loaded = weights_file
  keras.utils.set_random_seed(0)
  model = model_lib.build_model(CLASSES, SIZE, weights=path)
  backbone = model_lib.get_backbone(model)
  snapshots = {}

  class Snapshot(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
      snapshots[epoch] = (_values(backbone),
                          _values(model.get_layer("classifier")))

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (32, SIZE, SIZE, 3), dtype=np.uint8)
  labels = keras.utils.to_categorical(np.arange(32) % CLASSES, CLASSES)
  dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
  stages.apply_stage(model, PLAN, stages.HEAD)
  head_params = _values(model.get_layer("classifier"))
  callback = stages.TwoStageCallback(PLAN, stages.HEAD, 32, 8)
  history = model.fit(dataset, epochs=PLAN.total_epochs,
                      callbacks=[callback, Snapshot()], verbose=0,
                      shuffle=False)
  return dict(model=model, loaded=loaded, snapshots=snapshots,
              head_params=head_params, history=history.history,
              callback=callback)


def test_backbone_is_bit_identical_after_stage_head(trained):
  after_head, _ = trained["snapshots"][0]
  loaded = trained["loaded"]
  assert after_head.keys() == loaded.keys()
  differing = [k for k in loaded if not np.array_equal(loaded[k], after_head[k])]
  assert differing == []


def test_head_trains_in_both_stages(trained):
  _, head_after_head = trained["snapshots"][0]
  _, head_after_finetune = trained["snapshots"][1]
  kernel = "classifier/kernel"
  assert not np.array_equal(trained["head_params"][kernel],
                            head_after_head[kernel])
  assert not np.array_equal(head_after_head[kernel],
                            head_after_finetune[kernel])


def test_finetune_changes_exactly_the_top_blocks_convolutions(trained):
  loaded = trained["loaded"]
  final, _ = trained["snapshots"][1]
  changed = {k for k in loaded if not np.array_equal(loaded[k], final[k])}
  top = RESNET50_BLOCKS[-UNFREEZE:]
  expected = {k for k in loaded
              if k.split("_")[0] + "_" + k.split("_")[1] in top
              and "_conv/" in k}
  assert expected  # kernels and biases of the block's convolutions
  assert changed == expected
  moving = [k for k in changed if "moving_" in k or "_bn/" in k]
  assert moving == []


def test_preprocessing_is_the_same_fixed_map_after_both_stages(trained):
  layer = trained["model"].get_layer(model_lib.PREPROCESS_NAME)
  kernel, bias = layer.get_weights()
  np.testing.assert_array_equal(kernel[0, 0], np.eye(3)[::-1])  # RGB -> BGR
  np.testing.assert_array_equal(
      bias, -np.array(model_lib.IMAGENET_MEAN_BGR, "float32"))


def test_learning_rate_of_each_stage_is_the_configured_one(trained):
  np.testing.assert_allclose(trained["history"]["learning_rate"],
                             [PLAN.head_learning_rate,
                              PLAN.finetune_learning_rate], rtol=1e-6)


def test_stage_reports_describe_both_stages(trained):
  reports = trained["callback"].stage_reports()
  assert [r["name"] for r in reports] == ["head", "finetune"]
  head, finetune = reports
  assert head["trainable_params"] == (2048 * CLASSES + CLASSES)
  assert finetune["trainable_params"] > head["trainable_params"]
  assert finetune["unfrozen_blocks"] == list(RESNET50_BLOCKS[-UNFREEZE:])
  assert [r["learning_rate"] for r in reports] == [1e-3, 1e-4]
  for r in reports:
    assert r["seconds"] > 0 and r["images_per_second"] > 0
    assert len(r["history"]["loss"]) == r["epochs"] == 1


def test_weights_file_loads_bit_identically(weights_file):
  path, loaded = weights_file
  backbone = model_lib.get_backbone(model_lib.build_model(CLASSES, 48, path))
  values = _values(backbone)
  assert all(np.array_equal(values[k], loaded[k]) for k in loaded)


@pytest.mark.parametrize("blocks", [0, 1, 5, 16])
def test_unfreeze_blocks_selects_exactly_the_top_blocks(blocks):
  model = model_lib.build_model(CLASSES, SIZE, weights="none")
  plan = stages.StagePlan(1, 1, 1e-3, 1e-4, blocks)
  stages.set_backbone_trainable(model_lib.get_backbone(model),
                                plan.unfrozen_blocks(stages.FINETUNE))
  trainable_layers = {stages.block_of(v.path.split("/")[0])
                      for v in model_lib.get_backbone(model).trainable_weights}
  assert trainable_layers == set(RESNET50_BLOCKS[len(RESNET50_BLOCKS) - blocks:])
  bn_trainable = [l.name for l in model_lib.get_backbone(model).layers
                  if isinstance(l, keras.layers.BatchNormalization)
                  and l.trainable]
  assert bn_trainable == []


def test_stage_plan_maps_epochs_to_stages():
  plan = stages.StagePlan(2, 3, 1e-3, 1e-5, 3)
  assert [plan.stage_at(e) for e in range(5)] == ["head"] * 2 + ["finetune"] * 3
  assert [e for e in range(5) if plan.ends_stage(e)] == [1, 4]
  assert plan.unfrozen_blocks("head") == ()
  assert plan.unfrozen_blocks("finetune") == RESNET50_BLOCKS[-3:]
  assert stages.block_of("conv4_block6_2_bn") == "conv4_block6"
  assert stages.block_of("conv1_conv") is None


@pytest.mark.parametrize("steps_per_epoch,epochs", [
    (4, 40), (7, 23), (8, 20), (16, 10), (100, 10)])
def test_finetune_runs_the_epochs_or_the_min_steps_whichever_is_more(
    steps_per_epoch, epochs):
  """README: stage finetune trains max(--finetune_epochs,
  ceil(--finetune_min_steps / steps per epoch)) epochs."""
  from tf_finetune.config import Config
  config = Config(workdir="w", finetune_epochs=10, finetune_min_steps=160)
  plan = stages.StagePlan.from_config(config, steps_per_epoch=steps_per_epoch)
  assert plan.finetune_epochs == epochs
  assert plan.head_epochs == config.head_epochs
  assert plan.total_epochs == config.head_epochs + epochs


def test_no_stage_finetune_stays_none_whatever_the_min_steps():
  from tf_finetune.config import Config
  config = Config(workdir="w", finetune_epochs=0, finetune_min_steps=160)
  assert stages.StagePlan.from_config(config, steps_per_epoch=4
                                      ).finetune_epochs == 0


def test_warmup_and_decay_span_the_planned_finetune_steps():
  """With 4 steps an epoch, 160 min steps plan 40 epochs: the rate warms up
  over the first 10% (16 steps), peaks, and decays to zero at step 160."""
  from tf_finetune.config import Config
  config = Config(workdir="w", finetune_epochs=10, finetune_min_steps=160,
                  finetune_learning_rate=1e-4, warmup_fraction=0.1,
                  lr_schedule="cosine")
  schedule = stages.StagePlan.from_config(
      config, steps_per_epoch=4).schedule_of(stages.FINETUNE)
  rate = lambda step: float(schedule(step))
  assert rate(0) == 0.0
  assert rate(8) == pytest.approx(0.5e-4, rel=1e-5)
  assert rate(16) == pytest.approx(1e-4, rel=1e-5)
  assert rate(16 + 72) == pytest.approx(0.5e-4, rel=1e-4)
  assert rate(159) == pytest.approx(0.0, abs=1e-7) and rate(159) > 0
  assert rate(160) == pytest.approx(0.0, abs=1e-12)


def test_cosine_schedule_warms_stage_finetune_up_and_not_stage_head():
  # Stage finetune: 2 epochs x 5 steps, 20% of them (2 steps) warm up from
  # zero, then the rate decays to zero over the remaining 8.
  plan = stages.StagePlan(2, 2, 1e-3, 1e-4, 1, steps_per_epoch=5,
                          lr_schedule="cosine", warmup_fraction=0.2)
  finetune = plan.schedule_of(stages.FINETUNE)
  rates = [float(finetune(step)) for step in (0, 1, 2, 6, 10)]
  np.testing.assert_allclose(rates, [0.0, 0.5e-4, 1e-4, 0.5e-4, 0.0],
                             atol=1e-12)
  head = plan.schedule_of(stages.HEAD)  # No warmup: starts at its rate.
  np.testing.assert_allclose([float(head(0)), float(head(5))],
                             [1e-3, 0.5e-3], atol=1e-12)


def test_base_config_states_the_default_recipe():
  """configs/base.cfg spells out the recipe; it must be the defaults'."""
  import os
  from tf_finetune.config import Config
  path = os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "configs", "base.cfg")
  with open(path) as f:
    flags = dict(line.strip()[2:].split("=", 1) for line in f
                 if line.startswith("--") and "=" in line)
  defaults = Config(workdir="w")
  for name in ("head_epochs", "head_learning_rate", "finetune_epochs",
               "finetune_min_steps", "finetune_learning_rate",
               "unfreeze_blocks", "lr_schedule",
               "warmup_fraction", "dropout", "label_smoothing"):
    value = getattr(defaults, name)
    assert type(value)(flags[name]) == value, name
  assert tuple(flags["augment"].split(",")) == defaults.augment
  assert (flags["calibrate"] == "true") is defaults.calibrate
