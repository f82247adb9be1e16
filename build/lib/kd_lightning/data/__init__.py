"""Datamodules: every batch is (x, y, sample index)."""

from kd_lightning.data.base import IndexedTensorDataset, TensorDataModule
from kd_lightning.data.sources import DigitsDataModule, MNIST1DDataModule, SyntheticDataModule
from kd_lightning.data.vision import CIFARDataModule, ImageFolderDataModule, MNISTDataModule

__all__ = [
    "CIFARDataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "IndexedTensorDataset",
    "MNIST1DDataModule",
    "MNISTDataModule",
    "SyntheticDataModule",
    "TensorDataModule",
]
