"""Run by test_train.py under torch.distributed.run (2 CPU processes, gloo): the trainer's FSDP2 paths.

accelerate does not offer FSDP on CPU (it falls back to DDP or to no distribution), so this shards the trainer's
module with torch's fully_shard the way accelerate's FSDP2 preparation does (each decoder layer, then the root)
and drives the trainer's own functions: held-out loss, a step, checkpoint save/load, adapter save, realignment.
Prints "FSDP2 OK" at the end; any failed check raises.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_backbone  # noqa: E402

from diffmas.adapters import LoraSettings  # noqa: E402
from diffmas.cli import close_process_group  # noqa: E402
from diffmas.config import TrainConfig  # noqa: E402
from diffmas.train import loop  # noqa: E402
from diffmas.train.checkpoint import full_state_dict, load_checkpoint, save_checkpoint  # noqa: E402
from diffmas.train.data import TrainExample  # noqa: E402
from diffmas.train.objectives import StepPlan  # noqa: E402

out = Path(sys.argv[1])
acc = Accelerator(cpu=True)
rank, world = acc.process_index, acc.num_processes
assert world == 2


def build(seed_b: int):
    backbone = make_backbone()
    cfg = TrainConfig(topology="duo", latent_steps=1, lora=LoraSettings(rank=4, dropout=0.0), steps=4)
    loop.share_realigner(backbone, cfg.realign, acc)
    spec = loop.attach_trainable(backbone, cfg)
    torch.manual_seed(seed_b)
    with torch.no_grad():  # non-zero B, so that the adapters change the computation
        for n, p in backbone.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    backbone.model.train()
    return backbone, spec, cfg


def shard(module):
    # As accelerate's FSDP2 preparation does for TrajectoryLoss: one unit, the root (it has no layer classes to
    # wrap), whose weights are gathered for the forward and the backward.
    assert getattr(module, "_no_split_modules", None) is None
    fully_shard(module)
    return module


examples = [TrainExample(f"What is {i} + {i + 1}?", f"Answer: {2 * i + 1}") for i in range(4)]
backbone, spec, cfg = build(1)
plain = loop.heldout_loss(loop.TrajectoryLoss(backbone, spec, cfg), examples, 2, cfg)
module = shard(loop.TrajectoryLoss(backbone, spec, cfg))
name, lora = next((n, p) for n, p in backbone.model.named_parameters() if "lora_A" in n)
assert isinstance(lora, DTensor), type(lora)

# Held-out loss runs inside the wrapped forward: the weights are gathered there (outside, they are shards).
sharded = loop.heldout_loss(module, examples, 2, cfg)
assert abs(sharded - plain) < 1e-5, (sharded, plain)

# One step, then a checkpoint: full tensors on disk, not one process's shards.
params = loop.wrapped_trainable(backbone, spec)
optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
plan = StepPlan([e.prompt for e in examples], [e.target for e in examples])
loss, _ = module(plan.rows(slice(rank, None, world)), loop.plan_norm(backbone, spec, plan))
(loss * world).backward()
before = {n: p.full_tensor().clone() for n, p in backbone.model.named_parameters() if "lora_B" in n}
optimizer.step()
# The optimizer holds the sharded parameters the module trains (not the ones replaced at wrapping).
assert all(not torch.equal(p.full_tensor(), before[n]) for n, p in backbone.model.named_parameters() if n in before)
ckpt = save_checkpoint(out, 1, 4, backbone, optimizer, scheduler, cfg, acc)
saved = full_state_dict(backbone)
if acc.is_main_process:
    from safetensors.torch import load_file

    on_disk = load_file(str(ckpt / "lora.safetensors"))
    assert on_disk[name].shape == lora.shape and not isinstance(on_disk[name], DTensor)
    assert torch.equal(on_disk[name], saved[name])
    opt = torch.load(ckpt / "optimizer.pt", weights_only=False)
    assert all(v.shape == p.shape for st, p in zip(opt["state"].values(), params) for k, v in st.items()
               if k != "step"), "optimizer states must be saved whole"
acc.wait_for_everyone()

# Load into a fresh sharded model: the same parameters (resharded) and optimizer moments.
backbone2, spec2, cfg2 = build(2)
module2 = shard(loop.TrajectoryLoss(backbone2, spec2, cfg2))
params2 = loop.wrapped_trainable(backbone2, spec2)
optimizer2 = torch.optim.AdamW(params2, lr=1e-2, weight_decay=0.0)
scheduler2 = torch.optim.lr_scheduler.LambdaLR(optimizer2, lambda s: 1.0)
load_checkpoint(ckpt, backbone2, optimizer2, scheduler2, rank, world)
for a, b in zip(params, params2):
    assert isinstance(b, DTensor) and torch.equal(a.full_tensor(), b.full_tensor())
for a, b in zip(params, params2):
    sa, sb = optimizer.state[a], optimizer2.state[b]
    assert torch.equal(sa["exp_avg"].full_tensor(), sb["exp_avg"].full_tensor())
assert abs(loop.heldout_loss(module2, examples, 2, cfg) - loop.heldout_loss(module, examples, 2, cfg)) < 1e-6

# The adapters as the trainer saves them: every process gathers, the main one writes full tensors.
state = full_state_dict(backbone)
if acc.is_main_process:
    from diffmas.adapters import save_adapters
    from safetensors.torch import load_file

    save_adapters(backbone, out / "adapters", spec.adapters, cfg.lora, state_dict=state)
    written = load_file(str(out / "adapters" / "adapter_model.safetensors"))
    assert len(written) == len(state) and all(v.shape[0] * v.shape[1] > 0 for v in written.values())
    assert any(torch.equal(v, state[name]) for v in written.values())

# The realigner was solved once, by the main process, and every process holds the same matrix.
matrix = backbone.cache[("realigner", True, 1e-5)].matrix
gathered = [torch.zeros_like(matrix) for _ in range(world)]
torch.distributed.all_gather(gathered, matrix.contiguous())
assert torch.equal(gathered[0], gathered[1])
acc.wait_for_everyone()
print(json.dumps({"rank": rank, "heldout": sharded}), "FSDP2 OK", flush=True)
close_process_group()  # as the command line does: without it, gloo's threads abort the exit now and then
