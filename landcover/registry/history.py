"""The champion's history: every decision about an alias (a promotion, a forced one, a refused
one, a restore) kept as one finished MLflow run in the experiment `registry/<model>`, so that
the MLflow UI lists them and `landcover-champion history` reads them back in order.

MLflow's registry keeps only where an alias points now; a team asking "who made version 7 the
champion, when, and what did it beat?" needs the moves themselves. A run per decision is
durable in any tracking store (SQLite, PostgreSQL, a server), carries who and when, and is
written under the registry lock with the decision, so entries are numbered in the order the
aliases moved.
"""

from __future__ import annotations

import getpass
import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime

from mlflow.entities import Run, RunStatus
from mlflow.tracking import MlflowClient

PREFIX = "landcover.history."
FIELDS = (
    "seq", "action", "alias", "model", "from_version", "to_version", "metric", "from_value",
    "to_value", "reason", "decision", "moved", "who",
)  # fmt: skip


def experiment_name(model: str) -> str:
    """Where a registered model's history lives."""
    return f"registry/{model}"


def current_user() -> str:
    """Who decided: the tracking server's user when signed in, else the account's name."""
    for variable in ("MLFLOW_TRACKING_USERNAME", "LANDCOVER_USER"):
        if os.environ.get(variable):
            return os.environ[variable]
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        return f"uid {os.getuid()}"


@dataclass(frozen=True)
class Entry:
    """One decision about an alias."""

    seq: int
    when: datetime
    who: str
    action: str  # promoted | forced | refused | kept | restored
    alias: str
    model: str
    from_version: str | None  # the alias's version before
    to_version: str | None  # the version proposed (and, when moved, its new holder)
    metric: str
    from_value: float | None
    to_value: float | None
    reason: str  # the reason the person gave ("" when none)
    decision: str  # what landcover decided and why
    moved: bool

    def line(self) -> str:
        """One line for a terminal."""

        def value(number: float | None) -> str:
            return "-" if number is None else f"{number:.4f}"

        versions = f"v{self.from_version or '-'} -> v{self.to_version or '-'}"
        said = f' "{self.reason}"' if self.reason else ""
        return (
            f"{self.seq:>3}  {self.when:%Y-%m-%d %H:%M:%S}Z  {self.who:<12} {self.action:<9}"
            f"{self.alias} {versions}  {self.metric} {value(self.from_value)} -> "
            f"{value(self.to_value)}  {self.decision}{said}"
        )


def _number(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(value)


def record(
    client: MlflowClient,
    *,
    action: str,
    alias: str,
    model: str,
    from_version: str | None,
    to_version: str | None,
    metric: str,
    from_value: float | None,
    to_value: float | None,
    reason: str,
    decision: str,
    moved: bool,
) -> Entry:
    """Append one decision (the caller holds the registry lock: numbers follow the moves)."""
    name = experiment_name(model)
    found = client.get_experiment_by_name(name)
    experiment_id = found.experiment_id if found else client.create_experiment(name)
    seq = len(entries(client, model)) + 1
    who = current_user()
    values = {
        "seq": str(seq), "action": action, "alias": alias, "model": model,
        "from_version": from_version or "", "to_version": to_version or "", "metric": metric,
        "from_value": _number(from_value), "to_value": _number(to_value),
        "reason": reason[:4000], "decision": decision[:4000], "moved": str(moved).lower(),
        "who": who,
    }  # fmt: skip
    tags = {PREFIX + key: value for key, value in values.items()}
    tags["mlflow.user"] = who
    tags["mlflow.note.content"] = f"{action}: {decision}" + (f" ({reason})" if reason else "")
    run = client.create_run(
        experiment_id, tags=tags, run_name=f"{seq:04d} {alias} {action} v{to_version or '-'}"
    )
    client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FINISHED))
    return _entry(tags, run.info.start_time)


def _entry(tags: dict[str, str], start_ms: int) -> Entry:
    get = {key: tags.get(PREFIX + key, "") for key in FIELDS}

    def number(text: str) -> float | None:
        return float(text) if text else None

    return Entry(
        seq=int(get["seq"] or 0),
        when=datetime.fromtimestamp(start_ms / 1000, UTC),
        who=get["who"],
        action=get["action"],
        alias=get["alias"],
        model=get["model"],
        from_version=get["from_version"] or None,
        to_version=get["to_version"] or None,
        metric=get["metric"],
        from_value=number(get["from_value"]),
        to_value=number(get["to_value"]),
        reason=get["reason"],
        decision=get["decision"],
        moved=get["moved"] == "true",
    )


def entries(client: MlflowClient, model: str) -> list[Entry]:
    """Every decision recorded for `model`, oldest first."""
    found = client.get_experiment_by_name(experiment_name(model))
    if found is None:
        return []
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([found.experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    found_entries = [_entry(run.data.tags, run.info.start_time) for run in runs]
    return sorted(found_entries, key=lambda entry: entry.seq)
