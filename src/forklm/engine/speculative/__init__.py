"""Speculative decoding: drafts proposed per sample row (prompt lookup or a draft model), verified by
the target in one multi-token step, and a switch that turns it off where it does not pay."""

from .config import SpeculativeConfig  # noqa: F401
from .draft_model import DraftModelProposer  # noqa: F401
from .ngram import NgramProposer, lookup_draft  # noqa: F401
from .switch import AdaptiveSwitch, RequestSpecState  # noqa: F401
