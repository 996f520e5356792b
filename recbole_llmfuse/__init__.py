"""recbole_llmfuse: a RecBole plugin for fusing LLM knowledge into sequential recommendation.

Importing the package applies the compatibility shims in :mod:`recbole_llmfuse.compat` (numpy 2,
torch >= 2.6 checkpoints, pandas 3) before anything else touches RecBole.
"""
from recbole_llmfuse import compat as _compat

_compat.apply()

from recbole_llmfuse.config import Config, ConfigError  # noqa: E402
from recbole_llmfuse.data import DatasetNotFoundError, create_dataset, data_preparation  # noqa: E402
from recbole_llmfuse.errors import LLMFuseError  # noqa: E402
from recbole_llmfuse.quick_start import (  # noqa: E402
    load_data_and_model,
    objective_function,
    run,
    run_recbole,
    run_recboles,
)
from recbole_llmfuse.registry import ModelNotFoundError, available_models, get_model  # noqa: E402
from recbole_llmfuse.trainer import get_trainer  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "LLMFuseError",
    "DatasetNotFoundError",
    "ModelNotFoundError",
    "available_models",
    "create_dataset",
    "data_preparation",
    "get_model",
    "get_trainer",
    "load_data_and_model",
    "objective_function",
    "run",
    "run_recbole",
    "run_recboles",
]
