"""Commands that read what a trained channel holds and says: `probe`, `lens`, `lens-curve`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from diffmas.assets import DEFAULT_MODEL
from diffmas.cli import TRACE_OPTION, app, console, user_errors


# The options of the commands that read a trained channel (probe, lens).
CHANNEL_ADAPTER_OPTION = typer.Option(None, help="Trainer output dir (diffmas).")
CHANNEL_TASK_OPTION = typer.Option("relay:digits", help="A generated task (fresh items are drawn from it).")
CHANNEL_TOPOLOGY_OPTION = typer.Option(None, help="Default: the task's (relay) or the adapter's.")
CHANNEL_STEPS_OPTION = typer.Option(None, help="Default: the adapter's (diffmas) or 10.")


@app.command()
@user_errors
def probe(
    system: str = typer.Option("diffmas", help="A multi-agent system: diffmas | latent_mas."),
    adapter: Optional[str] = CHANNEL_ADAPTER_OPTION,
    task: str = CHANNEL_TASK_OPTION,
    topology: Optional[str] = CHANNEL_TOPOLOGY_OPTION,
    latent_steps: Optional[int] = CHANNEL_STEPS_OPTION,
    trace: str = typer.Option("latents", help="Must leave every row the same width: latents."),
    model: str = typer.Option(DEFAULT_MODEL, help="Embedded alias, local folder, or hub id."),
    n: int = typer.Option(1500, help="Items: two thirds fitted, one third scored."),
    layers: Optional[str] = typer.Option(None, help="Comma list of layers (default: every 4th and the last)."),
    seed: int = typer.Option(0, help="The item draw, the fit/score split and the shuffled control."),
    batch_size: int = typer.Option(25),
    out: Optional[Path] = typer.Option(None, help="Write the probes as JSON here."),
    device: str = typer.Option("auto"),
) -> None:
    """Linear probes: what of the answer the final agent's view of the channel holds (docs: diffmas.eval.probe)."""
    from diffmas.eval.probe import probe_channel, probe_table, save_probe

    chosen = [int(x) for x in layers.split(",")] if layers else None
    sys_, task_ = _channel_system(system, model, device, task, topology=topology, latent_steps=latent_steps,
                                  adapter=adapter, trace=trace)
    started = time.time()
    probes = probe_channel(sys_, task_, n=n, layers=chosen, seed=seed, batch_size=batch_size)
    print("\n".join(probe_table(probes)), flush=True)
    if out is not None:
        save_probe(out, probes, _channel_settings(sys_, started, system=system, adapter=adapter, task=task,
                                                  trace=trace, model=model, n=n, seed=seed))
        console.print(f"probes: {out}")


def _channel_system(system: str, model: str, device: str, task: str, **settings):
    """The system whose channel ``probe`` or ``lens`` reads, and the task its items come from (a typo in either
    fails before a model loads)."""
    from diffmas.backbone import load_backbone
    from diffmas.systems import build_system, get_kind
    from diffmas.tasks import get_task

    get_kind(system)
    task_ = get_task(task)
    return build_system(system, load_backbone(model, device), default_topology=getattr(task_, "topology", None),
                        **settings), task_


def _channel_settings(channel, started: float, **given) -> dict:
    """What a probe or lens file records of the run: the options given, the channel's topology and m, the time."""
    return dict(given, topology=channel.spec.topology.name, latent_steps=channel.spec.latent_steps,
                seconds=round(time.time() - started))


@app.command()
@user_errors
def lens(
    system: str = typer.Option("diffmas", help="A multi-agent latent system: diffmas | latent_mas."),
    adapter: Optional[str] = CHANNEL_ADAPTER_OPTION,
    task: str = CHANNEL_TASK_OPTION,
    topology: Optional[str] = CHANNEL_TOPOLOGY_OPTION,
    latent_steps: Optional[int] = CHANNEL_STEPS_OPTION,
    trace: Optional[str] = TRACE_OPTION,
    model: str = typer.Option(DEFAULT_MODEL, help="Embedded alias, local folder, or hub id."),
    n: int = typer.Option(300, help="Items."),
    seed: int = typer.Option(0, help="The item draw."),
    batch_size: int = typer.Option(25),
    out: Optional[Path] = typer.Option(None, help="Write the lens as JSON here."),
    device: str = typer.Option("auto"),
) -> None:
    """Logit lens: what the state fed to each latent position says, read against the answer (diffmas.eval.lens)."""
    from diffmas.eval.lens import lens_channel, lens_table, save_lens

    sys_, task_ = _channel_system(system, model, device, task, topology=topology, latent_steps=latent_steps,
                                  adapter=adapter, trace=trace)
    started = time.time()
    lenses, answers = lens_channel(sys_, task_, n=n, seed=seed, batch_size=batch_size)
    print("\n".join(lens_table(lenses)), flush=True)
    if out is not None:
        save_lens(out, lenses, _channel_settings(sys_, started, system=system, adapter=adapter, task=task,
                                                 model=model, n=n, seed=seed), answers)
        console.print(f"lens: {out}")


@app.command("lens-curve")
@user_errors
def lens_curve(
    run: Path = typer.Argument(..., help="A training run's folder with checkpoints (the --out of `diffmas train`)."),
    out: Path = typer.Option(..., help="The curve's JSON (a plot goes beside it, .png); an existing one resumes."),
    task: str = CHANNEL_TASK_OPTION,
    every: int = typer.Option(1, help="Read every N-th checkpoint (and the last)."),
    steps: Optional[str] = typer.Option(None, help="Comma list of checkpoint steps instead of --every."),
    n: int = typer.Option(150, help="Items, the same at every step."),
    seed: int = typer.Option(0, help="The item draw."),
    places: str = typer.Option("1,2", help="The answer's characters (1-based) the plot draws."),
    batch_size: int = typer.Option(25),
    device: str = typer.Option("cpu"),
) -> None:
    """Logit lens over training: what a run's latent inputs said at each checkpoint, beside its held-out loss."""
    from diffmas.eval.lens_curve import chosen_steps, lens_curve as read_curve, plot_lens_curve
    from diffmas.tasks import get_task

    task_ = get_task(task)
    chosen = chosen_steps(run, every, [int(s) for s in steps.split(",")] if steps else None)
    curve = read_curve(run, task_, out, chosen, n=n, seed=seed, batch_size=batch_size, device=device)
    for point in curve["points"]:
        first = point["positions"][0] if point["positions"] else None
        if first:
            console.print(f"step {point['step']}: held-out {point['heldout_loss']}, position 1 says "
                          f"{first['places'].get('1', 0):.2f} / names {first['read'].get('1', 0):.2f} "
                          f"(floor {first['read_constant'].get('1', 0):.2f}); top {first['top_tokens'][:3]}")
    plot = plot_lens_curve(curve, out.with_suffix(".png"), tuple(places.split(",")))
    console.print(f"lens curve: {out}, plot: {plot}")
