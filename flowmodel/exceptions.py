"""Named errors, all rooted at :class:`FlowModelError`.

Every message says what is wrong (file, field, unit ids) and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "BackendNotAvailableError",
    "CDRInputError",
    "CensusInputError",
    "ConfigError",
    "CorruptFileError",
    "DataContractError",
    "DataScaleWarning",
    "DiagnosticsWarning",
    "FitFailedError",
    "FlowModelError",
    "InputFileError",
    "MissingCRSError",
    "ModelConfigError",
    "ModelLoadError",
    "NoOverlapError",
    "PriorWarning",
    "PrivacyError",
    "RunDirectoryError",
    "UninformedParameterWarning",
    "UnitCodeError",
]


class FlowModelError(Exception):
    """Base class of every error raised by flowmodel."""


class DataContractError(FlowModelError, ValueError):
    """A FlowDataset (or a table that builds one) breaks the data contract."""


class InputFileError(FlowModelError, ValueError):
    """An input file is missing, unreadable, empty or lacks a required field."""


class MissingCRSError(InputFileError):
    """A vector or raster input has no coordinate reference system."""


class NoOverlapError(InputFileError):
    """A raster does not overlap the units (or a unit lies outside every raster)."""


class CorruptFileError(InputFileError):
    """A file cannot be read back: truncated or corrupt (a copy cut short, a full disk).

    Messages name the file and the fix (write it again, e.g. rerun the stage
    that made it).
    """


class CensusInputError(InputFileError):
    """A census table (OD table or person records) holds values that cannot be used."""


class CDRInputError(InputFileError):
    """A CDR input (events, towers or an aggregated OD table) cannot be used.

    Messages name fields, counts and row numbers, never subscriber ids.
    """


class UnitCodeError(DataContractError):
    """Unit codes in a table do not match the unit ids of the FlowDataset."""


class PrivacyError(FlowModelError):
    """An operation would expose subscriber-level or small-cell CDR data."""


class ModelConfigError(FlowModelError, ValueError):
    """A model was configured with options that cannot work with the data."""


class ModelLoadError(FlowModelError):
    """A saved model cannot be loaded into this class or package version."""


class BackendNotAvailableError(FlowModelError, ImportError):
    """An inference backend was requested whose package is not installed."""


class ConfigError(FlowModelError, ValueError):
    """A run configuration file is invalid."""


class RunDirectoryError(ConfigError):
    """The run directory cannot be used: an output would overwrite an input or a foreign file."""


class FitFailedError(FlowModelError, RuntimeError):
    """A fit did not produce a usable posterior (non-finite draws, no proper mode).

    Raised instead of a warning, so that prediction never runs on NaN or absurd
    parameters; the pipeline exits with code 1.
    """


class DiagnosticsWarning(UserWarning):
    """MCMC diagnostics look bad (divergences, R-hat > 1.01, low effective sample size)."""


class DataScaleWarning(UserWarning):
    """Two inputs disagree about scale: e.g. more moves out of a unit than people in it.

    Usually a raster whose values are not persons per cell (a density, or a mean
    per sub-cell: give its ``scale``) or a flow table in other units.
    """


class PriorWarning(UserWarning):
    """A prior override names no parameter of the model (it is ignored)."""


class UninformedParameterWarning(DiagnosticsWarning):
    """A parameter is not informed by the data: its posterior is (nearly) its prior.

    Its intervals, and those of every prediction that depends on it, are the
    prior's; the message names the parameter and its prior.
    """
