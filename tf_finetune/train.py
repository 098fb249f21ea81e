"""Orchestrates one run: strategy, data, model, both stages, evaluation,
model file, SavedModel export and report.

Also the small jobs that reuse a trained workdir: `--mode=evaluate` and
`--mode=export`.
"""

import dataclasses
import json
import os
import time
from typing import Dict, Sequence

import keras
import tensorflow as tf
from absl import logging

from tf_finetune import data, distribute, export, report, stages
from tf_finetune.config import Config, UserError
from tf_finetune.model import build_model

MODEL_FILE = "model.keras"


def run_training(config: Config,
                 extra_callbacks: Sequence[keras.callbacks.Callback] = ()
                 ) -> Dict:
  """Trains both stages, evaluates, saves, exports; returns the report."""
  started = time.perf_counter()
  os.makedirs(config.workdir, exist_ok=True)
  keras.utils.set_random_seed(config.seed)
  strategy = distribute.create_strategy(config.strategy,
                                        config.virtual_cpu_devices)
  datasets = data.create_datasets(config)
  num_classes = len(datasets.class_names)
  plan = stages.StagePlan.from_config(config)
  with strategy.scope():
    model = build_model(num_classes, config.image_size, config.weights,
                        config.dropout, config.seed)
  first_stage = plan.stage_at(0)
  stages.apply_stage(model, plan, first_stage)
  stage_callback = stages.TwoStageCallback(
      plan, first_stage, datasets.num_examples["train"], config.batch_size)
  model.fit(
      to_one_hot(datasets.train, num_classes),
      validation_data=to_one_hot(datasets.val, num_classes),
      epochs=plan.total_epochs,
      callbacks=[stage_callback, *create_logging_callbacks(config.workdir),
                 *extra_callbacks],
      verbose=2)
  accuracies = evaluate_splits(model, datasets)
  save_model_atomic(model, os.path.join(config.workdir, MODEL_FILE))
  export_path = export.export_saved_model(
      model, datasets.class_names, config.image_size,
      config.resolved_export_dir, config.top_k)
  result = report.build_report(
      class_names=datasets.class_names,
      num_examples=datasets.num_examples,
      skipped_files=datasets.skipped_files,
      stages=stage_callback.stage_reports(),
      val_accuracy=accuracies["val"],
      test_accuracy=accuracies.get("test"),
      export_path=export_path,
      config=dataclasses.asdict(config),
      seconds=time.perf_counter() - started)
  path = report.write_report(config.workdir, result)
  logging.info("Report: %s", path)
  logging.info("Export: %s", export_path)
  return result


def to_one_hot(dataset: tf.data.Dataset, num_classes: int) -> tf.data.Dataset:
  """(images, int labels) -> (images, one-hot labels), as label smoothing needs.

  Labels that are one-hot already (mixed by MixUp/CutMix in augment.py)
  pass through.
  """
  if dataset.element_spec[1].shape.rank == 2:
    return dataset
  return dataset.map(lambda x, y: (x, tf.one_hot(y, num_classes)),
                     num_parallel_calls=tf.data.AUTOTUNE)


def create_logging_callbacks(workdir: str):
  """TensorBoard and CSV logs under WORKDIR/logs/, one epoch axis for both
  stages (the stages share one `fit`)."""
  logs = os.path.join(workdir, "logs")
  os.makedirs(logs, exist_ok=True)
  return [keras.callbacks.TensorBoard(logs, write_graph=False),
          keras.callbacks.CSVLogger(os.path.join(logs, "training.csv"))]


def evaluate_splits(model: keras.Model, datasets: data.Datasets
                    ) -> Dict[str, float]:
  """Accuracy on the validation split, and the test split when there is one."""
  num_classes = len(datasets.class_names)
  splits = {"val": datasets.val, "test": datasets.test}
  return {
      name: float(model.evaluate(to_one_hot(ds, num_classes), verbose=0,
                                 return_dict=True)["accuracy"])
      for name, ds in splits.items() if ds is not None
  }


def save_model_atomic(model: keras.Model, path: str) -> None:
  """Saves to a temp `.keras` file beside `path`, then renames it into place."""
  tmp = os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path))
  try:
    model.save(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load_trained_model(workdir: str) -> keras.Model:
  """Loads WORKDIR/model.keras with safe_mode on, or raises UserError."""
  path = os.path.join(workdir, MODEL_FILE)
  if not os.path.isfile(path):
    raise UserError(f"--workdir={workdir!r}: no {MODEL_FILE} there; train "
                    "first with --mode=train.")
  return keras.models.load_model(path, safe_mode=True)


def run_evaluation(config: Config) -> Dict:
  """`--mode=evaluate`: accuracy of WORKDIR/model.keras on test (else val)."""
  model = load_trained_model(config.workdir)
  datasets = data.create_datasets(config)
  split = "test" if datasets.test is not None else "val"
  dataset = datasets.test if split == "test" else datasets.val
  model.compile(loss="categorical_crossentropy",
                metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
  metrics = model.evaluate(to_one_hot(dataset, len(datasets.class_names)),
                           verbose=0, return_dict=True)
  result = {"split": split, "num_examples": datasets.num_examples[split],
            **{k: float(v) for k, v in metrics.items()}}
  report.write_json_atomic(os.path.join(config.workdir, "evaluation.json"),
                           result)
  logging.info("Evaluation on %s: %s", split, result)
  return result


def run_export(config: Config) -> str:
  """`--mode=export`: re-exports WORKDIR/model.keras as a new version."""
  model = load_trained_model(config.workdir)
  image_size = model.input_shape[1]  # The trained size, whatever the flag says.
  path = export.export_saved_model(model, read_class_names(config.workdir),
                                   image_size, config.resolved_export_dir,
                                   config.top_k)
  logging.info("Export: %s", path)
  return path


def read_class_names(workdir: str) -> Sequence[str]:
  """Class names recorded by the training run's report.json."""
  path = os.path.join(workdir, report.REPORT_FILE)
  if not os.path.isfile(path):
    raise UserError(f"--workdir={workdir!r}: no {report.REPORT_FILE} with the "
                    "class names; train first with --mode=train.")
  with open(path) as f:
    return json.load(f)["class_names"]
