"""The commands: kd-train (train), kd-cache (cache), kd-eval (eval), kd-report (report)."""
