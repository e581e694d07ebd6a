"""User-facing errors. The CLI prints these without a traceback; anything else is a bug."""


class PeftflowError(Exception):
    """A problem the user can fix (bad input, missing file, wrong setting). The message says how."""


class ConfigError(PeftflowError):
    """params.yaml is missing, not valid YAML, or has a bad key or value."""


class DataError(PeftflowError):
    """The data set is missing, empty, or has bad columns, labels or bytes."""


class ModelError(PeftflowError):
    """The base model or an adapter cannot be resolved, verified or loaded safely."""


class TrainingError(PeftflowError):
    """Training cannot go on (e.g. a non-finite loss)."""
