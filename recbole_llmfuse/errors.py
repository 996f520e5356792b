"""Every error this package raises on bad input, in one module at the bottom of the import graph.

Each is a :class:`LLMFuseError` (the command line prints it as one line, exit 2) and also the built-in
exception a caller would expect (``ValueError``, ``FileNotFoundError``), so ``except ValueError`` keeps
working. The modules where users met them re-export them (``recbole_llmfuse.config.ConfigError`` ...).
"""
from __future__ import annotations


class LLMFuseError(Exception):
    """Base class: bad input whose message names the file, line or setting and the fix."""


class ConfigError(LLMFuseError, ValueError):
    """A bad configuration value or command-line override."""


class AtomicFileError(ConfigError):
    """A malformed atomic file; the message names the file, the line, the field and the fix."""


class ItemTextError(ConfigError):
    """An ``.item`` file or text setting that cannot give item texts; the message names the file and the fix."""


class PrepError(ConfigError):
    """A hook that cannot run or whose output cannot be used as asked; the message says what to do."""


class PrepRequiredError(PrepError):
    """An expensive hook (``auto_run: false``) must be run by hand first."""


class HookConflictError(PrepError):
    """An existing output was made with other settings than the run asks for."""


class DatasetNotFoundError(LLMFuseError, FileNotFoundError):
    """The dataset's atomic files are not where the config says."""


class ModelNotFoundError(LLMFuseError, ValueError):
    """A model name that no entry point and no RecBole module defines."""


class ModelPathError(LLMFuseError, ValueError):
    """A model name or path that cannot be loaded; the message says why and what to give instead."""


class CheckpointError(LLMFuseError, ValueError):
    """A checkpoint that does not fit the model; the message names the file and the keys."""


class ItemEmbeddingError(LLMFuseError, ValueError):
    """An item-embedding file that cannot be used as is; the message names the file and the fix."""


class SparsifyError(LLMFuseError, ValueError):
    """The source dataset or the options cannot give a sparse variant (the message says why and what to do)."""
