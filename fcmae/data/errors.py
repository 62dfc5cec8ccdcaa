"""The one error type of the data package."""


class DataError(ValueError):
    """A data path that cannot be used (missing, empty, or without the expected layout)."""


class FatalDataError(DataError):
    """Raised while reading a sample, but about more than that sample (e.g. its shard is gone): not skipped."""
