"""The path YAML files name for the CSV logger (`_target_: kd_lightning.trainers.CSVLogger`); the code is in
kd_lightning.engine.trainers."""

from kd_lightning.engine.trainers import CSVLogger

__all__ = ["CSVLogger"]
