"""Search stage (`--mode=tune`): KerasTuner over the unfreeze depth and the
learning rates; writes best.cfg and tuning_report.json.

A trial is exactly a training run: `FineTuneHyperModel.build` is
`model.build_model`, and its `fit` runs both stages with `train.fit_stages`
and `stages.TwoStageCallback`, as `train.run_training` does (stage head on
cached features unless --nocache_features), on input pipelines made afresh
and seeded the same way. A searched flag is a
hyperparameter of the same name; every other flag stays at its value.

Hyperband's budgets. Hyperband gives each trial E epochs. A trial of budget
E trains the whole recipe compressed to E epochs: each stage gets its share
of E in proportion to --head_epochs : --finetune_epochs, rounded half up,
and both stages keep at least one epoch when E >= 2 (`split_budget`). With
--head_epochs=3 --finetune_epochs=5, a 2-epoch bracket trains 1 + 1 epochs,
a 4-epoch one 2 + 2, the full 8 epochs 3 + 5; a 1-epoch budget is one
finetune epoch. Filling stage head first was rejected: any budget up to 3
epochs would then never reach stage finetune, where the unfreeze depth and
the fine-tuning rate act, and Hyperband would rank trials on noise.
Hyperband's later rounds retrain a promising configuration from scratch
with the bigger budget instead of continuing its parent's checkpoint, as
KerasTuner does by default: the parent's compressed schedule is no prefix of
the longer one (its head stage was shorter and it has fine-tuned already),
and no weights have to travel between the machines of a distributed search.
That costs about 1/--hyperband_factor more epochs. No trial keeps weights:
best.cfg trains the winner.

WORKDIR/tuner/ holds KerasTuner's project and search.json, the flags that
define the search: a rerun with the same flags resumes, other flags are an
error unless --overwrite_search (KerasTuner would silently keep the old
search space, ARCHITECTURE.md).
"""

import dataclasses
import importlib.util
import math
import os
import contextlib
import time
from typing import Dict, List, Optional, Tuple

import keras
import keras_tuner as kt
from tensorboard.plugins.hparams import api as hparams_api

from tf_finetune import config as config_lib
from tf_finetune import (checkpoints, data, distribute, files, selection,
                         speed, stages, train)
from tf_finetune import model as model_lib
from tf_finetune.config import Config, UserError

PROJECT = "tuner"
DEFINITION_FILE = "search.json"
REPORT_FILE = "tuning_report.json"
BEST_CONFIG_FILE = "best.cfg"
_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
SHARED_HEADS = "shared_heads"
# Searched flags that change what stage head trains.
_HEAD_HYPERPARAMETERS = ("head_learning_rate", "dropout")


def shares_stage_head(config: Config) -> bool:
  """Whether the trials of a search can share one stage head."""
  return config.head_epochs > 0 and not any(
      name in config.search_ranges() for name in _HEAD_HYPERPARAMETERS)


def split_budget(budget: int, head_epochs: int,
                 finetune_epochs: int) -> Tuple[int, int]:
  """(head, finetune) epochs of a trial of `budget` epochs: the module
  docstring says how and why."""
  if finetune_epochs == 0:
    return budget, 0
  if head_epochs == 0 or budget == 1:
    return 0, budget
  share = head_epochs / (head_epochs + finetune_epochs)
  head = min(max(math.floor(budget * share + 0.5), 1), budget - 1)
  return head, budget - head


def budget_of(values: Dict, config: Config) -> int:
  """Epochs of a trial: Hyperband's `tuner/epochs`, else the whole run."""
  return int(values.get("tuner/epochs", config.total_epochs))


class FineTuneHyperModel(kt.HyperModel):
  """The two-stage fine-tuning run as a KerasTuner HyperModel.

  A trial is a training run: `train_trial` goes through `train.set_up_run`,
  `train.start_stages` and `train.fit_stages`, the path of `--mode=train`,
  with the flags of `trial_config`. `build_fn` is `model.build_model` or a
  stand-in with its signature (tests).
  """

  def __init__(self, config: Config, build_fn=model_lib.build_model):
    super().__init__(name="tf_finetune")
    self.config = config
    self.build_fn = build_fn

  def declare_hyperparameters(self, hp: kt.HyperParameters) -> None:
    """One hyperparameter per searched flag; its default is the flag's value
    (clipped into the range), which `DefaultsFirst` tries first."""
    for name, (low, high) in self.config.search_ranges().items():
      cast, sampling = config_lib.SEARCHABLE[name][:2]
      default = min(max(getattr(self.config, name), low), high)
      if low == high:
        hp.Fixed(name, low)
      elif cast is int:
        hp.Int(name, low, high, sampling=sampling, default=default)
      else:
        hp.Float(name, low, high, sampling=sampling, default=default)

  def trial_config(self, hp: kt.HyperParameters) -> Config:
    """The training config of a trial: the flags with `hp`'s values, and
    the epochs of its budget (`split_budget`)."""
    self.declare_hyperparameters(hp)
    trial = dataclasses.replace(self.config, **{
        name: hp.get(name) for name in self.config.search_ranges()})
    head, finetune = split_budget(budget_of(hp.values, trial),
                                  trial.head_epochs, trial.finetune_epochs)
    return dataclasses.replace(trial, head_epochs=head,
                               finetune_epochs=finetune)

  def build(self, hp: kt.HyperParameters) -> keras.Model:
    raise NotImplementedError("A trial builds its model in train_trial.")

  def train_trial(self, hp: kt.HyperParameters, strategy, execution: int = 0,
                  callbacks=(), shared_head: Optional[str] = None,
                  verbose=2) -> Dict[str, float]:
    """Trains one execution of a trial; returns the kept epoch's metrics
    (what a training run keeps and reports) and the epochs run per stage.

    Args:
      hp: the trial's hyperparameters.
      strategy: the search's tf.distribute strategy.
      execution: execution i starts from another initialisation (seed + i).
      callbacks: more Keras callbacks (TensorBoard).
      shared_head: a folder holding the checkpoint of stage head's end,
        shared by the trials that train the same head: the first trial
        writes it, the others start stage finetune from it.
    """
    trial = self.trial_config(hp)
    run = train.set_up_run(trial, strategy, self.build_fn,
                           model_seed=trial.seed + execution)
    head_state = (checkpoints.read_state(shared_head) if shared_head
                  else None)
    stage_callback, best = train.start_stages(
        run, head_state, shared_head and checkpoints.checkpoint_dir(
            shared_head))
    extra = list(callbacks)
    if shared_head and head_state is None and run.plan.head_epochs:
      extra.append(checkpoints.Checkpointer(
          shared_head, trial, stage_callback, run.plan.steps_per_epoch,
          model=run.model, best=best, unsaved_epochs=[
              e for e in range(run.plan.total_epochs)
              if e != run.plan.head_epochs - 1]))
    train.fit_stages(run, stage_callback, best,
                     [*extra, *self._early_stopping(run.plan)],
                     resume=head_state, verbose=verbose)
    ran = {record["name"]: len(record["history"].get("loss", []))
           for record in stage_callback.stage_reports()}
    return {**kept_metrics(stage_callback, best, run.plan),
            "epochs_run": sum(ran.values()),
            "head_epochs_run": ran.get(stages.HEAD, 0),
            "finetune_epochs_run": ran.get(stages.FINETUNE, 0),
            "head_shared": float(head_state is not None)}

  def _early_stopping(self, plan: stages.StagePlan) -> List:
    # Watches stage finetune only: stopping in stage head would skip the
    # stage the search is about.
    if not self.config.early_stopping_patience:
      return []
    return [keras.callbacks.EarlyStopping(
        monitor=self.config.objective,
        mode=selection.objective_direction(self.config.objective),
        patience=self.config.early_stopping_patience,
        start_from_epoch=plan.head_epochs)]


def kept_metrics(stage_callback: stages.TwoStageCallback,
                 best: selection.BestWeights,
                 plan: stages.StagePlan) -> Dict[str, float]:
  """The metrics of the epoch whose weights were kept (the last epoch's
  when none was validated)."""
  records = stage_callback.stage_reports()
  if best.best is None:
    return {name: values[-1] for name, values
            in records[-1]["history"].items()}
  stage, epoch = best.best.stage, best.best.epoch
  index = epoch - (plan.head_epochs if stage == stages.FINETUNE else 0)
  record = next(r for r in records if r["name"] == stage)
  return {name: values[index] for name, values in record["history"].items()}


class _UserErrorInTrial(kt.errors.FatalError):
  """Carries a UserError out of the search. KerasTuner records any other
  error as a failed trial and goes on, but bad input fails every trial."""


class FineTuneTuner(kt.Tuner):
  """A KerasTuner Tuner whose trials are `FineTuneHyperModel` runs.

  Overrides `run_trial` (KerasTuner's documented hook) to leave out what a
  trial here does not need: the per-epoch best-weights checkpoint (95 MB of
  ResNet50 per trial, never read: see the module docstring) and Hyperband's
  continuation from a parent's checkpoint.
  """

  def __init__(self, oracle, hypermodel, log_dir: str, **kwargs):
    self.log_dir = log_dir
    super().__init__(oracle, hypermodel, **kwargs)

  def _populate_initial_space(self):
    # The space has no conditional parameters, so declaring it is enough.
    # KerasTuner's default builds a model to find conditions: a whole
    # ResNet50 before the search starts, on the chief too.
    hp = self.oracle.get_space()
    self.hypermodel.declare_hyperparameters(hp)
    self.oracle.update_space(hp)

  def shared_head_folder(self, hp: kt.HyperParameters,
                         execution: int) -> Optional[str]:
    """Where the trials that train the same stage head share it, or None.

    Stage head depends on the flags, the trial's head epochs (Hyperband
    budgets differ) and the execution's seed, not on what stage finetune
    does: when no head hyperparameter is searched, the first trial of each
    (head epochs, execution) trains it and the others start from its
    checkpoint. Not in a distributed search, whose workers may not share a
    file system.
    """
    if not shares_stage_head(self.hypermodel.config) or distributed_role():
      return None
    head_epochs = self.hypermodel.trial_config(hp).head_epochs
    return os.path.join(self.project_dir, SHARED_HEADS,
                        f"head{head_epochs}-execution{execution}")

  def run_trial(self, trial, *args, **kwargs) -> List[Dict[str, float]]:
    hp = trial.hyperparameters
    print(f"tf_finetune: trial {trial.trial_id} on {self.tuner_id}: "
          f"{describe_values(hp.values)}", flush=True)
    results = []
    for execution in range(self.executions_per_trial):
      started = time.perf_counter()
      callbacks = [keras.callbacks.TensorBoard(self.log_dir, write_graph=False)]
      # Per-trial log folder plus TensorBoard's HParams dashboard.
      self._configure_tensorboard_dir(callbacks, trial, execution)
      per_fit, per_trial = split_hparams_callbacks(callbacks)
      try:
        keras.backend.clear_session()
        with once_around_fits(per_trial):
          result = self.hypermodel.train_trial(
              hp, self.distribution_strategy, execution, per_fit,
              self.shared_head_folder(hp, execution))
      except UserError as e:
        raise _UserErrorInTrial(str(e)) from e
      results.append({**result, "seconds": time.perf_counter() - started})
    return results  # KerasTuner averages the executions.


def split_hparams_callbacks(callbacks: List) -> Tuple[List, List]:
  """(callbacks for every fit, TensorBoard HParams callbacks).

  A trial is two fits when stage head trains on cached features, but the
  HParams callback that `_configure_tensorboard_dir` adds raises "hparams
  Keras callback cannot be reused across training sessions" at a second
  `on_train_begin`: it must see the trial once (`once_around_fits`).
  """
  per_trial = [c for c in callbacks if isinstance(c, hparams_api.KerasCallback)]
  return [c for c in callbacks if c not in per_trial], per_trial


@contextlib.contextmanager
def once_around_fits(callbacks: List):
  """Runs `callbacks`' train begin and end once, around all of a trial's
  fits. The HParams callback reads no model: it logs the trial's values."""
  for callback in callbacks:
    callback.on_train_begin()
  yield
  for callback in callbacks:
    callback.on_train_end()


def describe_values(values: Dict) -> str:
  """'unfreeze_blocks=2, finetune_learning_rate=3e-05, tuner/epochs=4'."""
  return ", ".join(f"{name}={value:.3g}" if isinstance(value, float)
                   else f"{name}={value}" for name, value in values.items()
                   if not name.startswith("tuner/") or name == "tuner/epochs")


def defaults_first(oracle_class):
  """`oracle_class` whose first trial is the flags' own values.

  The default recipe is in the search space: trying it first means the
  search never hands back a best.cfg that scored below it on validation,
  and a random search of a few trials that never drew near it loses
  nothing. Hyperband's brackets fill trials their own way and are left as
  they are.
  """
  class DefaultsFirst(oracle_class):
    def populate_space(self, trial_id):
      if not self.trials:
        return {"status": kt.engine.trial.TrialStatus.RUNNING,
                "values": self.hyperparameters.values}
      return super().populate_space(trial_id)
  DefaultsFirst.__name__ = "DefaultsFirst" + oracle_class.__name__
  return DefaultsFirst


def create_tuner(config: Config, hypermodel: FineTuneHyperModel,
                 strategy) -> FineTuneTuner:
  """The tuner of `--tuner`, its state in WORKDIR/tuner/."""
  common = dict(
      objective=kt.Objective(config.objective, selection.objective_direction(config.objective)),
      seed=config.seed + 1)  # KerasTuner takes seed 0 for "no seed".
  if config.tuner == "hyperband":
    oracle = kt.oracles.HyperbandOracle(
        max_epochs=config.max_epochs or config.total_epochs,
        factor=config.hyperband_factor, **common)
    # HyperbandOracle takes no max_trials; the base Oracle honours it.
    oracle.max_trials = config.max_trials
  elif config.tuner == "bayesian":
    oracle = defaults_first(kt.oracles.BayesianOptimizationOracle)(
        max_trials=config.max_trials, **common)
  else:
    oracle = defaults_first(kt.oracles.RandomSearchOracle)(
        max_trials=config.max_trials, **common)
  return FineTuneTuner(
      oracle, hypermodel,
      log_dir=os.path.join(config.workdir, PROJECT, "logs"),
      distribution_strategy=strategy, directory=config.workdir,
      project_name=PROJECT, executions_per_trial=config.executions_per_trial)


def distributed_role() -> str:
  """'chief', 'worker' or '' (no distributed search), from KerasTuner's
  environment variables; the chief's KERASTUNER_TUNER_ID contains 'chief'."""
  if "KERASTUNER_ORACLE_IP" not in os.environ:
    return ""
  missing = [name for name in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID")
             if name not in os.environ]
  if missing:
    raise UserError(f"KERASTUNER_ORACLE_IP is set but {' and '.join(missing)}"
                    " not: every process of a distributed search needs all "
                    "three (README, 'Searching on several machines').")
  return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


def check_tuner_available(name: str) -> None:
  """KerasTuner's Bayesian oracle needs two packages it does not require."""
  missing = [module for module in ("scipy", "sklearn") if name == "bayesian"
             and importlib.util.find_spec(module) is None]
  if missing:
    raise UserError(
        f"--tuner=bayesian: needs {' and '.join(missing)}, which are not "
        "installed (pip install 'keras-tuner[bayesian]'); or use "
        "--tuner=random or --tuner=hyperband.")


def prepare_project(config: Config) -> None:
  """Checks WORKDIR/tuner/ against the flags, or clears it; records them."""
  project = os.path.join(config.workdir, PROJECT)
  path = os.path.join(project, DEFINITION_FILE)
  definition = config_lib.fingerprint(config)
  if config.overwrite_search and files.isdir(project):
    files.remove_tree(project)
  elif files.isfile(path):
    config_lib.refuse_changed_flags(
        files.read_json(path), definition,
        holder=f"{project} holds a search with other settings",
        remedy="KerasTuner would silently go on with the old search space. "
        "Rerun with the same flags to resume it, or add --overwrite_search "
        "to discard it and start afresh.")
    return
  elif files.isdir(project) and files.listdir(project):
    raise UserError(f"{project} holds files but no {DEFINITION_FILE}, so it "
                    "is no search this program can resume; add "
                    "--overwrite_search to discard it.")
  files.write_json_atomic(path, definition)


def run_search(config: Config,
               build_fn=model_lib.build_model) -> Optional[Dict]:
  """`--mode=tune`: searches, writes tuning_report.json and best.cfg and
  returns the report; None on a worker (the chief writes the results)."""
  role = distributed_role()
  check_tuner_available(config.tuner)
  if role != "worker":  # The chief owns the search state.
    prepare_project(config)
  strategy = distribute.create_strategy(config.strategy,
                                        config.virtual_cpu_devices)
  # Bad data fails before any trial; the chief runs none and needs none.
  if role != "chief":
    data.create_datasets(config)
  started = time.perf_counter()
  # What every trial resolves too (train.set_up_run): recorded once.
  switches = dataclasses.asdict(speed.resolve_switches(config, strategy))
  tuner = create_tuner(config, FineTuneHyperModel(config, build_fn), strategy)
  if role == "chief":
    # KerasTuner's stop after 3 failed trials in a row, raised in a gRPC
    # call, kills the worker and stalls the chief (keras-tuner#915).
    tuner.oracle.max_consecutive_failed_trials = math.inf
  if role != "worker":
    _print_resume_state(tuner.oracle)
  try:
    tuner.search(verbose=2)
  except _UserErrorInTrial as e:
    raise e.__cause__ from None
  except RuntimeError as e:
    if "consecutive failures" not in str(e) or role == "worker":
      raise
    result = write_results(config, tuner.oracle,
                           time.perf_counter() - started, switches)
    raise UserError(
        f"The search stopped after {tuner.oracle.max_consecutive_failed_trials}"
        f" failed trials in a row, the last with: {_last_line(str(e))}. Every "
        f"trial's outcome is in {result['report_path']}.") from e
  result = (None if role == "worker" else write_results(
      config, tuner.oracle, time.perf_counter() - started, switches))
  if result and result["best_config"] is None:
    raise UserError(f"No trial completed, so there is no {BEST_CONFIG_FILE}; "
                    f"each trial's error is in {result['report_path']}.")
  return result


def _print_resume_state(oracle) -> None:
  done = sum(t.status in ("COMPLETED", "FAILED") for t in oracle.trials.values())
  if oracle.trials:
    print(f"tf_finetune: resuming the search: {done} finished trial(s) kept, "
          f"{len(oracle.trials) - done} interrupted one(s) to run again.")


def _last_line(text: Optional[str]) -> Optional[str]:
  lines = (text or "").strip().splitlines()
  return lines[-1][:500] if lines else None


def describe_trial(trial, config: Config) -> Dict:
  """One trial of tuning_report.json."""
  values = trial.hyperparameters.values
  metrics = trial.metrics

  def last(name):
    return (float(metrics.get_last_value(name)) if metrics.exists(name)
            else None)

  seconds = last("seconds")  # Mean over the executions, like all metrics.
  return {
      "trial_id": trial.trial_id,
      "status": trial.status,
      "hyperparameters": {name: values[name] for name in
                          config.search_ranges() if name in values},
      "score": None if trial.score is None else float(trial.score),
      "epochs": {"budget": budget_of(values, config),
                 "run": last("epochs_run"), "head": last("head_epochs_run"),
                 "finetune": last("finetune_epochs_run")},
      "seconds": (None if seconds is None
                  else seconds * config.executions_per_trial),
      "metrics": {name: last(name) for name in _METRICS},
      "head_shared": bool(last("head_shared")),
      "error": _last_line(trial.message),
  }


def write_results(config: Config, oracle, seconds: float,
                  switches: Optional[Dict] = None) -> Dict:
  """Writes tuning_report.json, and best.cfg when a trial completed;
  returns the report (`best_config` None when none did). `seconds`: the
  search's wall time in this process; `switches`: the speed switches the
  trials resolved (speed.Switches as a dict)."""
  trials = sorted(oracle.trials.values(), key=lambda t: int(t.trial_id))
  best = [t for t in oracle.get_best_trials(1) if t.status == "COMPLETED"]
  best_path = os.path.join(config.workdir, BEST_CONFIG_FILE)
  result = {
      "tuner": config.tuner,
      "objective": {"name": config.objective,
                    "direction": selection.objective_direction(config.objective)},
      "search_space": {name: list(bounds) for name, bounds
                       in config.search_ranges().items()},
      "best_trial": best[0].trial_id if best else None,
      "best_config": best_path if best else None,
      "seconds": seconds,
      "speed": switches,
      "shared_stage_head": shares_stage_head(config) and not distributed_role(),
      "trials": [describe_trial(t, config) for t in trials],
  }
  result["report_path"] = os.path.join(config.workdir, REPORT_FILE)
  files.write_json_atomic(result["report_path"], result)
  if best:
    files.write_text_atomic(best_path, best_flagfile(config, best[0]))
  return result


def best_flagfile(config: Config, trial) -> str:
  """best.cfg: the training flags with the best trial's values."""
  values = trial.hyperparameters.values
  best = dataclasses.replace(
      config, mode="train", overwrite_search=False,
      **{name: values[name] for name in config.search_ranges()},
      **{f"search_{name}": "" for name in config_lib.SEARCHABLE})
  header = (f"# Best of the {config.tuner} search in {config.workdir}: trial "
            f"{trial.trial_id}, {config.objective} {trial.score:.4f}.\n"
            f"# Train it: python -m tf_finetune.main --flagfile="
            f"{os.path.join(config.workdir, BEST_CONFIG_FILE)}\n")
  return header + config_lib.to_flagfile(best)


def format_summary(result: Dict) -> str:
  """The table printed at the end of a search, best trial marked '*'."""
  names = list(result["search_space"])
  objective = result["objective"]["name"]
  header = ["trial", "status", *names, "epochs", "seconds", objective]
  rows = [header]
  for trial in result["trials"]:
    values = trial["hyperparameters"]
    run = trial["epochs"]["run"]
    rows.append([
        ("*" if trial["trial_id"] == result["best_trial"] else " ")
        + trial["trial_id"], trial["status"],
        *(_format(values.get(name)) for name in names),
        f"{_format(run)}/{trial['epochs']['budget']}",
        _format(trial["seconds"], "{:.0f}"),
        _format(trial["score"], "{:.4f}")])
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths))
           .rstrip() for row in rows]
  lines.append("* best trial; epochs: run/budget; seconds: all executions")
  return "\n".join(lines)


def _format(value, pattern: str = "{:.3g}") -> str:
  if not isinstance(value, float):
    return "-" if value is None else str(value)
  whole = value.is_integer() and pattern == "{:.3g}"
  return str(int(value)) if whole else pattern.format(value)
