"""Hub-ready adapters: adapter_config.json names the hub base model, README.md is a model card, and the saved
folder loads with plain peft (single agent) or rebuilds the multi-agent system from the card's snippet."""

from __future__ import annotations

import json

import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from diffmas.adapters import META_FILE, LoraSettings, attach_lora, read_adapter_meta, save_adapters
from diffmas.backbone import Backbone, load_backbone


def _train_like(backbone: Backbone, out, system: str, roles: list[str], layout: str = "shared") -> None:
    settings = LoraSettings(rank=2, layout=layout)
    role_map = attach_lora(backbone, settings, roles)
    torch.manual_seed(1)
    with torch.no_grad():  # a non-trivial adapter (fresh LoRA B is zero)
        for name, p in backbone.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump({"system": system, "steps": 3, "data": {"task": "rg:chain_sum",
                                                                                            "target_style": "answer"}}))
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in (
        {"step": 0, "heldout_loss": 2.5}, {"step": 1, "loss": 2.4}, {"step": 3, "loss": 1.9, "heldout_loss": 2.0})))
    save_adapters(backbone, out, role_map, settings,
                  extra={"system": system, "topology": "duo", "latent_steps": 1, "grad_mode": "coupled",
                         "task": "rg:chain_sum", "steps": 3, "method": "answer", "seed": 0})


def test_embedded_alias_names_the_hub_id(tiny_model_dir, tmp_path):
    loaded = load_backbone(str(tiny_model_dir), "cpu")
    backbone = Backbone(model=loaded.lm, tokenizer=loaded.tokenizer, name="smollm2-135m-instruct")
    _train_like(backbone, tmp_path / "sft", "single_sft", ["solver"])
    config = json.loads((tmp_path / "sft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    meta = read_adapter_meta(tmp_path / "sft")
    assert meta["base_model"] == "smollm2-135m-instruct" and meta["base_model_path"] == str(tiny_model_dir)
    card = (tmp_path / "sft" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and front["library_name"] == "peft"
    assert {"diffmas", "lora", "single_sft"} <= set(front["tags"])
    assert "| 3 | 2.0000 |" in card and "rg:chain_sum" in card and "PeftModel.from_pretrained" in card


def test_single_sft_loads_with_plain_peft(tiny_model_dir, tmp_path):
    backbone = load_backbone(str(tiny_model_dir), "cpu")
    out = tmp_path / "sft"
    _train_like(backbone, out, "single_sft", ["solver"])
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out)).eval()
    ids = torch.tensor([[72, 105, 33, 10, 50]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        mine = backbone.model.eval()(input_ids=ids).logits
        theirs = plain(input_ids=ids).logits
        assert torch.allclose(mine, theirs, atol=1e-5)
        assert not torch.allclose(theirs, base(input_ids=ids).logits, atol=1e-3)  # the adapter does something


def test_card_rebuilds_the_multi_agent_system(tiny_model_dir, tmp_path, capsys):
    backbone = load_backbone(str(tiny_model_dir), "cpu")
    out = tmp_path / "dm"
    _train_like(backbone, out, "diffmas", ["reasoner", "solver"], layout="per-agent")
    for role in ("reasoner", "solver"):
        sub = json.loads((out / role / "adapter_config.json").read_text())
        assert sub["base_model_name_or_path"] == str(tiny_model_dir)
    meta = json.loads((out / META_FILE).read_text())
    card = (out / "README.md").read_text()
    assert meta["rebuild"]["python"].strip() in card and "diffmas run --system diffmas" in card
    scope: dict = {}
    exec(meta["rebuild"]["python"], scope)  # the snippet itself, as a user would paste it
    system = scope["system"]
    assert system.spec.topology.name == "duo" and system.spec.latent_steps == 1
    assert system.spec.adapters == {"reasoner": "reasoner", "solver": "solver"}
    assert capsys.readouterr().out.endswith("\n")  # it answered
