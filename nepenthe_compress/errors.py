"""Error types. A ``UserError`` is shown to the user as one line, with a non-zero exit."""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad path, corrupt checkpoint, wrong architecture, ...)."""


class CheckpointError(UserError):
    """The checkpoint cannot be loaded or does not fit the architecture."""


class DataError(UserError):
    """The calibration / evaluation data cannot be loaded or is unusable."""


class TraceError(UserError):
    """The model cannot be traced with torch.fx."""


class FoldError(UserError):
    """The fold pass cannot proceed (unsupported layer, failed equivalence, ...)."""


class ExportError(UserError):
    """The model cannot be exported (capture or ONNX translation failed, or the result is wrong)."""
