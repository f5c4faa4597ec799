"""`diffmas serve`: the OpenAI API over DiffMAS systems (the serve extra)."""

from __future__ import annotations

from typing import Optional

import typer

from diffmas.assets import DEFAULT_MODEL
from diffmas.cli import REALIGN_OPTION, THINK_OPTION, TRACE_OPTION, app, console, user_errors
from diffmas.errors import DiffMASError


@app.command()
@user_errors
def serve(
    systems: str = typer.Option("latent_mas", help="Model ids to serve, as for eval: e.g. "
                                "single,latent_mas,diffmas:ADAPTER_DIR (LABEL=name:DIR sets the id)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Embedded alias, local folder, or hub id."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; another than 127.0.0.1 exposes the server."),
    port: int = typer.Option(8000),
    api_key: Optional[str] = typer.Option(None, envvar="DIFFMAS_API_KEY", show_envvar=True,
                                          help="Require 'Authorization: Bearer KEY' (all endpoints but /health)."),
    max_batch: int = typer.Option(8, help="Requests answered by one rollout."),
    batch_window_ms: float = typer.Option(20.0, help="How long a request waits for others to join its batch."),
    max_queue: int = typer.Option(64, help="Waiting requests; more are answered 503 with Retry-After."),
    max_tokens_limit: int = typer.Option(1024, help="Largest max_tokens a request may ask for."),
    max_question_tokens: int = typer.Option(2048, help="Longest question, in tokens."),
    max_latent_steps: int = typer.Option(64, help="Largest latent_steps a request may ask for."),
    max_request_bytes: int = typer.Option(1_000_000, help="Largest request body."),
    max_messages: int = typer.Option(32, help="Most messages a chat request may hold."),
    max_prompts: int = typer.Option(8, help="Most questions one /v1/completions request may hold."),
    topology: Optional[str] = typer.Option(None, help="Default topology of the training-free multi-agent systems "
                                                      "(sequential, or a YAML file); trained ones keep theirs."),
    latent_steps: Optional[int] = typer.Option(None, help="Default latent steps of the training-free systems "
                                                          "(default 10); trained ones keep theirs."),
    writer_max_new_tokens: int = typer.Option(128, help="Token budget of each text_mas writer."),
    realign: bool = REALIGN_OPTION,
    think: bool = THINK_OPTION,
    trace: str = TRACE_OPTION,
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("float32"),
    log_level: str = typer.Option("info", help="uvicorn's log level."),
) -> None:
    """Serve systems over the OpenAI API (chat completions, completions, models), batching concurrent requests."""
    try:
        from diffmas.serve.app import ServeConfig, create_app
        from diffmas.serve.protocol import Limits
        from diffmas.serve.server import load_systems, run_server
    except ImportError as exc:
        raise DiffMASError(f"diffmas serve needs the serve extra (pip install 'diffmas[serve]'): {exc}") from None

    try:
        limits = Limits(max_request_bytes=max_request_bytes, max_messages=max_messages, max_prompts=max_prompts,
                        max_tokens=max_tokens_limit, default_max_tokens=min(256, max_tokens_limit),
                        max_question_tokens=max_question_tokens, max_latent_steps=max_latent_steps)
    except ValueError as exc:
        raise DiffMASError(str(exc)) from None
    config = ServeConfig(max_batch, batch_window_ms, max_queue, api_key, limits)
    served = load_systems([s for s in systems.split(",") if s.strip()], model=model, device=device, dtype=dtype,
                          topology=topology, latent_steps=latent_steps, writer_max_new_tokens=writer_max_new_tokens,
                          realign=realign, think=think, trace=trace)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        console.print(f"warning: serving on {host} without --api-key: anyone who reaches port {port} can use it")
    console.print(f"serving {', '.join(served)} at http://{host}:{port}/v1")
    run_server(create_app(served, config), host, port, log_level)
