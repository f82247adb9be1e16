"""The path YAML files name for the warm-up schedule (`_target_: kd_lightning.optim.warmup_cosine`); the code
is in kd_lightning.config.optim."""

from kd_lightning.config.optim import warmup_cosine

__all__ = ["warmup_cosine"]
