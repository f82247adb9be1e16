"""kd_lightning's packed launcher for Hydra (hydra/launcher=packed): kd_lightning.runners.packed."""
