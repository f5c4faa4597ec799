"""LoRA adapters over a backbone: one shared by every agent, or one per agent (peft multi-adapter).

peft's ``set_adapter`` freezes every inactive adapter, which in a per-agent, coupled run would silently stop
the writers' adapters from learning after the first switch; :func:`activate` restores the trainable set.
Adapters are saved in peft's own format plus a small ``diffmas_adapters.json`` that says which role uses
which adapter and which base model they were trained on, so loading into the wrong model fails clearly.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from diffmas.backbone import Backbone
from diffmas.config import LoraSettings
from diffmas.errors import DiffMASError

# peft 0.21 still calls a transformers method that 5.x deprecates; the warning is not actionable for users.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

META_FILE = "diffmas_adapters.json"
SHARED = "default"  # peft's name for the first adapter; keeps a shared adapter loadable by plain peft


def _model_signature(backbone: Backbone) -> dict:
    cfg = backbone.lm.config
    return {"model_type": cfg.model_type, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
            "vocab_size": cfg.vocab_size}


def attach_lora(backbone: Backbone, settings: LoraSettings, roles: list[str]) -> dict[str, str]:
    """Wrap the backbone's model with fresh LoRA adapter(s); returns role -> adapter name."""
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.targets), task_type="CAUSAL_LM")
    names = [SHARED] if settings.layout == "shared" else list(roles)
    was_training = backbone.lm.training
    model = get_peft_model(backbone.lm, config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    backbone.model = model.train(was_training)  # new dropout modules start in training mode: match the base
    _remember_trainable(backbone)
    set_trainable(backbone, True)  # peft adds every adapter but the first one frozen
    return {role: (SHARED if settings.layout == "shared" else role) for role in roles}


def _remember_trainable(backbone: Backbone) -> None:
    backbone.cache["lora_params"] = [p for n, p in backbone.model.named_parameters() if "lora_" in n]


def trainable_parameters(backbone: Backbone) -> list[torch.nn.Parameter]:
    """Every LoRA parameter of every adapter (the optimizer's parameter list)."""
    return list(backbone.cache.get("lora_params", []))


def set_trainable(backbone: Backbone, trainable: bool) -> None:
    for p in trainable_parameters(backbone):
        p.requires_grad_(trainable)


def activate(backbone: Backbone, adapter: str | None) -> None:
    """Make ``adapter`` the active one without freezing the others (see module docstring)."""
    if adapter is None or not isinstance(backbone.model, PeftModel) or backbone.model.active_adapter == adapter:
        return
    states = [p.requires_grad for p in trainable_parameters(backbone)]
    backbone.model.set_adapter(adapter)
    for p, state in zip(trainable_parameters(backbone), states):
        p.requires_grad_(state)


def save_adapters(backbone: Backbone, out: Path, roles: dict[str, str], settings: LoraSettings,
                  extra: dict | None = None, state_dict: dict | None = None) -> None:
    """Adapters in peft's format (``PeftModel.from_pretrained`` loads them) plus the role map.

    ``extra`` (system, topology, latent steps, ...) is stored too, so inference can default to the
    settings the adapters were trained with. ``state_dict``: the LoRA tensors to write instead of the
    model's own (full tensors gathered from FSDP2 shards).
    """
    if not isinstance(backbone.model, PeftModel):
        raise DiffMASError("no LoRA adapter attached: nothing to save")
    backbone.model.save_pretrained(str(out), state_dict=state_dict)
    # Hub-ready: adapter_config.json names the hub id (or what the user gave), not this machine's folder.
    base = hub_model_id(backbone.name)
    local = getattr(backbone.lm, "name_or_path", None)
    for name in set(roles.values()):
        _set_base_model(_adapter_path(Path(out), name) / "adapter_config.json", base)
    meta = {"roles": roles, "lora": asdict(settings), "base_model": backbone.name, "model": _model_signature(backbone),
            "base_model_hub_id": base, "base_model_path": str(local) if local else None, **(extra or {})}
    meta["rebuild"] = rebuild_instructions(meta, out)
    (Path(out) / META_FILE).write_text(json.dumps(meta, indent=2))
    (Path(out) / "README.md").write_text(model_card(meta, Path(out)))


#: Embedded aliases -> the hub model they were converted from (what a saved adapter names as its base).
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def hub_model_id(name: str) -> str:
    """The hub id of an embedded alias; any other name (hub id, local folder) as the user gave it."""
    return HUB_IDS.get(name, name)


def _set_base_model(config_path: Path, base: str) -> None:
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def rebuild_instructions(meta: dict, folder: str | Path) -> dict:
    """How to rebuild the system these adapters belong to: a Python snippet and a command line."""
    system, base = meta.get("system", "diffmas"), meta.get("base_model_hub_id") or meta.get("base_model")
    python = (
        "from diffmas.backbone import load_backbone\n"
        "from diffmas.decode import DecodeConfig\n"
        "from diffmas.systems import build_system\n\n"
        f"backbone = load_backbone({meta.get('base_model')!r})  # or the hub id {base!r}, or a local copy\n"
        f"system = build_system({system!r}, backbone, adapter={str(folder)!r})  # topology and latent steps "
        "come from diffmas_adapters.json\n"
        "print(system.run([\"What is 3 + 4?\"], DecodeConfig(max_new_tokens=64))[0][\"answer\"])\n"
    )
    cli = (f"diffmas run --system {system} --adapter {folder} --model {meta.get('base_model')} "
           "--question \"What is 3 + 4?\"")
    return {"python": python, "cli": cli}


def _read_metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def model_card(meta: dict, folder: Path) -> str:
    """README.md for the hub: YAML front matter, how to use, training config, data, held-out metrics."""
    import yaml

    system = meta.get("system", "diffmas")
    base = meta.get("base_model_hub_id") or meta.get("base_model")
    topology = meta.get("topology")
    topo_name = topology if isinstance(topology, str) else (topology or {}).get("name", "custom")
    front = {"base_model": base, "library_name": "peft",
             "tags": ["diffmas", "lora", "peft", "multi-agent", "latent-communication", system],
             "pipeline_tag": "text-generation"}
    config_path = folder / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
    data = (config or {}).get("data") or {"task": meta.get("task")}
    metrics = _read_metrics(folder)
    held = [(m["step"], m["heldout_loss"]) for m in metrics if "heldout_loss" in m]
    trained = [m for m in metrics if "loss" in m]
    rebuild = meta.get("rebuild") or rebuild_instructions(meta, folder)
    single = len(meta.get("roles", {})) == 1  # one agent: its adapter is an ordinary peft adapter
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# DiffMAS `{system}` LoRA adapters for {base}", "",
             f"LoRA adapter(s) trained with [DiffMAS](https://arxiv.org/abs/2604.21794) (system `{system}`, "
             f"topology `{topo_name}`, {meta.get('latent_steps')} latent steps per writer, gradient mode "
             f"`{meta.get('grad_mode')}`, method `{meta.get('method')}`). Role -> adapter: "
             + ", ".join(f"`{r}` -> `{a}`" for r, a in meta.get("roles", {}).items()) + ".", "",
             "## Rebuild the system", "", "```python", rebuild["python"].rstrip(), "```", "",
             "```bash", rebuild["cli"], "```", ""]
    if single:
        lines += ["The adapter also loads with plain peft (single agent, its chat turn as the prompt):", "",
                  "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
                  f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), "
                  f"{str(folder)!r})", "```", ""]
    else:
        lines += ["The multi-agent system needs diffmas (the agents share one KV trace); `diffmas_adapters.json` "
                  "holds the role map, topology and latent settings it is rebuilt from.", ""]
    lines += ["## Data", ""]
    lines += [f"- {k}: `{v}`" for k, v in data.items() if v is not None]
    lines += ["", "## Training", "",
              f"{meta.get('steps')} steps, seed {meta.get('seed')}; LoRA rank {meta.get('lora', {}).get('rank')}, "
              f"alpha {meta.get('lora', {}).get('alpha')}, layout `{meta.get('lora', {}).get('layout')}`."]
    if trained:
        lines.append(f"Training loss {trained[0]['loss']:.4f} (step {trained[0]['step']}) -> "
                     f"{trained[-1]['loss']:.4f} (step {trained[-1]['step']}).")
    if config is not None:
        lines += ["", "<details><summary>config.yaml</summary>", "", "```yaml",
                  yaml.safe_dump(config, sort_keys=False).strip(), "```", "", "</details>"]
    lines += ["", "## Held-out metrics", ""]
    if held:
        lines += ["Teacher-forced cross-entropy on held-out examples (target tokens), from `metrics.jsonl`:", "",
                  "| step | held-out loss |", "|---|---|", *(f"| {s} | {v:.4f} |" for s, v in held)]
    else:
        lines.append("No held-out metrics were recorded.")
    return "\n".join(lines) + "\n"


def _adapter_path(root: Path, name: str) -> Path:
    # peft writes the adapter named "default" at the root and every other one in a sub-folder of its name.
    return root if name == SHARED else root / name


def read_adapter_meta(folder: str | Path) -> dict:
    """The metadata written by :func:`save_adapters`, with a clear error when it is missing or corrupt."""
    meta_path = Path(folder) / META_FILE
    if not meta_path.is_file():
        raise DiffMASError(f"adapter folder {folder} not found or has no {META_FILE} (train one with `diffmas train`)")
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta.get("roles"), dict):
            raise KeyError("roles")
    except (json.JSONDecodeError, KeyError) as exc:
        raise DiffMASError(f"adapter metadata {meta_path} is corrupt: {exc}") from exc
    return meta


def load_adapters(backbone: Backbone, folder: str | Path, trainable: bool = False) -> dict[str, str]:
    """Load adapters saved by :func:`save_adapters`; returns role -> adapter name."""
    root = Path(folder)
    meta = read_adapter_meta(root)
    roles: dict[str, str] = meta["roles"]
    if meta.get("model") != _model_signature(backbone):
        raise DiffMASError(
            f"adapter in {root} was trained on '{meta.get('base_model')}' {meta.get('model')}, "
            f"not on '{backbone.name}' {_model_signature(backbone)}"
        )
    names = sorted(set(roles.values()))
    try:
        model = PeftModel.from_pretrained(backbone.lm, str(_adapter_path(root, names[0])), adapter_name=names[0],
                                          is_trainable=trainable)
        for name in names[1:]:
            model.load_adapter(str(_adapter_path(root, name)), adapter_name=name, is_trainable=trainable)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise DiffMASError(f"could not load adapters from {root}: {str(exc).splitlines()[0]}") from exc
    backbone.model = model.eval() if not trainable else model
    _remember_trainable(backbone)
    return roles
