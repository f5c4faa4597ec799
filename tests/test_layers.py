"""The house: every module of diffmas imports only from its own layer or the ones below, and never an underscore
name of another module (a name another module needs is part of an interface and gets a public name)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffmas"

# Bottom to top; a module may import from its own layer and any layer below. A package name covers its modules.
LAYERS = [
    ("errors", "positions", "memory", "kv", "sandbox", "sandbox_reap"),
    ("assets", "backbone", "prompts", "tasks"),
    ("config", "adapters", "latent", "decode"),
    ("agent_call", "forced", "rollout", "rollout_spec"),
    ("systems", "train"),
    ("eval",),
    ("experiments", "demo", "lmeval", "lmeval_tasks", "serve"),
    ("cli",),
]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}


def _unit(module: str) -> str:
    """``diffmas.kv.trace`` -> ``kv``: the layer entry a module belongs to."""
    return module.split(".")[1]


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every diffmas import in ``path``, wherever it appears."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against this module's package
                parts = module.split(".")[: -node.level]
                base = ".".join(parts + ([base] if base else []))
            if base == "diffmas" or base.startswith("diffmas."):
                found.append((base, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("diffmas.")]
    return found


def violations() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if module in ("diffmas", "diffmas.__init__") or module.endswith(".__init__") and module.count(".") == 1:
            continue
        unit = _unit(module)
        for target, names, line in _imports(path):
            if target == "diffmas":  # `from diffmas import x`: x is the unit
                targets = [(f"diffmas.{n}", []) for n in names]
            else:
                targets = [(target, names)]
            for imported, imported_names in targets:
                other = _unit(imported)
                if other not in LEVEL or unit not in LEVEL:
                    out.append(f"{module}:{line}: {imported} or {module} is in no layer (add it to LAYERS)")
                elif LEVEL[other] > LEVEL[unit]:
                    out.append(f"{module}:{line}: imports {imported} from a higher layer")
                private = [n for n in imported_names if n.startswith("_") and not n.startswith("__")]
                if private and imported != module:
                    out.append(f"{module}:{line}: imports private name(s) {private} from {imported}")
    return out


def test_every_module_imports_only_downward_and_no_private_names():
    assert violations() == []


def test_the_layer_check_sees_an_upward_import(tmp_path, monkeypatch):
    # The check is not vacuous: a bottom-layer module that imports the evaluation package is reported.
    fake = PACKAGE / "positions.py"
    text = fake.read_text()
    tree = _imports(fake)
    assert all(_unit(t) in LEVEL for t, _, _ in tree)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: text + "\nfrom diffmas.eval.runner import _shard\n"
                        if self == fake else Path.read_bytes(self).decode())
    found = [v for v in violations() if v.startswith("diffmas.positions")]
    assert any("higher layer" in v for v in found) and any("private name" in v for v in found)


def test_configs_load_without_model_code():
    import subprocess
    import sys

    code = "import sys, diffmas.config; print(sorted({'torch', 'peft', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
