"""Typed errors raised by forklm. Every error names what was wrong."""


class ForklmError(Exception):
    """Base class of every error forklm raises on purpose."""


class InvalidParameterError(ForklmError, ValueError):
    """A user-supplied value is out of range or of the wrong type. `field` names it."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class UnsupportedModelError(ForklmError):
    """The checkpoint's architecture is not one forklm implements."""


class CheckpointError(ForklmError):
    """A checkpoint file is missing, truncated, corrupt, or does not match the config."""


class ModelNotAvailableError(ForklmError):
    """A hub id was given but the model is not available locally and cannot be downloaded."""


class TokenizerError(ForklmError):
    """Text was given (or asked for) but the model has no tokenizer."""


class ContextLengthError(InvalidParameterError):
    """The prompt plus max_tokens does not fit the model's context or the cache."""


class CapacityError(ForklmError):
    """The request does not fit in the memory available for the KV cache."""

    def __init__(self, message: str, max_n: int | None = None):
        self.max_n = max_n
        super().__init__(message)


class BusyError(ForklmError):
    """The LLM is still running another call (a stream that was neither finished nor closed)."""


class ServeError(ForklmError):
    """The HTTP server could not start (an address in use, a port refused)."""
