"""Shared machinery of SAU-Bench: config, datasets, models, poisoning, training loops,
metrics, records and runtime. Nothing here imports ``attack`` or ``defense``."""
