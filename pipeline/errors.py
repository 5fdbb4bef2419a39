"""Exception types shared by the pipeline.

Catch ``RaykdError`` to handle every error the pipeline raises on purpose. The two
subclasses are also ``ValueError`` so callers that only know the standard library still work.
"""


class RaykdError(Exception):
    """Base class for errors raised on purpose by raykd."""


class ConfigError(RaykdError, ValueError):
    """A configuration value (task, key, option) is wrong; the message says how to fix it."""


class DataError(RaykdError, ValueError):
    """An input file or record is missing or malformed; the message names file and line."""
