"""The search (`--mode=tune`): KerasTuner over the flags of a training run.

Each trial is `--mode=train` in a child process (`python -m
tf_finetune.main --flagfile=WORKDIR/tuner/trials/<id>/flags.cfg`), so a
trial and a training run share one path and every trial's memory goes back
to the operating system. Writes tuning_report.json and best.cfg, and keeps
the best trial so far as the training workdir WORKDIR/best/, exported at
the end. ARCHITECTURE.md ("The search") has the design.
"""

import ctypes
import dataclasses
import importlib.util
import math
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

import keras_tuner as kt
import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api

import tf_finetune
from tf_finetune import (checkpoints, files, report, saved_models, selection,
                         speed, train)
from tf_finetune import config as config_lib
from tf_finetune.config import Config, Preempted, UserError

PROJECT = "tuner"
DEFINITION_FILE = "search.json"
REPORT_FILE = "tuning_report.json"
BEST_CONFIG_FILE = "best.cfg"
BEST_DIR = "best"
TRIALS_DIR = "trials"
TRIAL_LOG = "trial.log"
SHARED_HEADS = "shared_heads"
_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
# What runs a trial: the package's own command line, flags appended.
TRIAL_COMMAND = (sys.executable, "-m", "tf_finetune.main")
# What WORKDIR/best/ takes from the best trial's workdir, besides its flags.
_BEST_FILES = (saved_models.MODEL_FILE, report.REPORT_FILE, "curves.png")


def shares_stage_head(config: Config) -> bool:
  """Whether the trials of a search can share one stage head."""
  return config.head_epochs > 0 and not any(
      name in config.search_ranges()
      for name in config_lib.HEAD_HYPERPARAMETERS)


def split_budget(budget: int, head_epochs: int,
                 finetune_epochs: int) -> Tuple[int, int]:
  """(head, finetune) epochs of a trial of `budget` epochs: each stage its
  share in proportion, both at least one when budget >= 2
  (ARCHITECTURE.md, "The search")."""
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


def training_config(config: Config, values: Dict, **changes) -> Config:
  """The search's flags as the `--mode=train` run of a trial whose
  hyperparameters are `values`: the searched flags set, the epochs of its
  budget (`split_budget`), no search flag left."""
  trial = dataclasses.replace(
      config, mode="train", overwrite_search=False, max_epochs=0,
      **{f"search_{name}": "" for name in config_lib.SEARCHABLE},
      **{name: values[name] for name in config.search_ranges()})
  head, finetune = split_budget(budget_of(values, trial), trial.head_epochs,
                                trial.finetune_epochs)
  return dataclasses.replace(trial, head_epochs=head, finetune_epochs=finetune,
                             finetune_min_steps=trial_min_steps(config, values),
                             **changes)


def trial_min_steps(config: Config, values: Dict) -> int:
  """--finetune_min_steps of a trial. A searched --finetune_epochs scales
  it alike (E epochs: E / --finetune_epochs of the minimum), so the
  searched length acts on small data too, where the minimum decides the
  length. A Hyperband budget counts epochs only: no minimum."""
  if "tuner/epochs" in values:
    return 0
  if ("finetune_epochs" not in config.search_ranges()
      or not config.finetune_epochs):
    return config.finetune_min_steps
  return round(config.finetune_min_steps * values["finetune_epochs"]
               / config.finetune_epochs)


class FineTuneHyperModel(kt.HyperModel):
  """The search space of a two-stage fine-tuning run, and the training
  flags of each trial (`trial_config`); trials run as child processes, so
  `build` is never called."""

  def __init__(self, config: Config):
    super().__init__(name="tf_finetune")
    self.config = config

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

  def trial_config(self, hp: kt.HyperParameters, workdir: str,
                   execution: int = 0, shared_head: str = "") -> Config:
    """The training flags of one execution of a trial (`training_config`)
    in `workdir`; no export (the search exports its best model once);
    execution i > 0 from another initialisation (seed + i)."""
    self.declare_hyperparameters(hp)
    return training_config(
        self.config, hp.values, workdir=workdir, export=False,
        shared_head=shared_head,
        model_seed=self.config.seed + execution if execution else -1)

  def build(self, hp: kt.HyperParameters):
    raise NotImplementedError("A trial is a training run in a child process.")


class _UserErrorInTrial(kt.errors.FatalError):
  """Bad input (exit code 2) out of a trial: it would fail every trial,
  so it ends the search. KerasTuner records any other error as a failed
  trial and goes on."""


class _StoppedInTrial(kt.errors.FatalError):
  """SIGTERM or SIGINT stopped the search during a trial (exit_code)."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


class TrialFailed(RuntimeError):
  """A trial diverged, was killed or raised: recorded as failed."""


@dataclasses.dataclass
class ChildOutcome:
  """How a trial's process ended.

  Attributes:
    returncode: its exit code; -N when signal N killed it.
    output: its stdout and stderr, interleaved.
    peak_rss_mb: its peak resident memory (the kernel's figure at exit).
    seconds: its wall time.
    stopped: whether this process passed it a stop signal.
  """
  returncode: int
  output: str
  peak_rss_mb: float
  seconds: float
  stopped: bool = False

  def reason(self) -> str:
    """The error line of a failed child: main.py's "tf_finetune: error:"
    line, else its last line (a traceback's exception), else the signal."""
    if self.returncode < 0:
      name = signal.Signals(-self.returncode).name
      return f"killed by {name}" + (" (out of memory?)"
                                    if name == "SIGKILL" else "")
    lines = [line for line in self.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("tf_finetune: error:")]
    return (errors or lines or [f"exit code {self.returncode}"])[-1][:500]


def run_child(command: Sequence[str], log_path: str,
              echo: bool = True) -> ChildOutcome:
  """Runs `command`, its output echoed and kept in `log_path`.

  SIGTERM and SIGINT to this process are passed on to the child, which
  checkpoints and stops; the child is killed if this process dies (Linux),
  so no orphan trains on beside a rerun of the search.
  """
  started = time.perf_counter()
  env = dict(os.environ)
  # The child imports this very package, wherever the search runs from.
  root = os.path.dirname(os.path.dirname(tf_finetune.__file__))
  env["PYTHONPATH"] = os.pathsep.join(
      filter(None, (root, env.get("PYTHONPATH"))))
  for name in [n for n in env if n.startswith("KERASTUNER_")]:
    del env[name]  # A trial is a training run, not a search process.
  process = subprocess.Popen(
      list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True, env=env, start_new_session=True, preexec_fn=_die_with_parent)
  stopped = []

  def pass_on(number, frame):
    del frame
    stopped.append(number)
    process.send_signal(number)
  handlers = _set_stop_handlers(pass_on)
  try:
    lines = []
    for line in process.stdout:
      lines.append(line)
      if echo:
        sys.stdout.write(line)
        sys.stdout.flush()
    process.stdout.close()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
  finally:
    _set_stop_handlers(handlers)
    if process.returncode is None:
      process.kill()
      process.wait()
  output = "".join(lines)
  files.write_text_atomic(log_path, output)
  return ChildOutcome(process.returncode, output, speed.peak_rss_mb(usage),
                      time.perf_counter() - started, bool(stopped))


def _set_stop_handlers(handler) -> Dict:
  """Sets `handler` (one callable, or the dict this returns) for SIGTERM
  and SIGINT; returns the previous handlers. Only the main thread may."""
  if not isinstance(handler, dict):
    handler = {number: handler for number in (signal.SIGTERM, signal.SIGINT)}
  if threading.current_thread() is not threading.main_thread():
    return {}
  return {number: signal.signal(number, h) for number, h in handler.items()}


# Linux's prctl, looked up before any fork: the child between fork and exec
# should take no lock another thread of this process might hold.
_PRCTL = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
  if _PRCTL is not None:
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


def trial_results(config: Config, outcome: ChildOutcome) -> Dict[str, float]:
  """The metrics of a finished trial, or raises by how it ended.

  Raises:
    _StoppedInTrial: a stop signal this process passed on ended it.
    _UserErrorInTrial: bad input (exit code 2).
    TrialFailed: it diverged, was killed or raised.
  """
  code = outcome.returncode
  if outcome.stopped and code != 0:
    raise _StoppedInTrial(
        f"search stopped in a trial ({outcome.reason()}); rerun the same "
        "command to resume it.", code if code > 0 else 128 - code)
  if code == config_lib.USER_ERROR_EXIT_CODE:
    raise _UserErrorInTrial(outcome.reason().replace(
        "tf_finetune: error: ", "", 1))
  if code != 0:
    raise TrialFailed(outcome.reason())
  result = files.read_json(os.path.join(config.workdir, report.REPORT_FILE))
  ran = {record["name"]: len(record["history"].get("loss", []))
         for record in result["stages"]}
  return {**kept_metrics(result), "epochs_run": sum(ran.values()),
          "head_epochs_run": ran.get("head", 0),
          "finetune_epochs_run": ran.get("finetune", 0),
          "peak_rss_mb": outcome.peak_rss_mb}


def kept_metrics(result: Dict) -> Dict[str, float]:
  """The metrics of the epoch whose weights a run's report.json says it
  kept (the last epoch's when none was validated)."""
  records, kept = result["stages"], result.get("kept")
  if kept is None:
    return {name: values[-1] for name, values
            in records[-1]["history"].items()}
  record = next(r for r in records if r["name"] == kept["stage"])
  index = kept["epoch"] - (0 if record is records[0]
                           else result["config"]["head_epochs"])
  return {name: values[index] for name, values in record["history"].items()}


class FineTuneTuner(kt.Tuner):
  """A KerasTuner Tuner whose trials are training runs in child processes.

  Overrides `run_trial` (KerasTuner's documented hook): writes the trial's
  flags, runs `command` on them, reads the run's report.json. After each
  trial, keeps the best one so far in WORKDIR/best/ (`keep_best`).
  """

  def __init__(self, oracle, hypermodel: FineTuneHyperModel,
               command: Sequence[str] = TRIAL_COMMAND, **kwargs):
    self.command = tuple(command)
    super().__init__(oracle, hypermodel, **kwargs)

  @property
  def config(self) -> Config:
    return self.hypermodel.config

  def _populate_initial_space(self):
    # The space has no conditional parameters, so declaring it is enough.
    # KerasTuner's default builds a model to find conditions.
    hp = self.oracle.get_space()
    self.hypermodel.declare_hyperparameters(hp)
    self.oracle.update_space(hp)

  def trial_dir(self, trial_id: str, execution: int = 0) -> str:
    """The workdir of one execution of a trial."""
    folder = os.path.join(self.project_dir, TRIALS_DIR, trial_id)
    return folder if not execution else os.path.join(
        folder, f"execution{execution}")

  def shared_head_folder(self, hp: kt.HyperParameters, execution: int) -> str:
    """Where the trials that train the same stage head share it, or "".

    Stage head depends on the flags, the trial's head epochs (Hyperband
    budgets differ) and the execution's seed, not on what stage finetune
    does. Not in a distributed search, whose workers may not share a file
    system.
    """
    if not shares_stage_head(self.config) or distributed_role():
      return ""
    head_epochs = self.hypermodel.trial_config(hp, "").head_epochs
    return os.path.join(self.project_dir, SHARED_HEADS,
                        f"head{head_epochs}-execution{execution}")

  def run_trial(self, trial, *args, **kwargs) -> List[Dict[str, float]]:
    hp = trial.hyperparameters
    print(f"tf_finetune: trial {trial.trial_id} on {self.tuner_id}: "
          f"{describe_values(hp.values)}", flush=True)
    results = []
    for execution in range(self.executions_per_trial):
      shared = self.shared_head_folder(hp, execution)
      config = self.hypermodel.trial_config(
          hp, self.trial_dir(trial.trial_id, execution), execution, shared)
      head_shared = bool(shared) and checkpoints.read_state(shared) is not None
      flagfile = os.path.join(config.workdir, "flags.cfg")
      files.write_text_atomic(flagfile, config_lib.to_flagfile(config))
      log_hparams(config.workdir, trial.trial_id, {
          name: hp.values[name] for name in self.config.search_ranges()})
      outcome = run_child([*self.command, f"--flagfile={flagfile}"],
                          os.path.join(config.workdir, TRIAL_LOG))
      # The search process's own high-water mark: flat from trial to trial
      # unless the search itself accumulates.
      trial.metrics.update("search_peak_rss_mb", speed.peak_rss_mb())
      try:
        result = trial_results(config, outcome)
      except TrialFailed:
        # What tuning_report.json shows of a failed trial too.
        trial.metrics.update("peak_rss_mb", outcome.peak_rss_mb)
        trial.metrics.update("seconds", outcome.seconds)
        # A failed trial is not rerun: its checkpoints are of no use.
        checkpoints.remove_checkpoints(config.workdir)
        raise
      results.append({**result, "seconds": outcome.seconds,
                      "head_shared": float(head_shared)})
    return results  # KerasTuner averages the executions.

  def on_trial_end(self, trial):
    super().on_trial_end(trial)
    if distributed_role():
      # The chief cannot reach a worker's files: keep no model.
      for execution in range(self.executions_per_trial):
        files.remove(os.path.join(self.trial_dir(trial.trial_id, execution),
                                  saved_models.MODEL_FILE))
    else:
      self.keep_best()

  def keep_best(self) -> Optional[str]:
    """Makes WORKDIR/best/ the workdir of the best completed trial so far
    (its first execution: the seed best.cfg has) and deletes the models of
    every other trial; returns the best trial's id, or None."""
    best = best_trial(self.oracle)
    for trial_id in self.oracle.trials:
      for execution in range(self.executions_per_trial):
        if best is None or (trial_id, execution) != (best.trial_id, 0):
          files.remove(os.path.join(self.trial_dir(trial_id, execution),
                                    saved_models.MODEL_FILE))
    if best is None:
      return None
    target = os.path.join(self.config.workdir, BEST_DIR)
    source = self.trial_dir(best.trial_id)
    if kept_trial_dir(target) != source:
      model_path = os.path.join(source, saved_models.MODEL_FILE)
      if not files.isfile(model_path):
        print(f"tf_finetune: warning: the best trial's {model_path} is "
              f"gone; {target} keeps an earlier trial.", file=sys.stderr)
        return best.trial_id
      with files.temp_folder(self.config.workdir) as temp:
        for name in _BEST_FILES:
          if files.isfile(os.path.join(source, name)):
            files.copy_atomic(os.path.join(source, name),
                              os.path.join(temp, name))
        files.write_text_atomic(os.path.join(temp, "flags.cfg"),
                                config_lib.to_flagfile(training_config(
                                    self.config, best.hyperparameters.values,
                                    workdir=target, shared_head="")))
        files.remove_tree(target)
        files.move_folder_into_place(temp, target)
    files.remove(os.path.join(source, saved_models.MODEL_FILE))
    return best.trial_id


def kept_trial_dir(best_dir: str) -> Optional[str]:
  """The trial workdir WORKDIR/best/ was copied from, or None."""
  path = os.path.join(best_dir, report.REPORT_FILE)
  if not files.isfile(path):
    return None
  return files.read_json(path)["config"]["workdir"]


def best_trial(oracle):
  """The best completed trial by the objective, or None."""
  best = [t for t in oracle.get_best_trials(1) if t.status == "COMPLETED"]
  return best[0] if best else None


def log_hparams(workdir: str, trial_id: str, values: Dict) -> None:
  """The trial's values for TensorBoard's HParams dashboard, beside the
  run's own logs (tensorboard --logdir WORKDIR/tuner/trials)."""
  with tf.summary.create_file_writer(os.path.join(workdir, "logs")).as_default():
    hparams_api.hparams(values, trial_id=trial_id)


def describe_values(values: Dict) -> str:
  """'unfreeze_blocks=2, finetune_learning_rate=3e-05, tuner/epochs=4'."""
  return ", ".join(f"{name}={value:.3g}" if isinstance(value, float)
                   else f"{name}={value}" for name, value in values.items()
                   if not name.startswith("tuner/") or name == "tuner/epochs")


def defaults_first(oracle_class):
  """`oracle_class` whose first trial is the flags' own values and whose
  other proposals lie inside the searched ranges (`clip_into_space`).

  The default recipe is in the search space: trying it first means the
  search never hands back a best.cfg that scored below it on validation.
  Hyperband's brackets fill trials their own way and are left as they are.
  """
  class DefaultsFirst(oracle_class):
    def populate_space(self, trial_id):
      if not self.trials:
        return {"status": kt.engine.trial.TrialStatus.RUNNING,
                "values": self.hyperparameters.values}
      proposal = super().populate_space(trial_id)
      if proposal.get("values"):
        proposal["values"] = clip_into_space(self.hyperparameters,
                                             proposal["values"])
      return proposal
  DefaultsFirst.__name__ = "DefaultsFirst" + oracle_class.__name__
  return DefaultsFirst


def clip_into_space(space: kt.HyperParameters, values: Dict) -> Dict:
  """`values` with every Int and Float clipped into its range.

  KerasTuner 1.4.8's `Int.prob_to_value` maps a probability in [0, 1) to
  [min, max + 1), but the Bayesian oracle's optimiser may return 1.0 itself
  (its bounds are inclusive), which gives max + 1: a search over
  `--search_finetune_epochs=5:20` ran trials of 21 epochs. The same
  boundary was fixed for Choice in keras-team/keras-tuner#152; for Int it
  is keras-team/keras-tuner#180.
  """
  clipped = dict(values)
  for hp in space.space:
    if isinstance(hp, (kt.engine.hyperparameters.Int,
                       kt.engine.hyperparameters.Float)) and hp.name in values:
      clipped[hp.name] = type(values[hp.name])(
          min(max(values[hp.name], hp.min_value), hp.max_value))
  return clipped


# Random points the Bayesian search draws before its Gaussian process
# guides it, the defaults (trial 0) among them: KerasTuner's own default
# (3 per searched flag) would spend a short search on random points only.
BAYESIAN_INITIAL_POINTS = 3


def create_tuner(config: Config, hypermodel: FineTuneHyperModel,
                 command: Sequence[str] = TRIAL_COMMAND) -> FineTuneTuner:
  """The tuner of `--tuner`, its state in WORKDIR/tuner/."""
  common = dict(
      objective=kt.Objective(config.objective,
                             selection.objective_direction(config.objective)),
      seed=config.seed + 1,  # KerasTuner takes seed 0 for "no seed".
      # A failed trial does not end the search (its report says why).
      max_consecutive_failed_trials=math.inf)
  if config.tuner == "hyperband":
    oracle = kt.oracles.HyperbandOracle(
        max_epochs=config.max_epochs or config.total_epochs,
        factor=config.hyperband_factor, **common)
    # HyperbandOracle takes no max_trials; the base Oracle honours it.
    oracle.max_trials = config.max_trials
  elif config.tuner == "bayesian":
    oracle = defaults_first(kt.oracles.BayesianOptimizationOracle)(
        max_trials=config.max_trials,
        num_initial_points=BAYESIAN_INITIAL_POINTS, **common)
  else:
    oracle = defaults_first(kt.oracles.RandomSearchOracle)(
        max_trials=config.max_trials, **common)
  return FineTuneTuner(
      oracle, hypermodel, command, directory=config.workdir,
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
    files.remove_tree(os.path.join(config.workdir, BEST_DIR))
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
               command: Sequence[str] = TRIAL_COMMAND) -> Optional[Dict]:
  """`--mode=tune`: searches, writes tuning_report.json and best.cfg, keeps
  and exports the best model; returns the report, None on a worker (the
  chief writes the results). `command` runs a trial, its flags appended."""
  role = distributed_role()
  check_tuner_available(config.tuner)
  if config.workdir.startswith("ram://"):
    raise UserError(f"--workdir={config.workdir!r}: a search runs each trial "
                    "in a process of its own, which cannot see this "
                    "process's ram:// files; use a local folder or a store "
                    "every process reaches (gs://).")
  if role != "worker":  # The chief owns the search state.
    prepare_project(config)
  # Bad data fails before any trial; the chief runs none and needs none.
  if role != "chief":
    train.check_data(config)
  started = time.perf_counter()
  tuner = create_tuner(config, FineTuneHyperModel(config), command)
  if role != "worker":
    _print_resume_state(tuner.oracle)
  try:
    tuner.search(verbose=2)
  except _UserErrorInTrial as e:
    raise UserError(str(e)) from None
  except _StoppedInTrial as e:
    raise _preempted(str(e), e.exit_code) from None
  if role == "worker":
    return None
  best = None if role else tuner.keep_best()
  export_path = best and export_best(
      training_config(config, tuner.oracle.trials[best].hyperparameters.values,
                      workdir=os.path.join(config.workdir, BEST_DIR)), command)
  result = write_results(config, tuner.oracle, time.perf_counter() - started,
                         export_path)
  if result["best_config"] is None:
    raise UserError(f"No trial completed, so there is no {BEST_CONFIG_FILE}; "
                    f"each trial's error is in {result['report_path']}.")
  return result


def _preempted(message: str, exit_code: int) -> Preempted:
  error = Preempted(message)
  error.exit_code = exit_code
  return error


def export_best(best: Config, command: Sequence[str]) -> str:
  """Exports WORKDIR/best/model.keras (`best`: WORKDIR/best/flags.cfg) with
  `--mode=export` in a child process, into its export folder (default
  WORKDIR/best/export/), unless a version is there; returns its path."""
  export_dir = best.resolved_export_dir
  versions = sorted(int(v.strip("/")) for v in (
      files.listdir(export_dir) if files.isdir(export_dir) else ())
                    if v.strip("/").isdigit())
  if versions:
    return os.path.join(export_dir, str(versions[-1]))
  outcome = run_child(
      [*command, f"--flagfile={os.path.join(best.workdir, 'flags.cfg')}",
       "--mode=export"], os.path.join(best.workdir, "export.log"), echo=False)
  if outcome.returncode != 0:
    raise UserError(f"Exporting {best.workdir}/{saved_models.MODEL_FILE} failed: "
                    f"{outcome.reason()}")
  return [line for line in outcome.output.splitlines()
          if line.startswith("export: ")][-1][len("export: "):]


def _print_resume_state(oracle) -> None:
  done = sum(t.status in ("COMPLETED", "FAILED") for t in oracle.trials.values())
  if oracle.trials:
    print(f"tf_finetune: resuming the search: {done} finished trial(s) kept, "
          f"{len(oracle.trials) - done} interrupted one(s) to run again.")


def _last_line(text: Optional[str]) -> Optional[str]:
  lines = (text or "").strip().splitlines()
  if not lines:
    return None
  # KerasTuner keeps the traceback; its last line is "module.Class: reason".
  line = lines[-1]
  prefix = f"{TrialFailed.__module__}.{TrialFailed.__name__}: "
  return (line[len(prefix):] if line.startswith(prefix) else line)[:500]


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
      "peak_rss_mb": last("peak_rss_mb"),
      "search_peak_rss_mb": last("search_peak_rss_mb"),
      "metrics": {name: last(name) for name in _METRICS},
      "head_shared": bool(last("head_shared")),
      "error": _last_line(trial.message),
  }


def write_results(config: Config, oracle, seconds: float,
                  export_path: Optional[str] = None) -> Dict:
  """Writes tuning_report.json, and best.cfg when a trial completed;
  returns the report (`best_config` None when none did). `seconds`: the
  search's wall time in this process; `export_path`: the best model's
  SavedModel version, if any."""
  trials = sorted(oracle.trials.values(), key=lambda t: int(t.trial_id))
  best = best_trial(oracle)
  best_path = os.path.join(config.workdir, BEST_CONFIG_FILE)
  best_dir = os.path.join(config.workdir, BEST_DIR)
  kept = best and files.isfile(os.path.join(best_dir, saved_models.MODEL_FILE))
  result = {
      "tuner": config.tuner,
      "objective": {"name": config.objective,
                    "direction": selection.objective_direction(config.objective)},
      "search_space": {name: list(bounds) for name, bounds
                       in config.search_ranges().items()},
      "best_trial": best.trial_id if best else None,
      "best_config": best_path if best else None,
      "best_workdir": best_dir if kept else None,
      "best_export": export_path,
      "seconds": seconds,
      "speed": _speed_of(best_dir) if kept else None,
      "shared_stage_head": shares_stage_head(config) and not distributed_role(),
      "trials": [describe_trial(t, config) for t in trials],
  }
  result["report_path"] = os.path.join(config.workdir, REPORT_FILE)
  files.write_json_atomic(result["report_path"], result)
  if best:
    files.write_text_atomic(best_path, best_flagfile(config, best))
  return result


def _speed_of(workdir: str) -> Dict:
  """The speed switches a run resolved (report.json), without its memory."""
  switches = dict(files.read_json(os.path.join(workdir, report.REPORT_FILE))
                  .get("speed") or {})
  switches.pop("peak_rss_mb", None)
  return switches


def best_flagfile(config: Config, trial) -> str:
  """best.cfg: the training flags of the best trial (its values and epochs,
  its --early_stopping_patience): training it gives WORKDIR/best/'s model."""
  best = training_config(config, trial.hyperparameters.values)
  header = (f"# Best of the {config.tuner} search in {config.workdir}: trial "
            f"{trial.trial_id}, {config.objective} {trial.score:.4f}; its "
            f"model is in {os.path.join(config.workdir, BEST_DIR)}.\n"
            f"# Train it: python -m tf_finetune.main --flagfile="
            f"{os.path.join(config.workdir, BEST_CONFIG_FILE)}\n")
  return header + config_lib.to_flagfile(best)


def format_summary(result: Dict) -> str:
  """The table printed at the end of a search, best trial marked '*'."""
  names = list(result["search_space"])
  objective = result["objective"]["name"]
  header = ["trial", "status", *names, "epochs", "seconds", "MB", objective]
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
        _format(trial["peak_rss_mb"], "{:.0f}"),
        _format(trial["score"], "{:.4f}")])
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths))
           .rstrip() for row in rows]
  lines.append("* best trial; epochs: run/budget; seconds: all executions; "
               "MB: peak memory of a trial's process")
  return "\n".join(lines)


def _format(value, pattern: str = "{:.3g}") -> str:
  if not isinstance(value, float):
    return "-" if value is None else str(value)
  whole = value.is_integer() and pattern == "{:.3g}"
  return str(int(value)) if whole else pattern.format(value)
