"""Load the systems ``diffmas serve --systems`` names and serve them with uvicorn.

    diffmas serve --systems single,latent_mas,diffmas:runs/dm --port 8000
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import uvicorn
from fastapi import FastAPI

from diffmas.assets import DEFAULT_MODEL
from diffmas.backbone import Backbone, load_backbone
from diffmas.errors import DiffMASError
from diffmas.eval.entries import parse_systems
from diffmas.serve.batcher import Batcher
from diffmas.systems import System, build_system, get_kind

__all__ = ["Server", "load_systems", "make_server", "run_server"]


def load_systems(systems: Sequence[str], *, model: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "float32",
                 topology: str | None = None, latent_steps: int | None = None, writer_max_new_tokens: int = 128,
                 realign: bool = True, think: bool = False, trace: str = "keep") -> dict[str, System]:
    """Model id -> system for ``--systems`` entries (``name``, ``name:ADAPTER_DIR``, ``LABEL=name:ADAPTER_DIR``,
    as ``diffmas eval`` takes them; the label is the model id).

    The training-free systems share one backbone and take ``topology`` and ``latent_steps`` as their defaults; a
    trained system gets a backbone of its own (peft injects LoRA layers into the model in place, so its adapter
    would otherwise leak into the others) and always runs with the topology, latent steps, realignment and
    thinking switch it was trained with."""
    entries = parse_systems(list(systems))
    budgeted = [e.label for e in entries if e.budget]
    if budgeted:
        raise DiffMASError(f"{', '.join(budgeted)}: the full-budget baseline is an evaluation setting; serve the "
                           "single agent and set max_tokens per request")
    shared: Backbone | None = None
    served: dict[str, System] = {}
    for entry in entries:
        if get_kind(entry.name).trained:
            served[entry.label] = build_system(entry.name, load_backbone(model, device, dtype), adapter=entry.adapter,
                                               writer_max_new_tokens=writer_max_new_tokens, trace=trace)
        else:
            shared = shared or load_backbone(model, device, dtype)
            served[entry.label] = build_system(entry.name, shared, topology=topology, latent_steps=latent_steps,
                                               writer_max_new_tokens=writer_max_new_tokens, realign=realign,
                                               think=think, trace=trace)
    return served


class Server(uvicorn.Server):
    """uvicorn's server, whose shutdown first answers the requests still waiting in the queue (503, Retry-After):
    uvicorn then waits only for the batch that is running, whose requests get their answers."""

    def __init__(self, config: uvicorn.Config, batcher: Batcher) -> None:
        super().__init__(config)
        self.batcher = batcher

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self.batcher.stop()
        await super().shutdown(sockets)


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> Server:
    """A :class:`Server` for an app made by :func:`diffmas.serve.app.create_app`."""
    return Server(uvicorn.Config(app, host=host, port=port, log_level=log_level), app.state.batcher)


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` until interrupted (Ctrl-C or SIGTERM: queued requests get 503, the running batch finishes)."""
    make_server(app, host, port, log_level).run()
