"""python benchmarks/probe_cuda_sdpa.py --device cuda --out docs/benchmarks   (which CUDA SDPA kernels take GQA + a mask)

Wide segments (prompts) of a grouped-query model attend over the trace with a padding mask. transformers' SDPA
path then repeats every key/value head once per query head (``repeat_kv``) and autograd keeps the copies; the
library's grouped path (``diffmas.kv.attention._gqa_sdpa_attention``) passes ``enable_gqa=True`` instead, which is
only worth it where a fused kernel accepts GQA together with a mask (a fall-back to the math kernel keeps the whole
attention matrix, far more than the copies). This probe runs one forward + backward of a wide segment over a
trace, with Qwen3-8B's head layout, under each SDPA backend and both layouts, and records which run, their peak
memory (above the inputs), time, and distance from a float64 reference.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from _common import machine, parser, setup, table, write_json

BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def inputs(batch: int, heads: int, kv_heads: int, new: int, past: int, dim: int, dtype: torch.dtype,
           device: str) -> dict[str, torch.Tensor]:
    """Queries of a ``new``-token segment over ``past + new`` keys; rows left-padded by different amounts."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(batch, heads, new, dim, generator=gen)
    k = torch.randn(batch, kv_heads, past + new, dim, generator=gen)
    v = torch.randn(batch, kv_heads, past + new, dim, generator=gen)
    cols = torch.arange(past + new)
    causal = cols[None, :] <= (past + torch.arange(new))[:, None]  # [new, past + new]
    pad = torch.tensor([13 * row for row in range(batch)])  # leading padding columns of each row
    mask = causal[None] & (cols[None, None, :] >= pad[:, None, None])
    return {"mask": mask[:, None].to(device), **{n: x.to(device=device, dtype=dtype) for n, x in zip("qkv", (q, k, v))}}


def attend(t: dict[str, torch.Tensor], layout: str) -> torch.Tensor:
    k, v = t["k"], t["v"]
    groups = t["q"].shape[1] // k.shape[1]
    if layout == "repeat_kv":
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        return F.scaled_dot_product_attention(t["q"], k, v, attn_mask=t["mask"])
    return F.scaled_dot_product_attention(t["q"], k, v, attn_mask=t["mask"], enable_gqa=True)


def fwd_bwd(t: dict[str, torch.Tensor], layout: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = {n: t[n].detach().requires_grad_() for n in ("q", "k", "v")}
    out = attend({**t, **leaves}, layout)
    out.float().square().sum().backward()
    return out.detach(), [leaves[n].grad for n in ("q", "k", "v")]


def probe(t: dict[str, torch.Tensor], layout: str, backend: str, ref: tuple, reps: int) -> dict[str, Any]:
    device = t["q"].device
    ctx = sdpa_kernel(BACKENDS[backend]) if BACKENDS[backend] is not None else None
    try:
        if ctx is not None:
            ctx.__enter__()
        fwd_bwd(t, layout)  # warm-up (kernel selection, workspace)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out, grads = fwd_bwd(t, layout)
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fwd_bwd(t, layout)
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    except Exception as exc:  # a backend that refuses these inputs says why; that is the finding
        return {"layout": layout, "backend": backend, "ok": False, "error": str(exc).strip().splitlines()[0][:300]}
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    ref_out, ref_grads = ref
    scale = max(float(x.abs().max()) for x in (ref_out, *ref_grads))
    err = max(float((a.double() - b).abs().max()) for a, b in zip((out, *grads), (ref_out, *ref_grads))) / scale
    return {"layout": layout, "backend": backend, "ok": True, "peak_mib": peak, "ms": 1e3 * statistics.median(times),
            "max_rel_err_vs_float64": err}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--new", type=int, default=512, help="tokens of the wide segment")
    p.add_argument("--past", type=int, default=1024, help="trace positions before it")
    args = p.parse_args()
    setup(args.threads)
    if not args.device.startswith("cuda"):
        raise SystemExit("this probe measures CUDA kernels: pass --device cuda")
    shape = (args.batch, args.heads, args.kv_heads, args.new, args.past, args.head_dim)
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        t64 = inputs(*shape, torch.float64, args.device)
        with sdpa_kernel(SDPBackend.MATH):
            ref = fwd_bwd(t64, "repeat_kv")
        del t64
        t = inputs(*shape, dtype, args.device)
        for layout in ("repeat_kv", "grouped"):
            for backend in BACKENDS:
                res = {"dtype": str(dtype).replace("torch.", ""), **probe(t, layout, backend, ref, 1 if args.quick else 5)}
                results.append(res)
                print(res, flush=True)
        del t
    rows = [[r["dtype"], r["layout"], r["backend"], "yes" if r["ok"] else r["error"][:80],
             r.get("peak_mib", ""), r.get("ms", ""), r.get("max_rel_err_vs_float64", "")] for r in results]
    print(table(["dtype", "layout", "backend", "runs", "peak MiB above inputs", "fwd+bwd ms", "max rel err"], rows))
    write_json(args.out, "cuda_sdpa", {"machine": machine(args.threads, args.device),
                                       "shape": dict(zip(("batch", "heads", "kv_heads", "new", "past", "head_dim"),
                                                         shape)), "results": results})


if __name__ == "__main__":
    main()
