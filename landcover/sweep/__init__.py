"""Optuna sweeps driven by Hydra multirun: search spaces, trial context, study storage."""
