"""Error types. A ``UserError`` is shown to the user as one line, with a non-zero exit."""
from __future__ import annotations


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


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
