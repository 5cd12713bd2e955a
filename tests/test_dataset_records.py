"""Datasets logged by parallel runs: two sweep trials that log the same dataset at the same
moment both miss it in MLflow's look-up and both insert it; the second used to fail its trial
on the store's unique key (seen in CI: `UNIQUE constraint failed: datasets.experiment_id...`)."""

from __future__ import annotations

import mlflow
import pytest
import sqlalchemy
from mlflow.entities import DatasetInput
from mlflow.tracking import MlflowClient
from sqlalchemy import event

from landcover.tracking.datasets import ProfiledDataset, log_datasets, source_of


@pytest.fixture
def dataset(tmp_path) -> ProfiledDataset:
    return ProfiledDataset(source_of(str(tmp_path)), "train", "0123abcd", {"scenes": 1})


def test_a_dataset_another_run_inserts_between_lookup_and_insert_is_linked(
    tmp_path, dataset, monkeypatch
):
    """The other run's insert lands after this run's look-up, just before its own insert:
    the real store raises the unique-key error, and the run still gets its input."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.create_experiment("race")
    other = client.create_run(experiment).info.run_id
    raced = []

    def other_run_inserts_first(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO DATASETS") and not raced:
            raced.append(statement)
            client.log_inputs(other, datasets=[DatasetInput(dataset._to_mlflow_entity())])

    event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", other_run_inserts_first)
    try:
        with mlflow.start_run(experiment_id=experiment) as run:
            log_datasets({"train": dataset})
    finally:
        event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", other_run_inserts_first)
        mlflow.set_tracking_uri(None)

    assert raced, "the race was not staged: MLflow no longer inserts datasets this way"
    for run_id in (run.info.run_id, other):
        inputs = client.get_run(run_id).inputs.dataset_inputs
        assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("train", "0123abcd")]
