"""User-facing errors: one line that names the file and the fix.

Every failure caused by the user's input (a config, a weight folder, a shard, a photo) is raised
as an ``IcpError``; the CLI prints its message on one line and exits non-zero instead of showing a
traceback from deep inside a library.
"""


class IcpError(Exception):
    """An error whose message is complete on its own: what, where, and how to fix it."""


class ConfigError(IcpError):
    """A config file, key, value or override is wrong."""


class WeightsError(IcpError):
    """A weight file or model folder is missing, truncated or of the wrong kind."""


class DataError(IcpError):
    """A shard, manifest or image cannot be used."""
