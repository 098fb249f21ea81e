"""Orchestrates one run: strategy, data, model, both stages, evaluation,
model file, SavedModel export and report."""

import dataclasses
import os
import time
from typing import Dict, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_finetune import (calibration, checkpoints, data, distribute, export,
                         features, files, fit_plan, plots, report,
                         saved_models, selection, speed, stages,
                         training_logs, weighting)
from tf_finetune import workdir as workdir_lib
from tf_finetune.config import Config
from tf_finetune.model import build_model


def run_training(config: Config,
                 extra_callbacks: Sequence[keras.callbacks.Callback] = ()
                 ) -> Dict:
  """Trains both stages, evaluates, saves, exports; returns the report.

  In a multi-worker run every worker calls this; all of them resume from
  the checkpoint in the (shared) workdir, but only the chief writes into the
  workdir and export folder (see `distribute.chief_outputs`).
  """
  strategy = distribute.create_strategy(config.strategy,
                                        config.virtual_cpu_devices)
  with distribute.explain_peer_failures(strategy):
    # Read before a non-chief worker is pointed at its scratch folder: every
    # worker resumes from the checkpoint the chief wrote into the workdir.
    resume = find_resume_state(config, strategy)
    folder = checkpoints.checkpoint_dir(config.workdir)
    with distribute.chief_outputs(config, strategy) as config:
      return _train(config, strategy, resume, folder, extra_callbacks)


def find_resume_state(config: Config, strategy
                      ) -> Optional[checkpoints.TrainingState]:
  """The checkpoint every worker resumes from, or None for a fresh start.

  The chief also deletes the checkpoints on --fresh; the other workers only
  read them (the workdir is shared), so nothing races with the chief.

  Raises:
    UserError: the workdir holds another run's checkpoints.
    ClusterError: the workers found different checkpoints.
  """
  if distribute.writes_outputs(strategy):
    resume = workdir_lib.prepare_workdir(config)  # Refuses another run's.
    if resume is None and config.shared_head:
      resume = workdir_lib.adopt_shared_head(config)
  else:
    resume = workdir_lib.check_workdir(config)
  distribute.check_same_start(strategy, describe_start(resume),
                              config.workdir)
  return resume


def describe_start(resume: Optional[checkpoints.TrainingState]) -> str:
  """Where a run starts, as workers compare it: "checkpoint FILE" or "no
  checkpoint" (checkpoint file names hold the epoch and step)."""
  return "no checkpoint" if resume is None else f"checkpoint {resume.file}"


def _train(config: Config, strategy,
           resume: Optional[checkpoints.TrainingState], checkpoint_folder: str,
           extra_callbacks: Sequence[keras.callbacks.Callback]) -> Dict:
  started = time.perf_counter()
  files.makedirs(config.workdir)
  run = set_up_run(config, strategy, model_seed=(
      None if config.model_seed < 0 else config.model_seed))
  model, datasets = run.model, run.datasets
  stage_callback, best = start_stages(run, resume, checkpoint_folder)
  fit_remaining(run, stage_callback, best, resume, extra_callbacks)
  calibrated = calibrate(config, model, datasets)
  scores = evaluate_splits(model, datasets, config.batch_size)
  saved_models.save_model_atomic(
      model, os.path.join(config.workdir, saved_models.MODEL_FILE))
  # A rerun after a kill between export and report finds its own version.
  export_path = export.export_saved_model(
      model, datasets.class_names, config.image_size,
      config.resolved_export_dir, config.top_k,
      run_id=checkpoints.read_run_id(config.workdir),
      formats=config.export_formats,
      max_image_pixels=config.max_image_pixels) if config.export else None
  result = report.build_report(
      class_names=datasets.class_names,
      num_examples=datasets.num_examples,
      skipped_files=datasets.skipped_files,
      stages=stage_callback.records,
      val_accuracy=scores["val"]["accuracy"],
      test_accuracy=scores["test"]["accuracy"] if "test" in scores else None,
      export_path=export_path,
      config=dataclasses.asdict(config),
      seconds=time.perf_counter() - started,
      speed=run.switches.describe(),
      kept=best.best,
      calibration=calibrated,
      class_weighting=run.class_weighting.describe(), recalls=scores)
  path = report.write_report(config.workdir, result)
  plots.write_curves(result["stages"],
                     os.path.join(config.workdir, plots.CURVES_FILE),
                     kept=result["kept"])
  # The run is complete: a rerun starts over rather than resume.
  checkpoints.remove_checkpoints(config.workdir)
  logging.info("Report: %s", path)
  logging.info("Export: %s", export_path)
  return result


@dataclasses.dataclass
class Run:
  """What a training run and a search trial both train with.

  Attributes:
    config: the run's (or trial's) configuration.
    switches: the speed switches resolved for this machine.
    plan: the stage plan.
    datasets: the input pipelines.
    model: the model, built in the strategy scope and the dtype policy.
    class_weighting: the resolved `--class_weighting`; None: off.
  """
  config: Config
  switches: speed.Switches
  plan: stages.StagePlan
  datasets: data.Datasets
  model: keras.Model
  class_weighting: Optional[weighting.ClassWeighting] = None

  def __post_init__(self):
    self.class_weighting = self.class_weighting or weighting.resolve(
        "none", self.datasets.class_names, self.datasets.class_counts)


def set_up_run(config: Config, strategy, build_fn=build_model,
               model_seed: Optional[int] = None) -> Run:
  """The one setup of `--mode=train` and of every trial of `--mode=tune`.

  Seeds, input pipelines, the speed switches, the stage plan and the
  model, in this order, so that a trial with given hyperparameters trains
  exactly what `--mode=train` with them trains.

  Args:
    config: the validated configuration.
    strategy: the tf.distribute strategy the model is built under.
    build_fn: `model.build_model` or a stand-in with its signature (tests).
    model_seed: seeds initialisation and dropout; default `config.seed`
      (a search's repeated executions of a trial use others).
  """
  seed = config.seed if model_seed is None else model_seed
  keras.utils.set_random_seed(seed)
  datasets = data.create_datasets(config)
  switches = speed.resolve_switches(config, strategy)  # XLA, precision, stage 1
  plan = stages.StagePlan.from_config(
      config, switches.jit_compile,
      fit_plan.count_steps(datasets.num_examples["train"],
                              config.batch_size))
  if plan.finetune_epochs != config.finetune_epochs:
    logging.info("Stage finetune: %d epochs of %d steps, to reach "
                 "--finetune_min_steps=%d (--finetune_epochs=%d).",
                 plan.finetune_epochs, plan.steps_per_epoch,
                 config.finetune_min_steps, config.finetune_epochs)
  with strategy.scope(), speed.dtype_policy(switches.mixed_precision):
    model = build_fn(len(datasets.class_names), config.image_size,
                     config.weights, config.dropout, seed)
  class_weighting = weighting.resolve(
      config.class_weighting, datasets.class_names, datasets.class_counts)
  logging.info("Class weighting %s: %s (training images per class %s).",
               "on" if class_weighting.on else "off", class_weighting.reason,
               list(class_weighting.train_counts))
  if class_weighting.on:
    logging.info("Validation examples weighted by inverse class frequency: "
                 "val_accuracy is the %s, val_loss the class-balanced "
                 "loss.", weighting.BALANCED_ACCURACY)
  return Run(config, switches, plan, datasets, model, class_weighting)


def start_stages(run: Run, resume: Optional[checkpoints.TrainingState],
                 checkpoint_folder: Optional[str] = None
                 ) -> Tuple[stages.TwoStageCallback, selection.BestWeights]:
  """Compiles the model for its first stage, or restores a checkpoint into
  it (stage, weights, optimizer, best epoch so far).

  Returns:
    The stage callback and the best-weights keeper to train with.
  """
  model, plan, config = run.model, run.plan, run.config
  folder = checkpoint_folder or checkpoints.checkpoint_dir(config.workdir)
  if resume is None:
    stage = plan.stage_at(0)
    stages.apply_stage(model, plan, stage)
  else:
    stage = resume.stage
    checkpoints.restore(model, plan, resume, folder)
  stage_callback = stages.TwoStageCallback(
      plan, stage, run.datasets.num_examples["train"], config.batch_size)
  weights = run.class_weighting
  best = selection.BestWeights(
      plan, model, config.objective,
      selection.objective_direction(config.objective),
      measure=weights.measure(config.objective) if weights.on else None)
  if resume is not None:
    stage_callback.restore_records(resume.records, resume.epoch, resume.step)
    checkpoints.restore_best(best, resume, folder)
  return stage_callback, best


def calibrate(config: Config, model: keras.Model,
              datasets: data.Datasets) -> Dict:
  """Temperature scaling of the kept model on the validation split
  (calibration.py), unless --nocalibrate or there is no such split.

  Search trials are training runs and get here too; the search compares
  their kept epoch's objective, measured before calibration.

  Returns:
    report.json's "calibration": the fitted record, or {"skipped": reason}.
  """
  if not config.calibrate:
    reason = "--nocalibrate"
  elif datasets.val is None:
    reason = "no validation split"
  else:
    record = calibration.calibrate_model(model, datasets.val)
    if record is not None:
      before, after = record["before"], record["after"]
      logging.info(
          "Calibration on %d validation images: fitted temperature %.3f "
          "(likelihood-ratio p = %.3g), %s; ECE %.4f -> %.4f, NLL %.4f -> "
          "%.4f, mean confidence %.4f -> %.4f at accuracy %.4f.",
          record["num_examples"], record["fitted_temperature"],
          record["p_value"], describe_fold(record),
          before["ece"], after["ece"], before["nll"], after["nll"],
          before["mean_confidence"], after["mean_confidence"],
          after["accuracy"])
      return record
    reason = "empty validation split"
  logging.info("Calibration skipped: %s; probabilities are served as "
               "trained.", reason)
  return {"skipped": reason}


def describe_fold(record: Dict) -> str:
  """Whether the fitted temperature was folded in, and if not, why."""
  if record["temperature"] != 1.0:
    return "folded into the classifier"
  if record["at_bound"]:
    return ("at a bound of the search, no optimum (a validation split the "
            "model classifies perfectly has none): not folded")
  return "not significantly better than 1: not folded"


def fit_remaining(run: Run, stage_callback: stages.TwoStageCallback,
                  best: selection.BestWeights,
                  resume: Optional[checkpoints.TrainingState],
                  extra_callbacks: Sequence[keras.callbacks.Callback] = ()
                  ) -> None:
  """Trains the epochs (and steps) not done yet, checkpointing as it goes."""
  config = run.config
  logs = os.path.join(config.workdir, "logs")
  if resume is not None:
    training_logs.trim_csv_log(os.path.join(logs, "training.csv"),
                               resume.epoch)
  checkpointer = checkpoints.Checkpointer(
      config.workdir, config, stage_callback, run.plan.steps_per_epoch,
      resume, model=run.model, best=best,
      unsaved_epochs=range(config.head_epochs - 1)
      if config.caches_features else ())
  # The checkpointer comes last: it saves once the other callbacks, the
  # CSV log and the best-weights keeper included, have seen the epoch.
  callbacks = [*training_logs.create_logging_callbacks(
                   config.workdir, append=resume is not None),
               *extra_callbacks, *early_stopping(config, run.plan),
               checkpointer, *head_sharing(run, stage_callback, best, resume),
               training_logs.EpochProgress(run.plan.total_epochs)]
  with checkpointer.catch_stop_signals():
    fit_stages(run, stage_callback, best, callbacks, resume)


def early_stopping(config: Config, plan: stages.StagePlan) -> list:
  """--early_stopping_patience: watches stage finetune only, as stopping in
  stage head would skip the stage the backbone learns in."""
  if not config.early_stopping_patience:
    return []
  return [keras.callbacks.EarlyStopping(
      monitor=config.objective,
      mode=selection.objective_direction(config.objective),
      patience=config.early_stopping_patience,
      start_from_epoch=plan.head_epochs)]


def head_sharing(run: Run, stage_callback: stages.TwoStageCallback,
                 best: selection.BestWeights,
                 resume: Optional[checkpoints.TrainingState]) -> list:
  """With --shared_head and none there yet: a `Checkpointer` that writes
  the end of stage head there, and nothing else (no step checkpoints, so
  stage finetune never writes into the shared folder)."""
  config, plan = run.config, run.plan
  if (not config.shared_head or (resume and resume.epoch >= plan.head_epochs)
      or checkpoints.read_state(config.shared_head) is not None):
    return []
  return [checkpoints.Checkpointer(
      config.shared_head, dataclasses.replace(config, save_every_steps=0),
      stage_callback, plan.steps_per_epoch, resume, model=run.model,
      best=best, unsaved_epochs=[e for e in range(plan.total_epochs)
                                 if e != plan.head_epochs - 1])]


def check_data(config: Config) -> None:
  """Reads the data as a run would, so bad input fails before a search's
  first trial (UserError)."""
  data.create_datasets(config)


def fit_stages(run: Run, stage_callback: stages.TwoStageCallback,
               best: selection.BestWeights,
               callbacks: Sequence[keras.callbacks.Callback],
               resume: Optional[checkpoints.TrainingState] = None,
               verbose=2) -> keras.callbacks.History:
  """Runs the fits that train what is left of both stages.

  Stage head trains on cached backbone features when the config says so
  (features.py), the rest on images; returns the last fit's History. The
  stage callback and the best-weights keeper run first, then `callbacks`.
  """
  config, plan, datasets, model = run.config, run.plan, run.datasets, run.model
  num_classes = len(datasets.class_names)
  replicas = model.distribute_strategy.num_replicas_in_sync
  # Class weights ride in the batches (x, y, w): no-ops when weighting is off.
  weigh = run.class_weighting.weigh_train
  train = weigh(to_one_hot(datasets.train, num_classes))
  val = run.class_weighting.weigh_val(to_one_hot(datasets.val, num_classes))
  # Every batch split evenly over the replicas; no-op on one.
  padded_val = distribute.pad_batches(val, replicas,
                                      datasets.num_examples["val"],
                                      config.batch_size)
  unaugmented = (None if datasets.train_unaugmented is None
                 else weigh(to_one_hot(datasets.train_unaugmented,
                                       num_classes)))
  head_end = plan.head_epochs if config.caches_features else 0
  callbacks = [stage_callback, best, *callbacks]
  history = None
  with features.CachedHeadStage(
      model, plan, stage_callback, features.CacheSettings.from_config(config),
      train, unaugmented, val, verbose) as head:
    for segment in fit_plan.fit_segments(resume, plan.total_epochs,
                                         split_at=head_end):
      if segment.initial_epoch < head_end:
        history = head.fit(segment.initial_epoch, segment.epochs,
                           segment.skip_batches, callbacks)
      else:
        images, steps = training_batches(datasets, num_classes, segment,
                                         plan.steps_per_epoch)
        # shuffle=False: the dataset shuffles itself (data.py); Keras ignores
        # the default shuffle=True on a tf.data.Dataset but warns about it.
        history = model.fit(distribute.pad_batches(weigh(images), replicas),
                            steps_per_epoch=steps,
                            validation_data=padded_val,
                            initial_epoch=segment.initial_epoch,
                            epochs=segment.epochs, callbacks=callbacks,
                            verbose=verbose, shuffle=False)
      features.continue_logs(callbacks)
      if model.stop_training:  # Early stopping (search trials).
        break
  return history


def training_batches(datasets: data.Datasets, num_classes: int,
                     segment: fit_plan.FitSegment, steps_per_epoch: int
                     ) -> Tuple[tf.data.Dataset, int]:
  """The training images of a fit on images, and its steps per epoch.

  From `datasets.train_from`: the batches an uninterrupted run trains on
  from the segment's epoch and step on, whatever ran before in this
  process; `fit` takes `steps_per_epoch` of them per epoch (fewer in an
  epoch that skips its first batches, which `fit_segments` fits alone).
  """
  batches = datasets.train_from(segment.initial_epoch, segment.epochs).skip(
      segment.skip_batches)
  return (to_one_hot(batches, num_classes),
          steps_per_epoch - segment.skip_batches)


def to_one_hot(dataset: tf.data.Dataset, num_classes: int) -> tf.data.Dataset:
  """(images, int labels) -> (images, one-hot labels), as label smoothing needs.

  Labels that are one-hot already (mixed by MixUp/CutMix in augment.py)
  pass through.
  """
  if dataset.element_spec[1].shape.rank == 2:
    return dataset
  return dataset.map(lambda x, y: (x, tf.one_hot(y, num_classes)),
                     num_parallel_calls=tf.data.AUTOTUNE)


def evaluate_splits(model: keras.Model, datasets: data.Datasets,
                    batch_size: int) -> Dict[str, Dict]:
  """Scores of the validation split, and the test split when there is one:
  {split: {"accuracy", "per_class_recall", "balanced_accuracy"}}.

  One pass per split (`weighting.confusion_matrix`), each image counted
  once under any strategy (`distribute.pad_batches`); the accuracy is the
  share of correct images, unweighted, whatever `--class_weighting` says.
  """
  num_classes = len(datasets.class_names)
  replicas = model.distribute_strategy.num_replicas_in_sync
  scores = {}
  for name, ds in (("val", datasets.val), ("test", datasets.test)):
    if ds is None:
      continue
    matrix = weighting.confusion_matrix(
        model, distribute.pad_batches(to_one_hot(ds, num_classes), replicas,
                                      datasets.num_examples[name],
                                      batch_size), num_classes)
    scores[name] = {"accuracy": float(np.trace(matrix) / matrix.sum()),
                    **weighting.recall_report(matrix, datasets.class_names)}
  return scores
