"""The error raised when data on disk does not match what the config says it should be."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset file, list or image that cannot be used as configured.

    The message is one paragraph that names the file (and line number where there is one), quotes
    what was found, says what was expected and, where it comes from a config key, names the key
    (``data.root``, ``data.train_list``, ...), so the fix is clear without reading the code.
    """
