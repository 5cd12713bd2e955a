"""Records: what every run leaves in MLflow, and who may read or write them.

`runs` (the training run's `Tracker`, run helpers every command shares, the logged model),
`datasets` (what a run read, as MLflow datasets), `descriptions` (the run page's text),
`system_metrics`, `figures` (pictures logged to runs) and `team` (members' permissions on an
authenticated server, `landcover-team`).
"""
