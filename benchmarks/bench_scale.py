#!/usr/bin/env python
"""The audit at real model dimensions: random-weight models with the published per-layer
dimensions of the paper's checkpoints and of larger MoE models, as many decoder layers as fit
this machine, timed on the chapter-4 protocol.

For one model (``--model``) it builds the architecture from the published configuration
(:data:`CONFIGS`, typed once with its source) on the meta device, materialises it on the CPU
(or ``--device``) in ``--dtype`` with random weights (normal, std 0.02; the router at std
1/sqrt(hidden) so that routing is decisive), keeping the first ``--layers`` decoder layers, and
measures on a random-token corpus of ``--texts`` texts of ``--tokens`` tokens:

* the clean pass (:func:`moeaudit.engine.clean_pass`): wall time and peak memory;
* token-mode and sequence-mode single-expert ablations (:func:`moeaudit.engine.run_ablations`,
  the book's audit design: at each sampled position every active expert of one audited layer is
  removed once): wall time per ablation and peak memory;
* the released protocol (the authors' design: the whole padded text, batch 1, a baseline forward
  per comparison of two ablations, a forward hook that zeroes the combine weight) on the first
  ``--released`` ablations of the same list: wall time per ablation, and the ratio to the engine.

Memory is the peak resident set size of this process during each phase (Linux ``VmHWM``, reset
through ``/proc/self/clear_refs`` before the phase) and its increase over the weights.

The extrapolation to the paper's full audit (100 texts, 5 audited layers, 200 positions per cell,
the four metrics and the routing-weight control: 10,000 ablations in the released design, and
``200 x 5 x top_k`` in the book's, where every ranking reads the same records) scales the measured
time per ablation by the depth (a token-mode step starts at the ablated layer, so on average it
runs half of the decoder layers; a released forward runs all of them)::

    T_full = n_ablations x t_ablation x (L_full / L_built)  +  t_clean x (100 / texts) x (L_full / L_built)

Usage::

    .venv/bin/python benchmarks/bench_scale.py --model olmoe-1b-7b --layers 16 --out benchmarks/reports/scale_olmoe.json
    .venv/bin/python benchmarks/bench_scale.py --model mixtral-8x7b --layers 4 --positions 4
    .venv/bin/python benchmarks/bench_scale.py --list
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ablation import _proc_status as _status, _reset_peak_rss as _reset_peak  # noqa: E402  (one RSS reader)

#: Published configurations (the values of each checkpoint's ``config.json`` on the Hugging Face hub, at the
#: revision named). Only the fields that set the per-layer dimensions and the routing are typed here.
CONFIGS = {
    "olmoe-1b-7b": dict(
        source="allenai/OLMoE-1B-7B-0924, config.json", model_type="olmoe", num_hidden_layers=16, hidden_size=2048,
        intermediate_size=1024, num_experts=64, num_experts_per_tok=8, num_attention_heads=16, num_key_value_heads=16,
        vocab_size=50304, max_position_embeddings=4096, norm_topk_prob=False),
    "qwen1.5-moe-a2.7b": dict(
        source="Qwen/Qwen1.5-MoE-A2.7B, config.json", model_type="qwen2_moe", num_hidden_layers=24, hidden_size=2048,
        intermediate_size=5632, moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts=60,
        num_experts_per_tok=4, num_attention_heads=16, num_key_value_heads=16, vocab_size=151936,
        max_position_embeddings=8192, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[]),
    "deepseek-v2-lite": dict(
        source="deepseek-ai/DeepSeek-V2-Lite, config.json", model_type="deepseek_v2", num_hidden_layers=27,
        hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, num_attention_heads=16,
        num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, vocab_size=102400, max_position_embeddings=163840, topk_method="greedy", n_group=1,
        topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False),
    "mixtral-8x7b": dict(
        source="mistralai/Mixtral-8x7B-v0.1, config.json", model_type="mixtral", num_hidden_layers=32,
        hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768),
    "deepseek-v3": dict(
        source="deepseek-ai/DeepSeek-V3, config.json", model_type="deepseek_v3", num_hidden_layers=61,
        hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3, num_attention_heads=128,
        num_key_value_heads=128, kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True, vocab_size=129280,
        max_position_embeddings=163840),
}
#: the paper's protocol (Section 2): texts, audited layers, positions per cell, cells per model
PAPER = dict(texts=100, layers=5, positions=200, metric_cells=20, control_cells=5)


def moe_layer_bytes(cfg: dict, dtype_bytes: int) -> int:
    """Bytes of one MoE decoder layer's routed experts (gate, up and down projections)."""
    E = cfg.get("num_experts") or cfg.get("n_routed_experts") or cfg.get("num_local_experts")
    inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    return 3 * E * cfg["hidden_size"] * inter * dtype_bytes


class Phase:
    """Times a phase and records its peak resident memory and, on a CUDA device, its peak allocated
    GPU memory (``torch.cuda.max_memory_allocated``, reset before the phase; the device is
    synchronised before the clock is read at both ends)."""

    def __init__(self, name: str, log: dict, device: str = "cpu"):
        self.name, self.log, self.cuda = name, log, str(device).startswith("cuda")

    def __enter__(self):
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.reset = _reset_peak()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        peak = _status("VmHWM") if self.reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.log[self.name] = {"wall_s": wall, "peak_rss_gib": peak / 2 ** 30}
        line = f"  {self.name}: {wall:.1f} s, peak RSS {peak / 2 ** 30:.2f} GiB"
        if self.cuda:
            gpu = torch.cuda.max_memory_allocated() / 2 ** 30
            self.log[self.name]["peak_gpu_gib"] = gpu
            line += f", peak GPU memory {gpu:.2f} GiB"
        print(line, flush=True)


def build(name: str, *, layers: int, dtype, device: str):
    """The random-weight model (an :class:`moeaudit.models.AuditModel`) with the first ``layers``
    decoder layers of the published configuration; seeded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moeaudit.models import wrap_model

    spec = {k: v for k, v in CONFIGS[name].items() if k not in ("source", "model_type")}
    spec["num_hidden_layers"] = min(layers, spec["num_hidden_layers"])
    cfg = AutoConfig.for_model(CONFIGS[name]["model_type"], **spec)
    cfg.tie_word_embeddings = False
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    hf = hf.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if p.ndim == 1:  # norms and biases
                p.fill_(1.0 if "norm" in pname else 0.0)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(cfg.hidden_size) if pname.endswith("gate.weight") else 0.02,
                          generator=gen)
    for parent in list(hf.modules()):  # rotary tables are buffers computed at construction: rebuild them
        for child_name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding"):
                setattr(parent, child_name, type(child)(config=hf.config).to(device))
    hf.eval()
    return wrap_model(hf, name=f"random-{name}-{cfg.num_hidden_layers}L")


def released_protocol(model, corpus, req) -> float:
    """The released design on ``req`` (single-expert ablations): per comparison (two ablations at
    one position and layer) one baseline forward of the whole padded text, then one forward per
    ablation with a forward pre-hook zeroing the expert's combine weight at t; batch 1. Returns
    the wall seconds."""
    import torch

    spec = model.layout.spec
    width = int(corpus.lengths.max())
    t0 = time.perf_counter()
    for (s, t, L), g in req.groupby(["seq_id", "t", "layer"], sort=False):
        ids, mask = corpus.padded([s], pad_id=model.pad_id, length=width)
        ids, mask = ids.to(model.device), mask.to(model.device)
        experts = getattr(model.hf_moe_block(L), spec.experts)
        idxs = list(g.index)
        for c in range(0, len(idxs), 2):
            with torch.no_grad():
                model.hf(input_ids=ids, attention_mask=mask, logits_to_keep=1)
            for i in idxs[c:c + 2]:
                e = int(req.at[i, "removed"][0])

                def pre(module, args, e=e, t=t):
                    hidden, index, weights = args[0], args[1], args[2]
                    drop = torch.zeros_like(index, dtype=torch.bool)
                    drop[t] = index[t] == e
                    return (hidden, index, weights.masked_fill(drop, 0.0), *args[3:])

                h = experts.register_forward_pre_hook(pre)
                try:
                    with torch.no_grad():
                        model.hf(input_ids=ids, attention_mask=mask, logits_to_keep=1)
                finally:
                    h.remove()
    return time.perf_counter() - t0


def run(args) -> dict:
    import torch

    import moeaudit.models  # noqa: F401  (nnsight before transformers.models.*)
    from moeaudit.engine import clean_pass, run_ablations
    from moeaudit.tooling.testing import random_token_corpus

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cfg = CONFIGS[args.model]
    nbytes = torch.empty((), dtype=dtype).element_size()
    one_layer = moe_layer_bytes(cfg, nbytes) / 2 ** 30
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None
    out = {"model": args.model, "source": cfg["source"], "dtype": args.dtype, "device": args.device, "gpu": gpu,
           "texts": args.texts, "tokens": args.tokens,
           "layers_built": min(args.layers, cfg["num_hidden_layers"]), "layers_full": cfg["num_hidden_layers"],
           "moe_layer_experts_gib": one_layer, "machine": {"cpu": platform.processor() or platform.machine(),
                                                           "threads": args.threads}, "phases": {}}
    print(f"{args.model}: {out['layers_built']} of {out['layers_full']} layers, {args.dtype}; routed experts "
          f"{one_layer:.2f} GiB per MoE layer", flush=True)
    with Phase("build", out["phases"], args.device):
        model = build(args.model, layers=args.layers, dtype=dtype, device=args.device)
    weights = sum(p.numel() * p.element_size() for p in model.hf.parameters())
    out["weights_gib"] = weights / 2 ** 30
    out["parameters_b"] = sum(p.numel() for p in model.hf.parameters()) / 1e9
    corpus = random_token_corpus(n_seqs=args.texts, length=args.tokens, vocab_size=model.hf.config.vocab_size, seed=0)
    with Phase("clean_pass", out["phases"], args.device):
        clean = clean_pass(model, corpus, batch_size=args.batch_texts, progress=False)
    lay = model.layout
    audited = lay.depth_proportional_layers(min(5, len(lay.moe_layers)))
    rng = np.random.default_rng(0)
    rows = []
    for p in range(args.positions):  # one position per (text, layer) in turn, every active expert of it
        s, L = p % len(corpus), audited[p % len(audited)]
        t = int(rng.integers(1, corpus.lengths[s] - 1))
        rows += [{"seq_id": s, "t": t, "layer": L, "removed": [int(e)]} for e in clean.active(s, t, L)]
    import pandas as pd

    req = pd.DataFrame(rows)
    out["ablations"], out["audited_layers"] = len(req), list(map(int, audited))
    for mode in ("token", "sequence"):
        with Phase(f"{mode}_ablations", out["phases"], args.device):
            rec = run_ablations(model, corpus, clean, req, mode=mode, batch_size=args.batch_rows, progress=False)
        out["phases"][f"{mode}_ablations"]["s_per_ablation"] = out["phases"][f"{mode}_ablations"]["wall_s"] / len(req)
        out["phases"][f"{mode}_ablations"]["premise_ok"] = bool(rec.premise_ok.all())
        out["phases"][f"{mode}_ablations"]["median_abs_delta_loss"] = float(rec.delta_loss.abs().median())
    if args.released:
        sub = req.iloc[: args.released].reset_index(drop=True)
        with Phase("released_protocol", out["phases"], args.device):
            wall = released_protocol(model, corpus, sub)
        out["phases"]["released_protocol"]["s_per_ablation"] = wall / len(sub)
        out["phases"]["released_protocol"]["ablations"] = len(sub)
        out["released_over_engine_token"] = (wall / len(sub)) / out["phases"]["token_ablations"]["s_per_ablation"]
    # extrapolation to the paper's audit at full depth
    depth = out["layers_full"] / out["layers_built"]
    clean_full = out["phases"]["clean_pass"]["wall_s"] * PAPER["texts"] / args.texts * depth
    k = lay.top_k
    book_n = PAPER["positions"] * PAPER["layers"] * k
    released_n = (PAPER["metric_cells"] + PAPER["control_cells"]) * PAPER["positions"] * 2
    out["extrapolation"] = {
        "formula": "T = n_ablations * t_ablation * (L_full / L_built) + t_clean * (100 / texts) * (L_full / L_built)",
        "book_design_ablations": book_n, "released_design_ablations": released_n,
        "book_token_h": (book_n * out["phases"]["token_ablations"]["s_per_ablation"] * depth + clean_full) / 3600,
        "book_sequence_h": (book_n * out["phases"]["sequence_ablations"]["s_per_ablation"] * depth + clean_full) / 3600,
    }
    if args.released:
        out["extrapolation"]["released_h"] = released_n * out["phases"]["released_protocol"]["s_per_ablation"] * depth / 3600
    # the weights live where the model runs: GPU memory on a GPU, the process's resident memory on the CPU
    peak = max(p["peak_gpu_gib" if gpu else "peak_rss_gib"] for p in out["phases"].values())
    out["peak_over_weights_gib"] = peak - out["weights_gib"]
    out["peak_memory"] = "GPU memory allocated (torch.cuda.max_memory_allocated)" if gpu else "resident set size (VmHWM)"
    print(json.dumps(out["extrapolation"], indent=1), flush=True)
    return out


def markdown_table(reports: list[dict]) -> str:
    """The RESULTS.md table of :func:`run` reports (one row per model)."""
    rows = ["| model (source) | device | layers built / full | weights (GiB) | peak over weights (GiB) | clean pass (s; texts x tokens) "
            "| token mode (s / ablation) | sequence mode (s / ablation) | released (s / ablation) | released / token "
            "| paper audit, book design, token mode (h) | released design (h) |", "|" + "---|" * 12]
    for r in reports:
        ph = r["phases"]
        rel = ph.get("released_protocol", {}).get("s_per_ablation", float("nan"))
        rows.append(f"| {r['model']} ({r['source']}) | {r.get('gpu') or r.get('device', 'cpu')}, {r['dtype']} | "
                    f"{r['layers_built']} / {r['layers_full']} | {r['weights_gib']:.2f} | "
                    f"{r['peak_over_weights_gib']:.2f} | {ph['clean_pass']['wall_s']:.1f} ({r.get('texts', 4)} x {r.get('tokens', 128)}) | "
                    f"{ph['token_ablations']['s_per_ablation']:.2f} | {ph['sequence_ablations']['s_per_ablation']:.2f} | "
                    f"{rel:.2f} | {r.get('released_over_engine_token', float('nan')):.1f} | "
                    f"{r['extrapolation']['book_token_h']:.1f} | {r['extrapolation'].get('released_h', float('nan')):.1f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(CONFIGS))
    ap.add_argument("--layers", type=int, default=2, help="decoder layers to build (the first ones)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--texts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--positions", type=int, default=8, help="audited positions (each: every active expert of one layer)")
    ap.add_argument("--released", type=int, default=8, help="ablations run with the released protocol (0: none)")
    ap.add_argument("--batch-rows", type=int, default=64)
    ap.add_argument("--batch-texts", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--list", action="store_true", help="list the configurations and their per-layer sizes")
    ap.add_argument("--table", nargs="+", metavar="REPORT", help="print the markdown table of these JSON reports")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown_table([json.loads(Path(f).read_text()) for f in args.table]))
        return 0
    if args.list or args.model is None:
        for name, c in CONFIGS.items():
            print(f"{name:20s} {c['num_hidden_layers']:3d} layers, routed experts {moe_layer_bytes(c, 2) / 2 ** 30:6.2f} "
                  f"GiB per MoE layer in bfloat16  ({c['source']})")
        return 0
    if args.device != "cpu":
        import re

        import torch

        if not re.fullmatch(r"cuda(:\d+)?", args.device):
            ap.error(f"--device must be cpu or cuda[:n], got {args.device!r}")
        if not torch.cuda.is_available():
            ap.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    out = run(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
