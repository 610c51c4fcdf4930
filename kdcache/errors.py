"""User-facing errors.

Every error a user can cause derives from :class:`KDCacheError`; the CLI prints its message as one
line and exits non-zero. The message says what happened and how to fix it.
"""


class KDCacheError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""

    exit_code = 2


class ConfigError(KDCacheError):
    """A config file or override is invalid."""


class CacheFormatError(KDCacheError):
    """A path is not a kdcache cache, or one this version cannot read."""


class CacheMismatchError(KDCacheError):
    """A cache exists with different settings, or does not fit the student."""


class DataError(KDCacheError):
    """The input dataset cannot be used as configured."""


class OutOfSpaceError(KDCacheError):
    """The disk filled up (or a file size limit was hit) while writing."""


class CacheLockedError(KDCacheError):
    """Another process holds the cache's lock (``CACHE/.kdcache.lock``): one writer per cache."""


class Interrupted(KDCacheError):
    """Ctrl-C or SIGTERM stopped a command; the message says what was kept (or that nothing was)."""

    exit_code = 130
