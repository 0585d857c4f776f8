"""Exception types shared across the node's rooms."""

from __future__ import annotations


class PETriageError(Exception):
    """Base class of the node's own errors."""


class ConfigError(PETriageError):
    """The configuration is invalid; the message names key, value and reason."""


class InputRejected(PETriageError):
    """Input the node refuses, with a reason a person can read (recorded as a rejection)."""


class SpoolFull(PETriageError):
    """Free space on the spool is below the configured floor."""


class VolumeRejected(InputRejected):
    """A series that cannot be turned into a CT volume (mixed orientation, tilt, too few slices...)."""


class WeightsError(PETriageError):
    """Model weights missing, corrupt (sha256 mismatch) or of the wrong architecture."""
