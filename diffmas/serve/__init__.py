"""An OpenAI-compatible HTTP server for DiffMAS systems, with request batching (``pip install 'diffmas[serve]'``).

    diffmas serve --systems single,latent_mas,diffmas:runs/dm          # http://127.0.0.1:8000/v1

Modules: :mod:`~diffmas.serve.protocol` (the wire format: requests checked, errors, responses, stream chunks),
:mod:`~diffmas.serve.engine` (served systems, their per-request settings, one batch through the rollout and its
streamed answers), :mod:`~diffmas.serve.batcher` (grouping concurrent requests, the worker thread, the bounded
queue), :mod:`~diffmas.serve.app` (the FastAPI application) and :mod:`~diffmas.serve.server` (loading systems by
name, uvicorn).
"""
