"""The shared KV trace (:mod:`diffmas.kv.trace`), its cache layers (:mod:`diffmas.kv.cache`) and diffmas' attention
functions (:mod:`diffmas.kv.attention`): the only package that touches transformers' Cache API, so a transformers
upgrade has one place to check.

The package's interface is what this module exports. ``cache`` and ``attention`` are its internals: their public
names are for :mod:`diffmas.kv.trace` (and the tests of the engine), not for the rest of diffmas.
"""

from diffmas.kv.attention import joined_attention
from diffmas.kv.trace import Trace, TraceBuilder, TraceTooLong

__all__ = ["Trace", "TraceBuilder", "TraceTooLong", "joined_attention"]
