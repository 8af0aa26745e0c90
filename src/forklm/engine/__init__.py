"""The engine: scheduler (queues, admission, step plans), model runner, output processing."""

from .engine import Engine, check_context  # noqa: F401
