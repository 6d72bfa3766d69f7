"""Hyperparameter search: spaces over job specs, and a driver that runs trials as jobs
(`corral.tune` runs one)."""
