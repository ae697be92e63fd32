"""Clamping experiments: hold chosen neurons at set values in the live model and measure the effect.

config.py (what to run), inputs.py (prompts, candidates, target ids), experiment.py (the two modes),
measure.py (the statistics), results.py (Parquet rows, summary), plot.py (PNG), job.py (end to end),
command.py (`atlas clamp`).
"""
