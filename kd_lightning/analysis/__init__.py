"""Analysis of finished runs: `stats` (tables, intervals, verdicts) for kd-report, the notebook and bench/."""
