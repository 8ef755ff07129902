"""Sweeps: many trials of a run config under one total budget, on Optuna (sampler, pruners, storages)."""
