"""Promotion: the best run of an experiment (or of one sweep) becomes a registered model version,
and the alias `champion` moves to it only when it beats the current champion on the same data.

MLflow 3 deprecated registry stages; aliases (`champion`, `previous`) are what commands name:
`models:/landcover@champion`. This module is the only registry writer. A model version carries
its lineage as tags (source run, experiment, sweep study and trial, metric, dataset
fingerprint, git commit) so that a champion can always be traced back to the run, the data and
the code that made it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from landcover import locks
from landcover.errors import LandcoverError
from landcover.registry import history

log = logging.getLogger("landcover.registry.promotion")

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
FINGERPRINT_TAG = "dataset_fingerprint"
# a champion's GIS package (landcover-package) is logged with its run under PACKAGE_ARTIFACTS;
# the version's PACKAGE_TAG names where (runs:/<run>/gis), its MLM Item is <model name>.stac.json
PACKAGE_TAG = "landcover.package"
# a studio retrain's run says on what it was scored: one scene's labels or its corrections
ONE_SCENE_TAG = "landcover.studio.scored_on"
PACKAGE_ARTIFACTS = "gis"
LINEAGE_RUN_TAGS = (
    FINGERPRINT_TAG,
    "git.commit",
    "git.dirty",
    "data",
    "model.arch",
    "sweep.study",
    "sweep.trial_number",
)


class PromotionError(LandcoverError):
    """No run can be promoted, or the promotion would compare unlike with unlike."""


@dataclass(frozen=True)
class Candidate:
    """A finished run with a logged model and the value of the promotion metric."""

    run: Run
    metric: str
    value: float

    @property
    def run_id(self) -> str:
        """The MLflow run that trained the candidate."""
        return self.run.info.run_id

    @property
    def fingerprint(self) -> str | None:
        """The dataset fingerprint its metric was measured on (compare like with like)."""
        return self.run.data.tags.get(FINGERPRINT_TAG)

    @property
    def model_id(self) -> str | None:
        """The LoggedModel of the run (what a registry version is created from)."""
        return logged_model_id(self.run)


def logged_model_id(run: Run) -> str | None:
    """The run's (last) MLflow 3 logged model, None if it logged none."""
    outputs = run.outputs.model_outputs if run.outputs else []
    return outputs[-1].model_id if outputs else None


@dataclass
class Promotion:
    """What `promote` did, for the log line and for tests."""

    name: str
    version: str
    candidate: Candidate
    created: bool
    champion: bool
    reason: str
    previous_version: str | None = None
    aliases: dict[str, str] = field(default_factory=dict)


def resolve_direction(metric: str, direction: str) -> str:
    """'auto': losses and errors are minimised, everything else (mIoU, accuracy) maximised."""
    if direction not in ("auto", "max", "min"):
        raise PromotionError(f"direction={direction!r} is not one of auto, max, min")
    if direction != "auto":
        return direction
    return "min" if any(word in metric.lower() for word in ("loss", "error")) else "max"


def metric_of(client: MlflowClient, run: Run, metric: str) -> float | None:
    """The metric of the weights that were logged: training logs the best epoch's model, so
    `best/<metric>` when recorded, else the metric at the best epoch, else its last value."""
    metrics = run.data.metrics
    if f"best/{metric}" in metrics and math.isfinite(metrics[f"best/{metric}"]):
        return metrics[f"best/{metric}"]
    if metric not in metrics:
        return None
    if "best/epoch" in metrics:
        epoch = int(metrics["best/epoch"])
        for point in client.get_metric_history(run.info.run_id, metric):
            if point.step == epoch:
                return point.value
    return metrics[metric]


def epochs_of(client: MlflowClient, run: Run, metric: str) -> int:
    """Epochs trained = distinct steps of the per-epoch metric (best/ metrics are not per epoch)."""
    return len({point.step for point in client.get_metric_history(run.info.run_id, metric)})


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def find_best_run(
    client: MlflowClient,
    *,
    experiment: str,
    metric: str,
    direction: str = "auto",
    study: str | None = None,
    min_epochs: int = 0,
    tags: Mapping[str, str] | None = None,
    where: str = "",
) -> Candidate:
    """The best FINISHED run with a logged model; ties go to the earlier run (a champion is
    not displaced by an equal), then to the smaller run id, so the choice is reproducible."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise PromotionError(f"experiment {experiment!r} does not exist (experiments: {names})")
    clauses = ["attributes.status = 'FINISHED'"]
    if study:
        clauses.append(f"tags.`sweep.study` = '{_quote(study)}'")
    clauses += [f"tags.`{key}` = '{_quote(str(value))}'" for key, value in (tags or {}).items()]
    if where:
        clauses.append(f"({where})" if " or " in where.lower() else where)
    try:
        runs = client.search_runs([found.experiment_id], " and ".join(clauses), max_results=50000)
    except MlflowException as err:
        raise PromotionError(f"bad run filter {' and '.join(clauses)!r}: {err.message}") from err
    scope = f"experiment {experiment!r}" + (f", sweep {study!r}" if study else "")
    if not runs:
        raise PromotionError(f"no FINISHED run in {scope} matches {' and '.join(clauses)!r}")
    with_model = [run for run in runs if logged_model_id(run)]
    if not with_model:
        raise PromotionError(f"{len(runs)} FINISHED runs in {scope}, but none logged a model")
    candidates = []
    for run in with_model:
        value = metric_of(client, run, metric)
        if value is None or not math.isfinite(value):
            continue
        if min_epochs and epochs_of(client, run, metric) < min_epochs:
            continue
        candidates.append(Candidate(run, metric, value))
    if not candidates:
        present = sorted({key for run in with_model for key in run.data.metrics})
        raise PromotionError(
            f"no run with a model in {scope} has metric {metric!r}"
            + (f" over at least {min_epochs} epochs" if min_epochs else "")
            + f" (metrics present: {present[:20]})"
        )
    sign = -1.0 if resolve_direction(metric, direction) == "max" else 1.0
    candidates.sort(key=lambda c: (sign * c.value, c.run.info.start_time, c.run_id))
    return candidates[0]


def candidate_of_run(client: MlflowClient, run_id: str, metric: str) -> Candidate:
    """A named run as a promotion candidate, with its metric and data fingerprint."""
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise PromotionError(f"run {run_id!r} does not exist: {err.message}") from err
    if run.info.status != "FINISHED":
        raise PromotionError(f"run {run_id} is {run.info.status}, not FINISHED")
    if logged_model_id(run) is None:
        raise PromotionError(f"run {run_id} logged no model")
    value = metric_of(client, run, metric)
    if value is None:
        raise PromotionError(f"run {run_id} has no metric {metric!r}")
    return Candidate(run, metric, value)


def resolve_version(client: MlflowClient, uri: str) -> ModelVersion | None:
    """`models:/name@alias` or `models:/name/version` -> the version (None if the alias or
    the registered model does not exist yet: there is no champion to beat)."""
    match = MODEL_URI.match(uri)
    if not match:
        raise PromotionError(
            f"{uri!r} is not a registry reference (models:/<name>@<alias> or models:/<name>/<n>)"
        )
    try:
        if match["alias"]:
            return client.get_model_version_by_alias(match["name"], match["alias"])
        return client.get_model_version(match["name"], match["version"])
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        if err.error_code == "PERMISSION_DENIED" and not registered_model_visible(
            client, match["name"]
        ):
            # MLflow's basic-auth server answers 403, not 404, for a model that does not
            # exist yet (no permission row to check): the first promotion creates it
            return None
        raise


def registered_model_visible(client: MlflowClient, name: str) -> bool:
    """Whether the registered model exists for this user (search lists only what one may
    read, so a model that exists unreadably is told apart when creating it)."""
    found = client.search_registered_models(filter_string=f"name = '{_quote(name)}'")
    return any(model.name == name for model in found)


def _better(value: float, than: float, direction: str) -> bool:
    return value > than if direction == "max" else value < than


def _lineage(candidate: Candidate, experiment: str, direction: str) -> dict[str, str]:
    tags = {
        "landcover.source_run_id": candidate.run_id,
        # MLflow 3.17's SQL registry stores keep no model_id column (a version read back has
        # model_id None whatever was passed): the logged model's id is here and in `source`
        **({"landcover.model_id": candidate.model_id} if candidate.model_id else {}),
        "landcover.experiment": experiment,
        "landcover.metric": candidate.metric,
        "landcover.metric_value": repr(candidate.value),
        "landcover.direction": direction,
    }
    run_tags = candidate.run.data.tags
    tags.update({key: run_tags[key] for key in LINEAGE_RUN_TAGS if key in run_tags})
    if "best/epoch" in candidate.run.data.metrics:
        tags["landcover.training.best_epoch"] = str(int(candidate.run.data.metrics["best/epoch"]))
    return tags


def _description(candidate: Candidate, experiment: str) -> str:
    tags = candidate.run.data.tags
    return (
        f"{tags.get('model.arch', 'model')} trained on {tags.get('data', 'unknown data')}: "
        f"{candidate.metric} = {candidate.value:.4f} (run {candidate.run_id} of experiment "
        f"{experiment!r}"
        + (
            f", sweep {tags['sweep.study']} trial {tags.get('sweep.trial_number')}"
            if "sweep.study" in tags
            else ""
        )
        + f"); dataset fingerprint {candidate.fingerprint or 'unknown'}; git "
        f"{tags.get('git.commit', 'unknown')[:12]}"
    )


def _existing_version(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    try:
        versions = client.search_model_versions(f"name = '{_quote(name)}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _register(client: MlflowClient, name: str, candidate: Candidate) -> tuple[ModelVersion, bool]:
    """The version holding this run's model: the existing one (idempotent) or a new one."""
    existing = _existing_version(client, name, candidate.run_id)
    if existing is not None:
        return existing, False
    if not registered_model_visible(client, name):
        try:
            client.create_registered_model(
                name, description="Land cover segmentation models promoted by landcover-promote."
            )
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            if not registered_model_visible(client, name):  # not a race with a colleague
                user = os.environ.get("MLFLOW_TRACKING_USERNAME", "this user")
                raise PromotionError(
                    f"registered model {name!r} exists but {user} may not read it: one who "
                    f"MANAGEs it or an admin grants it: landcover-team grant {user} --model "
                    f"{name} --permission EDIT"
                ) from err
    source = f"models:/{candidate.model_id}" if candidate.model_id else None
    version = client.create_model_version(
        name,
        source=source or f"runs:/{candidate.run_id}/model",
        run_id=candidate.run_id,
        model_id=candidate.model_id,
    )
    if candidate.model_id:
        link_version_to_logged_model(client, candidate.model_id, version)
    return version, True


def link_version_to_logged_model(
    client: MlflowClient, model_id: str, version: ModelVersion
) -> None:
    """Name the version on its logged model (`mlflow.modelVersions`), as `mlflow.register_model`
    does and `create_model_version` does not: the run's "Logged models" table and the model's
    page then show the registered version."""
    model = client.get_logged_model(model_id)
    versions = json.loads(model.tags.get("mlflow.modelVersions", "[]"))
    entry = {"name": version.name, "version": version.version}
    if entry not in versions:
        client.set_logged_model_tags(
            model_id, {"mlflow.modelVersions": json.dumps([*versions, entry])}
        )


def move_alias(
    client: MlflowClient,
    name: str,
    alias: str,
    previous_alias: str,
    current: ModelVersion | None,
    version: str,
) -> str | None:
    """Point `alias` at `version`; the version it leaves (`current`, when another one) becomes
    `previous_alias`. Returns the version left, if any."""
    left = None
    if current is not None and str(current.version) != str(version):
        client.set_registered_model_alias(name, previous_alias, current.version)
        left = str(current.version)
    client.set_registered_model_alias(name, alias, version)
    return left


def aliases_of(client: MlflowClient, name: str) -> dict[str, str]:
    """Every alias of the registered model and the version it names."""
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def promote(
    client: MlflowClient,
    candidate: Candidate,
    *,
    name: str,
    experiment: str,
    direction: str = "auto",
    alias: str = "champion",
    previous_alias: str = "previous",
    against: str | None = None,
    force: bool = False,
    reason: str = "",
) -> Promotion:
    """Register the candidate and move `alias` to it if it beats the version `against` names
    (default `models:/<name>@<alias>`) on the same metric and the same data. Every decision,
    refusals included, is appended to the champion's history (`registry.history`) with
    `reason`, the reason the person gave.

    Decide, register and move the alias under one lock on the registry's store (a file lock
    beside SQLite, an advisory lock on PostgreSQL): two promotions at once never give one run
    two versions, and the champion is always the best of what was promoted.
    """
    with locks.store_lock(str(client._registry_uri), "registry"):
        return _promote(
            client,
            candidate,
            name=name,
            experiment=experiment,
            direction=direction,
            alias=alias,
            previous_alias=previous_alias,
            against=against,
            force=force,
            reason=reason,
        )


def _promote(
    client: MlflowClient,
    candidate: Candidate,
    *,
    name: str,
    experiment: str,
    direction: str,
    alias: str,
    previous_alias: str,
    against: str | None,
    force: bool,
    reason: str,
) -> Promotion:
    direction = resolve_direction(candidate.metric, direction)
    champion = resolve_version(client, against or f"models:/{name}@{alias}")
    if champion is None and against:
        raise PromotionError(f"against={against!r} names no registered model version")
    champion_value: float | None = None

    def refuse(message: str) -> PromotionError:
        history.record(
            client, action="refused", alias=alias, model=name,
            from_version=str(champion.version) if champion else None, to_version=None,
            metric=candidate.metric, from_value=champion_value, to_value=candidate.value,
            reason=reason, decision=f"run {candidate.run_id}: {message}", moved=False,
        )  # fmt: skip
        return PromotionError(message)

    one_scene = candidate.run.data.tags.get(ONE_SCENE_TAG)
    if one_scene and not force:
        raise refuse(
            f"run {candidate.run_id} is a studio retrain scored on one scene ({one_scene}): "
            "its score says little about other scenes (force=true promotes it anyway)"
        )
    if one_scene:
        log.warning("promoting run %s, scored on one scene (%s)", candidate.run_id, one_scene)
    if champion is not None and champion.run_id != candidate.run_id:
        champion_run = client.get_run(str(champion.run_id))
        fingerprint = champion_run.data.tags.get(FINGERPRINT_TAG)
        champion_value = metric_of(client, champion_run, candidate.metric)
        if fingerprint != candidate.fingerprint and not force:
            raise refuse(
                f"run {candidate.run_id} was evaluated on other data than the current champion "
                f"({name} version {champion.version}, run {champion.run_id}): dataset "
                f"fingerprint {candidate.fingerprint} vs {fingerprint}; their {candidate.metric} "
                "values are not comparable (force=true promotes anyway)"
            )
        if champion_value is None and not force:
            raise refuse(
                f"the current champion ({name} version {champion.version}) has no metric "
                f"{candidate.metric!r} to compare with (force=true promotes anyway)"
            )

    version, created = _register(client, name, candidate)
    for key, value in _lineage(candidate, experiment, direction).items():
        client.set_model_version_tag(name, version.version, key, value)
    if created or not version.description:
        client.update_model_version(name, version.version, _description(candidate, experiment))

    result = Promotion(name, str(version.version), candidate, created, False, "")
    already = champion is not None and str(champion.version) == str(version.version)
    if already:
        result.champion, result.reason = True, f"version {version.version} is already {alias}"
    elif champion is None:
        result.champion, result.reason = True, f"no {alias} yet"
    elif force:
        result.champion, result.reason = True, "forced"
    elif champion_value is None or _better(candidate.value, champion_value, direction):
        result.champion = True
        result.reason = (
            f"{candidate.metric} {candidate.value:.4f} beats {champion_value:.4f} "
            f"of version {champion.version}"
        )
    else:
        result.reason = (
            f"{candidate.metric} {candidate.value:.4f} does not beat {champion_value:.4f} of "
            f"{alias} version {champion.version} ({direction}imised); {alias} stays"
        )
    if result.champion and not already:
        # the alias holder is the version compared with, unless `against` named another one
        current = (
            champion if against is None else resolve_version(client, f"models:/{name}@{alias}")
        )
        result.previous_version = move_alias(
            client, name, alias, previous_alias, current, str(version.version)
        )
    client.set_model_version_tag(name, version.version, "landcover.promotion", result.reason)
    result.aliases = aliases_of(client, name)
    if already:
        action = "kept"
    elif not result.champion:
        action = "refused"
    else:
        action = "forced" if force and result.reason == "forced" else "promoted"
    history.record(
        client, action=action, alias=alias, model=name,
        from_version=str(champion.version) if champion else None, to_version=result.version,
        metric=candidate.metric, from_value=champion_value, to_value=candidate.value,
        reason=reason, decision=result.reason, moved=result.champion and not already,
    )  # fmt: skip
    return result
