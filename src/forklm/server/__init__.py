"""forklm's OpenAI-compatible HTTP server (`forklm serve`).

protocol.py: the pydantic request types and their one conversion into SamplingParams;
runner.py: the engine loop thread (requests join and leave the batch between steps);
handlers.py / format.py: completions and chat, JSON and server-sent events;
app.py: routes, API key, limits; errors.py: OpenAI's error bodies; metrics.py: Prometheus text.
"""

from .app import build_app
from .handlers import ServerContext
from .metrics import Metrics
from .runner import EngineRunner

__all__ = ["EngineRunner", "Metrics", "ServerContext", "build_app"]
