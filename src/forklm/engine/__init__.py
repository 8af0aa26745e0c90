"""The engine: scheduler (queues, admission, step plans), model runner, output processing."""

from .engine import Engine  # noqa: F401
