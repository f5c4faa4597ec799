"""DiffMAS: multi-agent LLM systems whose agents communicate through a trained KV-cache channel."""

__version__ = "0.1.0"
