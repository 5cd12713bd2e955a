"""What sweeps write to MLflow: the parent run, records of trials that never reported, and
the summary (best values, every trial as CSV, Optuna's plots, the Pareto front).

It lives beside the sweeper rather than in `landcover.tracking.runs` because only sweeps use it,
and it talks to MLflow through the client (never the fluent API): trial runs of the same
process open fluent runs of their own.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from landcover.tracking.runs import PARAM_VALUE_LIMIT, experiment_id

log = logging.getLogger(__name__)

SWEEP_PLOTS = (
    "plot_optimization_history",
    "plot_param_importances",
    "plot_parallel_coordinate",
    "plot_intermediate_values",
)


def create_parent(
    uri: str,
    experiment: str,
    run_name: str,
    tags: Mapping[str, str],
    params: Mapping[str, Any],
    search_space: Mapping[str, str] | None = None,
) -> str:
    """The parent run of a sweep or multirun; its children nest under it by tag."""
    client = MlflowClient(uri)
    run = client.create_run(experiment_id(client, experiment), run_name=run_name, tags=dict(tags))
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value)[:PARAM_VALUE_LIMIT])
    for key, value in (search_space or {}).items():
        client.log_param(run.info.run_id, f"space.{key}", str(value)[:PARAM_VALUE_LIMIT])
    if search_space:
        client.log_dict(run.info.run_id, dict(search_space), "sweep/search_space.json")
    return run.info.run_id


def end_parent(uri: str, parent_run_id: str, status: str, reason: str) -> None:
    """End a sweep's parent run with the reason it stopped (tag and description)."""
    client = MlflowClient(uri)
    client.set_tag(parent_run_id, "landcover.error", reason[:5000])
    client.set_tag(parent_run_id, "mlflow.note.content", f"Sweep stopped ({status}): {reason}")
    client.set_terminated(parent_run_id, status)


def reopen_parent(uri: str, parent_run_id: str, n_trials: int) -> None:
    """A resumed sweep runs its parent again, with the budget it now has."""
    client = MlflowClient(uri)
    run = client.get_run(parent_run_id)
    if run.info.status != "RUNNING":
        client.update_run(parent_run_id, status="RUNNING")
    if run.data.params.get("n_trials") != str(n_trials):
        # params are write-once: the current budget is a tag (and the first one stays a param)
        client.set_tag(parent_run_id, "sweep.n_trials", str(n_trials))


def trial_runs(uri: str, parent_run_id: str, trial_number: int) -> list:
    """The MLflow runs of a study's trials, by trial number."""
    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    return client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and "
        f"tags.`sweep.trial_number` = '{trial_number}'",
    )


def record_failed_trial(
    uri: str,
    parent_run_id: str,
    tags: Mapping[str, str],
    params: Mapping[str, Any],
    error: str,
) -> None:
    """Make sure a failed trial has a FAILED child run with its error, also when it failed
    before training opened a run (a bad sampled value, a job that could not start)."""
    number = int(tags["sweep.trial_number"])
    if trial_runs(uri, parent_run_id, number):
        close_dead_trial_runs(uri, parent_run_id, number, error)
        return
    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    run = client.create_run(
        parent.info.experiment_id,
        tags={**tags, "mlflow.parentRunId": parent_run_id, "landcover.error": error[:5000]},
        run_name=f"{tags['sweep.study']} #{tags['sweep.trial_number']} (failed)",
    )
    for key, value in params.items():
        client.log_param(run.info.run_id, f"sweep.params.{key}", str(value)[:PARAM_VALUE_LIMIT])
    client.set_terminated(run.info.run_id, "FAILED")


def close_dead_trial_runs(uri: str, parent_run_id: str, trial_number: int, reason: str) -> int:
    """End a trial's RUNNING child runs FAILED with the reason; returns how many."""
    client = MlflowClient(uri)
    closed = 0
    for run in trial_runs(uri, parent_run_id, trial_number):
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "landcover.error", reason[:5000])
            client.set_terminated(run.info.run_id, "FAILED")
            closed += 1
    return closed


def _log_plot(client: MlflowClient, run_id: str, name: str, make) -> None:
    try:
        axes = make()
    except Exception as err:  # a plot can need more trials than the study has
        client.set_tag(run_id, f"sweep.plot.{name}", f"skipped: {err}"[:500])
        return
    figure = np.ravel(axes)[0].figure if isinstance(axes, np.ndarray) else axes.figure
    client.log_figure(run_id, figure, f"sweep/{name}.png")
    plt.close(figure)


def log_summary(uri: str, parent_run_id: str, study: optuna.Study, metrics: Sequence[str]) -> None:
    """Best value(s) and params, every trial as CSV, Optuna's plots; the Pareto front and
    its trials for a study with several objectives. Ends the parent run FINISHED."""
    import optuna.visualization.matplotlib as optuna_plots

    client = MlflowClient(uri)
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    multi = len(study.directions) > 1
    if completed and not multi:
        client.log_metric(parent_run_id, f"best/{metrics[0]}", float(study.best_value))
        client.log_dict(
            parent_run_id,
            {
                "number": study.best_trial.number,
                "value": study.best_value,
                "params": study.best_params,
            },
            "sweep/best.json",
        )
        client.set_tag(parent_run_id, "sweep.best_trial", str(study.best_trial.number))
    if completed and multi:
        front = study.best_trials
        header = ["number", *metrics, *sorted({k for t in front for k in t.params})]
        rows = [
            [str(t.number), *(f"{v:.6g}" for v in t.values)]
            + [str(t.params.get(k, "")) for k in header[1 + len(metrics) :]]
            for t in sorted(front, key=lambda t: t.number)
        ]
        client.log_text(
            parent_run_id,
            "\n".join(",".join(r) for r in [header, *rows]) + "\n",
            "sweep/pareto_front.csv",
        )
        client.set_tag(parent_run_id, "sweep.pareto_trials", ",".join(r[0] for r in rows))
        for index, metric in enumerate(metrics):
            best = (max if study.directions[index].name == "MAXIMIZE" else min)(
                t.values[index] for t in completed
            )
            client.log_metric(parent_run_id, f"best/{metric}", float(best))
        _log_plot(
            client,
            parent_run_id,
            "plot_pareto_front",
            lambda: optuna_plots.plot_pareto_front(study, target_names=list(metrics)),
        )
    states = {state.name: 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        states[trial.state.name] += 1
    for state, count in states.items():
        client.log_metric(parent_run_id, f"trials/{state.lower()}", count)
    client.log_text(parent_run_id, study.trials_dataframe().to_csv(index=False), "sweep/trials.csv")
    for name in SWEEP_PLOTS:
        if multi and name != "plot_parallel_coordinate":
            continue  # these plots take one objective
        plot = getattr(optuna_plots, name)
        if multi:
            _log_plot(client, parent_run_id, name, lambda p=plot: p(study, target=_first(study)))
        else:
            _log_plot(client, parent_run_id, name, lambda p=plot: p(study))
    client.set_terminated(parent_run_id, "FINISHED")


def _first(study: optuna.Study):
    del study
    return lambda trial: trial.values[0]


def log_multirun_summary(uri: str, parent_run_id: str, monitor: str, mode: str = "max") -> None:
    """A multirun of any sweeper: its children as a table, the best one by `best/<monitor>`."""
    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
    )
    key = f"best/{monitor}"
    rows = [["run_id", "run_name", "status", key]]
    for run in children:
        value = run.data.metrics.get(key)
        rows.append(
            [
                run.info.run_id,
                run.info.run_name,
                run.info.status,
                "" if value is None else str(value),
            ]
        )
    client.log_text(
        parent_run_id, "\n".join(",".join(r) for r in rows) + "\n", "multirun/children.csv"
    )
    client.log_metric(parent_run_id, "children", len(children))
    scored = [r for r in children if key in r.data.metrics]
    if scored:
        best = (max if mode == "max" else min)(scored, key=lambda r: r.data.metrics[key])
        client.set_tag(parent_run_id, "multirun.best_child", best.info.run_name)


def final_report(
    uri: str,
    parent_run_id: str,
    study: optuna.Study,
    metrics: Sequence[str],
    settings: Mapping[str, Any],
) -> list[str]:
    """The lines a sweep ends with (the best trial, the page to open, the command that
    promotes it), also written as the parent run's description with the budget, the space,
    the sampler and pruner, and the best trials."""
    from landcover.tracking.runs import browse_command

    client = MlflowClient(uri)
    trials = study.get_trials(deepcopy=False)
    counts = {state: sum(t.state == state for t in trials) for state in TrialState}
    tally = ", ".join(
        f"{counts[state]} {state.name.lower()}"
        for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        if counts[state]
    )
    experiment = client.get_experiment(client.get_run(parent_run_id).info.experiment_id).name
    lines = [f"sweep {study.study_name}: {tally} (budget {settings['n_trials']} trials)"]
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    ranked: list = []
    if completed and len(study.directions) == 1:
        best = study.best_trial
        maximise = study.direction.name == "MAXIMIZE"
        ranked = sorted(completed, key=lambda t: float(t.value or 0.0), reverse=maximise)[:5]
        lines.append(f"best: trial {best.number}, {metrics[0]} = {best.value:.4f}, {best.params}")
    elif completed:
        ranked = sorted(study.best_trials, key=lambda t: t.number)[:5]
        lines.append(f"Pareto front: trials {[t.number for t in study.best_trials]}")
    lines.append(browse_command(uri, parent_run_id).replace("browse the run", "browse the sweep"))
    if completed:
        lines.append(
            f"promote the best: landcover-promote experiment={experiment} "
            f"sweep={study.study_name} metric={metrics[0]} tracking.uri={uri}"
        )
    table = [
        "| trial | " + " | ".join(metrics) + " | params |",
        "| --- |" + " --- |" * (len(metrics) + 1),
    ]
    for trial in ranked:
        values = trial.values or []
        shown = " | ".join(f"{v:.4f}" for v in values)
        table.append(f"| {trial.number} | {shown} | {trial.params} |")
    directions = [d.name.lower() for d in study.directions]
    description = "\n".join(
        [
            f"Optuna sweep `{study.study_name}`: {tally}; budget {settings['n_trials']} trials.",
            "",
            f"- space: {settings.get('space')}",
            f"- sampler: {settings.get('sampler')}; pruner: {settings.get('pruner')}",
            f"- objective: {', '.join(metrics)} ({', '.join(directions)})",
            "",
            *(["Best trials:", "", *table] if ranked else ["No trial completed."]),
        ]
    )
    client.set_tag(parent_run_id, "mlflow.note.content", description)
    return lines
