"""The shared KV trace (:mod:`diffmas.kv.trace`), its cache layers (:mod:`diffmas.kv.cache`) and diffmas' attention
functions (:mod:`diffmas.kv.attention`): the only package that touches transformers' Cache API, so a transformers
upgrade has one place to check."""

from diffmas.kv.attention import joined_attention
from diffmas.kv.trace import Trace, TraceBuilder, TraceTooLong
from diffmas.positions import left_pad, segment_positions

__all__ = ["Trace", "TraceBuilder", "TraceTooLong", "joined_attention", "left_pad", "segment_positions"]
