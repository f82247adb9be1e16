"""results.json: the run's labels (kd_lightning.config.request.run_labels) and numbers, written atomically
(temp file + rename), so a crash never leaves half a file."""

from __future__ import annotations

from kd_lightning.files import read_results, write_json_atomic  # noqa: F401  (results.json's I/O)
