"""Errors raised by latentguard. Every message names the value and the fix."""

__all__ = [
    "ArtifactError",
    "ConfigError",
    "DataError",
    "LatentGuardError",
    "ModelNotFoundError",
    "OutputExistsError",
    "UnsupportedModelError",
]


class LatentGuardError(Exception):
    """Base class: the CLI prints these on one line and exits 2."""


class ConfigError(LatentGuardError, ValueError):
    """A setting is out of range or inconsistent."""


class ArtifactError(LatentGuardError, ValueError):
    """An artefact is missing, malformed, or belongs to another model."""


class UnsupportedModelError(LatentGuardError, ValueError):
    """The architecture lacks a module the requested site needs."""


class ModelNotFoundError(LatentGuardError, FileNotFoundError):
    """A model spec points nowhere reachable."""


class DataError(LatentGuardError, ValueError):
    """A data file is missing, malformed, empty, or lacks a column."""


class OutputExistsError(LatentGuardError, FileExistsError):
    """The output directory exists and --overwrite was not given."""
