"""Ablation grids: plan (grid.py, plan.py), execute (run.py, cluster.py), read the runs (results.py), and report
(report.py over tables.py, plots.py and findings.py; findings.py judges the ``expect:`` grammar of expect.py with
the contrasts of contrast.py: statistics of stats.py on runs, or their answers, paired by pairing.py)."""
