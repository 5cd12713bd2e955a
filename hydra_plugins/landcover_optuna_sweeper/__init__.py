"""Hydra discovers plugins in the `hydra_plugins` namespace: this is where it finds our sweeper."""
