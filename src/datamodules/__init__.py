"""Data modules: loading, chat templates and label masks, collation."""

from src.datamodules.base import BaseDataModule
from src.datamodules.records import DataError
from src.datamodules.sft import SFTDataModule

__all__ = ["BaseDataModule", "DataError", "SFTDataModule"]
