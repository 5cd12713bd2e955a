"""Training: a config in, a fitted model and its MLflow run out.

`train` is the job (`landcover-train`, `torchrun -m landcover.training.train`); `loop` the fit
loop with early stopping; `optim` losses, optimisers and schedules from `_target_` configs;
`best_epoch` what the run records about its best epoch; `distributed` the torchrun process
group and data-parallel wrapping.
"""
