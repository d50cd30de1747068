"""Exceptions the user sees.

Every error raised for bad input names the offending file, row or key and says
how to fix it; these classes only group them so the CLI can print them cleanly
(no traceback) and tests can match them.
"""


class DmeaError(Exception):
    """Base class for errors caused by user input or environment, not by a bug."""


class ConfigError(DmeaError, ValueError):
    """An invalid run configuration: unknown key, wrong type, out-of-range value."""


class DataError(DmeaError, ValueError):
    """Invalid task data: missing file, malformed row, empty split, unknown task."""


class TrainingDiverged(DmeaError):
    """A loss became NaN or infinite: training stops, the last good state is kept."""


class ClusterTooSmall(DmeaError, RuntimeError):
    """The Ray cluster cannot place what the run's roles reserve (ray.* sizes): the state is kept, resume later
    (a new run that could not start leaves no run directory: start it again)."""


class DataWarning(UserWarning):
    """Data accepted with a caveat the user should know (e.g. inputs truncated to fit the model)."""
