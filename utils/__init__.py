"""Training plumbing shared by every task: EMA, LR schedules, checkpoints, Hydra helpers."""
