"""Data modules: sources, formats, chat templates and label masks, packing, caching."""

from src.datamodules.base import BaseDataModule
from src.datamodules.filters import Filters
from src.datamodules.preference import PreferenceDataModule
from src.datamodules.pretrain import PretrainDataModule
from src.datamodules.prompts import PromptDataModule
from src.datamodules.records import DataError
from src.datamodules.sft import SFTDataModule
from src.datamodules.sources import Source
from src.datamodules.unpaired import UnpairedPreferenceDataModule

__all__ = [
    "BaseDataModule",
    "DataError",
    "Filters",
    "PreferenceDataModule",
    "PretrainDataModule",
    "PromptDataModule",
    "SFTDataModule",
    "Source",
    "UnpairedPreferenceDataModule",
]
