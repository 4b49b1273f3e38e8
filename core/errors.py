"""Exceptions with messages a user can act on. Callers branch on the type, never on the text."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name), for one-line error messages."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class FibreFlowError(Exception):
    """Base class: the CLI prints the message and exits non-zero without a traceback."""


class ConfigError(FibreFlowError):
    """A config file or override is missing, unknown or ill-typed; the message names the key."""


class DatabaseUnreachable(FibreFlowError):
    """The database could not be reached."""


class SchemaMissing(FibreFlowError):
    """Tables are missing: the database was never migrated."""


class SchemaBehind(FibreFlowError):
    """The database was migrated by an older release."""


class PgvectorMissing(FibreFlowError):
    """The server has no pgvector extension."""


class EmbeddingSpaceMismatch(FibreFlowError):
    """Vectors from another model or dimension would be mixed into an index."""


class LockBusy(FibreFlowError):
    """Another process holds the lock for this work (a promotion, a regression run)."""


class DatasetBuildError(FibreFlowError):
    """A dataset could not be built (empty source, lost connection, ...); nothing was written."""
