"""Ablation grids: plan (grid.py), execute (run.py), aggregate and report (report.py)."""
