"""K/V storage as levels (storage.py), the prefix cache over it (prefix_cache.py), and the step plan
that tells the attention backends what to read (plan.py)."""

from .storage import CacheShape  # noqa: F401
