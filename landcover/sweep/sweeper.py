"""Our Optuna sweep over Hydra's launchers: slots, trials, heartbeats, records.

`hydra.sweeper.n_jobs` slots keep that many trials in flight through whatever Hydra launcher is
configured (joblib, submitit, Ray; the basic launcher runs one at a time in this process); the
moment a trial ends its slot asks for the next one, with no batch barrier. Each launched job
re-attaches to its trial through the study storage (see `landcover.sweep.trial`), so reporting,
pruning and MLflow nesting work in any process. Any number of sweepers can share one study;
re-running the same command resumes it; trials of a worker that died are failed by heartbeat
and replaced; failed trials are recorded, up to a maximum failure rate. One MLflow parent run
per study holds the search space, the best result, a CSV of all trials and Optuna's plots;
every trial is a child run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.study import StudyDirection
from optuna.trial import TrialState

from landcover import locks
from landcover.config import plain_dict
from landcover.errors import ConfigError, LandcoverError, first_line
from landcover.sweep import records, space
from landcover.sweep import study as studies
from landcover.sweep.trial import METRICS_ATTR, PARENT_ATTR, PRUNER_ATTR, heartbeat

log = logging.getLogger(__name__)

# the loggers that print each job's overrides as it is launched ("#0 : lr=... ++trial.number=0")
LAUNCHER_LOGGERS = (
    "hydra._internal.core_plugins.basic_launcher",
    "hydra_plugins.hydra_joblib_launcher._core",
    "hydra_plugins.hydra_ray_launcher._core",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher",
)


class InternalOverridesHidden(logging.Filter):
    """Drops the sweeper's own `++trial.*` overrides (study, storage, heartbeat, number) from
    the launchers' "#N : ..." lines: the user reads the parameters the study chose; the full
    overrides stay in each trial's Hydra config and the run's params."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's message without the internal overrides; never drops it."""
        message = record.getMessage()
        if "++trial." in message:
            kept = [word for word in message.split(" ") if not word.startswith("++trial.")]
            record.msg, record.args = " ".join(kept), None
        return True


def hide_internal_overrides() -> None:
    """Attach the filter once to every launcher's logger."""
    for name in LAUNCHER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, InternalOverridesHidden) for f in logger.filters):
            logger.addFilter(InternalOverridesHidden())


# fail_stale_trials and the matplotlib plots are marked experimental; we rely on them knowingly
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

# launchers whose jobs may run on other machines: a SQLite file must then be on shared storage
REMOTE_LAUNCHERS = ("SlurmLauncher", "RayAWSLauncher")
PARALLEL_LAUNCHERS = "hydra/launcher=joblib, submitit_local, submitit_slurm or ray"


def quote(value: str) -> str:
    """A value as a quoted string in Hydra's override grammar (URLs with ':', '@', '=')."""
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def as_list(value: Any) -> list[str]:
    """A sweep config value that may be one item or a list, as a list."""
    if isinstance(value, list | tuple | ListConfig):
        return [str(v) for v in value]
    return [str(value)]


class OptunaSweep:
    """The sweep itself (the Hydra plugin class delegates here, importing it only when a
    sweep starts: Hydra imports every plugin module when any app starts)."""

    def __init__(
        self,
        study_name: str | None,
        storage: str | None,
        n_trials: int,
        n_jobs: int,
        direction: Any,
        metric: Any,
        max_failure_rate: float,
        min_trials_for_failure_rate: int,
        heartbeat_interval: int,
        grace_period: int,
        wait_for_others: bool,
        sampler: dict,
        pruner: dict,
        params: dict,
        enqueue: list,
        carry_env: list | None = None,
    ) -> None:
        directions, metrics = as_list(direction), as_list(metric)
        if any(d not in ("maximize", "minimize") for d in directions):
            raise ConfigError(f"hydra.sweeper.direction={directions}: maximize or minimize")
        if len(directions) != len(metrics):
            raise ConfigError(
                f"hydra.sweeper.direction has {len(directions)} entries but "
                f"hydra.sweeper.metric has {len(metrics)}: one direction per metric"
            )
        if n_jobs < 1 or n_trials < 1:
            raise ConfigError(
                f"hydra.sweeper.n_jobs={n_jobs} and n_trials={n_trials} must be positive"
            )
        self.study_name = study_name
        self.storage_url = studies.absolute_sqlite_url(storage or "sqlite:///optuna.db")
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.directions = directions
        self.metrics = metrics
        self.max_failure_rate = max_failure_rate
        self.min_trials_for_failure_rate = min_trials_for_failure_rate
        self.heartbeat = studies.Heartbeat(heartbeat_interval, grace_period)
        self.wait_for_others = wait_for_others
        self.waiting_logged = False
        self.sampler_cfg = dict(sampler)
        self.pruner_cfg = dict(pruner)
        self.space = space.parse_space(params or {})
        self.raw_params = {str(k): str(v) for k, v in (params or {}).items()}
        self.enqueue = [dict(e) for e in enqueue or []]
        self.grid = space.grid(self.space) if self.sampler_cfg.get("name") == "grid" else None
        studies.make_sampler(self.sampler_cfg, 0, self.grid, len(metrics) > 1)  # check it now
        studies.make_pruner(self.pruner_cfg)
        self.stale = studies.StaleTrials()
        self.storage: optuna.storages.RDBStorage | None = None  # made under the study lock
        self.in_flight: set[int] = set()
        self.stop = threading.Event()
        self.stop_reason: str | None = None
        self.carry_env = [str(name) for name in carry_env or []]
        self.launch_failures = 0  # launcher errors in a row (a cluster that is gone)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        """Keep Hydra's context and build the launcher the trials run on."""
        self.config = config
        hide_internal_overrides()
        if _is_ray(config):
            # trials on a cluster started apart run with the worker's environment and
            # working directory: the driver's travel with each job (landcover.cluster)
            from landcover.cluster import CarryingTask, JobEnvironment

            environment = JobEnvironment.of_driver(
                OmegaConf.to_yaml(config, resolve=False), self.carry_env
            )
            log.info("carried to the Ray workers: %s", ", ".join(environment.names()) or "nothing")
            task_function = CarryingTask(task_function, environment)
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        launcher_name = type(self.launcher).__name__
        if self.n_jobs > 1 and launcher_name == "BasicLauncher":
            raise ConfigError(
                f"hydra.sweeper.n_jobs={self.n_jobs} needs a launcher that runs jobs in other "
                f"processes: choose {PARALLEL_LAUNCHERS} (the basic launcher runs one job at a "
                "time in this process)"
            )
        if launcher_name in REMOTE_LAUNCHERS and locks.sqlite_path(self.storage_url):
            log.warning(
                "hydra.sweeper.storage=%s is a SQLite file and %s runs jobs on other machines: "
                "the file must be on a filesystem they all share (PostgreSQL is the documented "
                "way for clusters)",
                self.storage_url,
                launcher_name,
            )

    # ------------------------------------------------------------------------------------------
    @property
    def budget(self) -> int:
        """n_trials, or fewer when a grid has fewer points."""
        if self.grid is None:
            return self.n_trials
        return min(self.n_trials, math.prod(len(values) for values in self.grid.values()))

    def _study(self, name: str) -> optuna.Study:
        """The study object slots tell through; they ask through one seeded per trial. Its
        sampler only sees `tell`, where a grid sampler would try to stop an optimize loop."""
        return optuna.create_study(
            study_name=name,
            storage=self.storage,
            sampler=optuna.samplers.RandomSampler(),
            pruner=studies.make_pruner(self.pruner_cfg),
            directions=cast(list[StudyDirection], self.directions),
            load_if_exists=True,
        )

    def _sampler(self, trial_number: int) -> optuna.samplers.BaseSampler:
        return studies.make_sampler(
            self.sampler_cfg, trial_number, self.grid, len(self.metrics) > 1
        )

    def _parent_run(self, study: optuna.Study, uri: str, experiment: str) -> str:
        parent = study.user_attrs.get(PARENT_ATTR)
        if parent is None:
            parent = records.create_parent(
                uri,
                experiment,
                run_name=f"sweep {study.study_name}",
                tags={"landcover.kind": "sweep", "sweep.study": study.study_name},
                params={
                    "study_name": study.study_name,
                    "storage": _without_password(self.storage_url),
                    "n_trials": self.n_trials,
                    "direction": ",".join(self.directions),
                    "metric": ",".join(self.metrics),
                    "sampler": str(self.sampler_cfg),
                    "pruner": str(self.pruner_cfg),
                },
                search_space=self.raw_params,
            )
            study.set_user_attr(PARENT_ATTR, parent)
        return parent

    def sweep(self, arguments: list[str]) -> None:
        """Run the study: `n_jobs` slots each ask, launch and tell until the budget is used.

        Whatever stops it (a cluster it cannot reach, a store it cannot open, every trial
        failing, Ctrl-C), the parent run ends FAILED or KILLED with the reason: never RUNNING.
        """
        self.parent: str | None = None
        self.uri = studies.absolute_sqlite_url(str(self.config.tracking.uri))
        try:
            self._sweep(arguments)
        except BaseException as err:
            if self.parent is not None:
                reason = first_line(err)
                status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
                with contextlib.suppress(Exception):  # the store itself may be what failed
                    records.end_parent(self.uri, self.parent, status, reason)
            raise

    def _sweep(self, arguments: list[str]) -> None:
        fixed_model = next(
            (a.split("=", 1)[1] for a in arguments if a.startswith("model=")),
            self.config.hydra.runtime.choices.get("model"),
        )
        name = self.study_name or f"sweep-{self.config.tracking.experiment}"
        uri = self.uri
        experiment = str(self.config.tracking.experiment)
        attached = _start_engine(self.launcher, self._shared_paths())
        with studies.study_lock(self.storage_url):
            # two workers creating the tables of a new database at once would collide
            self.storage = studies.make_storage(self.storage_url, self.heartbeat, self.stale)
            study = self._study(name)
            if list(study.directions) != [
                optuna.study.StudyDirection[d.upper()] for d in self.directions
            ]:
                raise ConfigError(
                    f"study {name} in {_without_password(self.storage_url)} has directions "
                    f"{[d.name.lower() for d in study.directions]}, not {self.directions}"
                )
            study.set_user_attr(METRICS_ATTR, self.metrics)
            study.set_user_attr(PRUNER_ATTR, self.pruner_cfg)
            parent = self._parent_run(study, uri, experiment)
            self.parent = parent
            records.reopen_parent(uri, parent, self.n_trials)
            if self.enqueue and not study.user_attrs.get("enqueued"):
                for values in self.enqueue:
                    study.enqueue_trial(values, skip_if_exists=True)
                study.set_user_attr("enqueued", True)
        log.info(
            "study %s in %s: %d of %d trials used; %d slot(s); MLflow parent run %s",
            name,
            _without_password(self.storage_url),
            studies.budget_used(study),
            self.budget,
            self.n_jobs,
            parent,
        )
        monitor = next((m for m in self.metrics if not m.startswith("model/")), None)
        base = [*arguments, f"tracking.uri={quote(uri)}"]
        if monitor is not None:
            mode = self.directions[self.metrics.index(monitor)]
            base += [f"trainer.monitor={monitor}", f"trainer.monitor_mode={mode[:3]}"]
        base += [
            f"++trial.study={quote(name)}",
            f"++trial.storage={quote(self.storage_url)}",
            f"++trial.heartbeat_interval={self.heartbeat.interval}",
            f"++trial.grace_period={self.heartbeat.grace_period}",
        ]
        if attached:
            # a worker resolves a relative sweep folder against its own working directory
            sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
            base.append(f"hydra.sweep.dir={quote(str(sweep_dir))}")
        context = _SweepContext(study, base, fixed_model, parent, uri)
        if self.n_jobs == 1:
            self._slot(context)  # in this thread: the basic launcher runs the job right here
        else:
            with ThreadPoolExecutor(self.n_jobs, thread_name_prefix="sweep-slot") as pool:
                for future in [pool.submit(self._slot, context) for _ in range(self.n_jobs)]:
                    future.result()
        records.log_summary(uri, parent, study, self.metrics)
        settings = {
            "n_trials": self.budget,
            "space": self.raw_params,
            "sampler": self.sampler_cfg,
            "pruner": self.pruner_cfg,
        }
        for line in records.final_report(uri, parent, study, self.metrics, settings):
            log.info("%s", line)
        if self.stop_reason:
            raise SweepFailedError(self.stop_reason)
        trials = studies.counting(study.get_trials(deepcopy=False))
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        if trials and not finished:
            last = next(
                (studies.fail_reason(t) for t in reversed(trials) if studies.fail_reason(t)), ""
            )
            raise SweepFailedError(
                f"sweep {study.study_name}: every trial failed ({len(trials)}); the last: {last}"
            )

    def _shared_paths(self) -> tuple[list[str], list[str]]:
        """What every node of a cluster must see: the working directory (read), the sweep
        folder and the folders of SQLite stores (written)."""
        writable = [str(Path(str(self.config.hydra.sweep.dir)).absolute())]
        for url in (self.storage_url, studies.absolute_sqlite_url(str(self.config.tracking.uri))):
            path = locks.sqlite_path(url)
            if path is not None:
                writable.append(str(path.parent))
        return [str(Path.cwd())], writable

    # -- one slot: ask, launch, wait, repeat -----------------------------------------------
    def _slot(self, context: _SweepContext) -> None:
        study = context.study
        while not self.stop.is_set():
            trial = None
            with studies.study_lock(self.storage_url):
                self._fail_stale(context)
                # a WAITING trial (enqueued, or a dead trial's replacement) is already counted
                # in the budget: it is run, not skipped
                if studies.budget_used(study) < self.budget or studies.waiting(study):
                    trial = self._ask(context)
                    if trial is None:
                        continue  # failed at sampling: recorded, ask again
                else:
                    others = studies.running_elsewhere(study, self.in_flight)
                    if not others or not self.wait_for_others:
                        return
                    if not self.waiting_logged:
                        self.waiting_logged = True
                        log.info(
                            "budget used; waiting for trials %s of other workers (one that "
                            "dies is replaced here; hydra.sweeper.wait_for_others=false to "
                            "leave now)",
                            others,
                        )
            if trial is None:  # the budget is used but another worker's trial may yet die
                self.stop.wait(min(self.heartbeat.interval, 5))
                continue
            try:
                self._run(context, *trial)
            finally:
                self.in_flight.discard(trial[0].number)
            failed, done = studies.failure_rate(study)
            if done >= self.min_trials_for_failure_rate and failed / done > self.max_failure_rate:
                self.stop_reason = (
                    f"sweep {study.study_name} stopped: {failed} of {done} trials failed, more "
                    f"than hydra.sweeper.max_failure_rate={self.max_failure_rate}"
                )
                self.stop.set()

    def _fail_stale(self, context: _SweepContext) -> None:
        """Fail trials whose worker died (enqueueing replacements); close their MLflow runs."""
        optuna.storages.fail_stale_trials(context.study)
        for dead in self.stale.take():
            reason = (
                f"worker died: trial {dead.number} sent no heartbeat for more than "
                f"{self.heartbeat.grace_period} s (hydra.sweeper.grace_period); "
                "a replacement trial runs its parameters again"
            )
            closed = records.close_dead_trial_runs(context.uri, context.parent, dead.number, reason)
            log.warning("%s (%d MLflow run(s) closed FAILED)", reason, closed)

    def _ask(self, context: _SweepContext) -> tuple[optuna.Trial, dict] | None:
        """A new trial, its sampler seeded by the trial's number, and its values."""
        study = context.study
        assert self.storage is not None  # made before any slot starts
        number = len(study.get_trials(deepcopy=False))  # the number ask() gives, under the lock
        asker = optuna.Study(
            study_name=study.study_name,
            storage=self.storage,
            sampler=self._sampler(number),
            pruner=study.pruner,
        )
        trial = asker.ask()
        self.in_flight.add(trial.number)
        self.storage.record_heartbeat(trial._trial_id)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        if trial.number >= self.budget and not locks.can_lock(self.storage_url):
            trial.set_user_attr("reason", studies.OVER_BUDGET)
            study.tell(trial, state=TrialState.FAIL)
            self.in_flight.discard(trial.number)
            self.stop.set()
            return None
        try:
            values = space.suggest(trial, self.space, context.fixed_model)
        except ConfigError as err:
            trial.set_user_attr("error", str(err))
            study.tell(trial, state=TrialState.FAIL)
            self.in_flight.discard(trial.number)
            log.warning("trial %d failed at sampling: %s", trial.number, err)
            return None
        return trial, values

    def _run(self, context: _SweepContext, trial: optuna.Trial, values: dict) -> None:
        overrides = [*context.base, f"++trial.number={trial.number}", *space.as_overrides(values)]
        assert self.storage is not None
        # the slot's heartbeats keep a trial alive while its job waits in a queue
        try:
            with heartbeat(self.storage, trial._trial_id, self.heartbeat.interval):
                (result,) = self.launcher.launch([overrides], initial_job_idx=trial.number)
        except Exception as err:
            # the launcher lost the job (a dead joblib worker, a lost Ray node): the trial is
            # failed and run again by a replacement; the other slots go on
            self._lost(context, trial, values, err)
            return
        self.launch_failures = 0
        frozen = self.storage.get_trial(trial._trial_id)
        if frozen.state == TrialState.FAIL:
            reason = studies.fail_reason(frozen)
            log.warning("trial %d FAIL: %s (with %s)", trial.number, reason, values)
            return
        if frozen.state != TrialState.RUNNING:
            value = frozen.values if frozen.values and len(frozen.values) > 1 else frozen.value
            log.info("trial %d %s: %s with %s", trial.number, frozen.state.name, value, values)
            return
        # the job never told the study: it could not start, or its process died
        error = result._return_value if result.status == JobStatus.FAILED else None
        message = (
            f"{type(error).__name__}: {error}"[:2000]
            if error is not None
            else "the job ended without reporting its trial"
        )
        self._fail(context, trial, values, message)
        log.warning("trial %d failed: %s", trial.number, studies.last_line(message))

    def _fail(
        self, context: _SweepContext, trial: optuna.Trial, values: dict, message: str
    ) -> None:
        trial.set_user_attr("error", message[:2000])
        trial.set_user_attr(studies.FAIL_REASON, studies.last_line(message))
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            context.study.tell(trial, state=TrialState.FAIL)  # unless another worker closed it
        records.record_failed_trial(
            context.uri,
            context.parent,
            {"sweep.study": context.study.study_name, "sweep.trial_number": str(trial.number)},
            values,
            message,
        )

    def _lost(
        self, context: _SweepContext, trial: optuna.Trial, values: dict, err: Exception
    ) -> None:
        message = f"the launcher lost the job: {type(err).__name__}: {studies.last_line(str(err))}"
        self._fail(context, trial, values, message)
        context.study.enqueue_trial(dict(trial.params), user_attrs={studies.REPLACES: trial.number})
        self.launch_failures += 1
        log.warning("trial %d failed: %s; a replacement runs it again", trial.number, message)
        if self.launch_failures >= max(3, 2 * self.n_jobs):
            count = self.launch_failures
            self.stop_reason = f"the launcher failed {count} times in a row: {message}"
            self.stop.set()


@dataclass
class _SweepContext:
    study: optuna.Study
    base: list[str]
    fixed_model: str | None
    parent: str
    uri: str


def _without_password(url: str) -> str:
    """A storage URL fit for logs and params: `postgresql://user:***@host/db`."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{host}"


def _is_ray(config: DictConfig) -> bool:
    target = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
    return target.endswith("RayLauncher")


def _start_engine(launcher: Any, shared_paths: tuple[list[str], list[str]]) -> bool:
    """Start or attach to Ray once before the slots launch (its launcher initialises Ray on
    first use, several slots doing that at once race, and it passes an object store size that
    Ray refuses when attaching). True when attached to a cluster that exists: its nodes are
    then checked for the paths a trial needs."""
    if type(launcher).__name__ != "RayLauncher":
        return False
    from landcover.cluster import check_every_node, connect, requested_address

    init = plain_dict(launcher.ray_cfg.init) if launcher.ray_cfg.init else {}
    address = init.pop("address", None)
    connect(address, init)
    if not requested_address(address):
        return False
    check_every_node(*shared_paths)
    return True


class SweepFailedError(LandcoverError):
    """The sweep stopped: too many trials failed, all of them did, or the launcher is gone."""
