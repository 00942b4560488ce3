#!/usr/bin/env python
"""What an audit costs when every trace runs on an NDIF server: requests, round trips and bytes.

The model's traces go through :class:`moeaudit.tooling.ndif.InProcessServer`, which does what a
server does with a request (nnsight 0.8.1's protocol: the trace serialised, deserialised with this
package hidden, run with autograd on, only the saved values sent back as ``torch.save`` bytes) and
counts each request and the bytes each way (uncompressed; nnsight compresses with zstd when
``CONFIG.API.COMPRESS`` is set). The client's model is the same wrapper with ``remote`` a host URL,
so the engine computes everything that needs weights inside the traces, as it does against NDIF.
No weights travel: a request carries the trace's code, its inputs and the values it closes over.

The protocol is chapter 4's (``--positions`` token positions drawn once, the model's five audited
layers, every active expert ablated on its own, token mode, ``batch_size`` 64 rows per traced forward,
8 texts per chunk as :func:`moeaudit.audit.single_expert_records` runs them) on a shipped model and
the embedded corpus. Both token-mode strategies are measured: ``kv`` (packed steps on the chunk's
clean key/value cache: the cache comes back from the server once per chunk and the rows of it a step
needs go up with every step) and ``full`` (each position's prefix re-run: token ids only). Every
record is checked equal to the local run (max abs difference of the delta loss).

Round trips per audited position = requests / positions; the latency a remote audit adds is
``requests x RTT`` (``--rtt``, default 0.2 s), against the server's compute, which is the local
figure of ``bench_scale.py`` for the real checkpoint. The bytes of the ``kv`` strategy scale with the
cache (layers x 2 x key/value heads x head dim x positions x texts per chunk x bytes per value):
``kv_scale`` extrapolates the measured cache bytes to a checkpoint's published dimensions.

Usage::

    .venv/bin/python benchmarks/bench_remote.py --out benchmarks/reports/remote_tiny_olmoe.json
    .venv/bin/python benchmarks/bench_remote.py --positions 40 --strategies kv
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from moeaudit import audit, engine
from moeaudit.models import AuditModel, remote_wrapper
from moeaudit.tooling.ndif import InProcessServer

#: published dimensions (config.json of each checkpoint) that set the key/value cache's size
CHECKPOINTS = {
    "allenai/OLMoE-1B-7B-0924": {"layers": 16, "kv_heads": 16, "head_dim": 128},
    "Qwen/Qwen1.5-MoE-A2.7B": {"layers": 24, "kv_heads": 16, "head_dim": 128},
}


def _server_model(local: AuditModel) -> tuple[AuditModel, InProcessServer]:
    wrapper = remote_wrapper(local.hf, tokenizer=local.tokenizer)
    server = InProcessServer(wrapper).attach(wrapper)
    return AuditModel(local.name, local.hf, wrapper, local.layout, local.tokenizer,
                      remote="https://ndif.invalid"), server


def _phase(server: InProcessServer, start: tuple[int, int, int], wall: float) -> dict:
    n0, b0, r0 = start
    req, res = server.request_bytes[b0:], server.result_bytes[r0:]
    return {"requests": server.requests - n0, "request_bytes": int(sum(req)), "result_bytes": int(sum(res)),
            "max_request_bytes": int(max(req, default=0)), "max_result_bytes": int(max(res, default=0)),
            "wall_s": round(wall, 2)}


def _mark(server):
    return server.requests, len(server.request_bytes), len(server.result_bytes)


def single_expert_requests(ctx, layers, positions) -> pd.DataFrame:
    """Chapter 4's requests: every active expert at every position and layer, one at a time."""
    reqs = []
    for L in layers:
        active = ctx.clean.routing[L]["indices"][ctx.clean.row(positions.seq_id.to_numpy(), positions.t.to_numpy())]
        k = active.shape[1]
        reqs.append(pd.DataFrame({"seq_id": np.repeat(positions.seq_id.to_numpy(), k),
                                  "t": np.repeat(positions.t.to_numpy(), k), "layer": L,
                                  "removed": [[int(e)] for e in active.reshape(-1)]}))
    return pd.concat(reqs, ignore_index=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-olmoe")
    ap.add_argument("--positions", type=int, default=200)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-per-chunk", type=int, default=8)
    ap.add_argument("--strategies", default="kv,full")
    ap.add_argument("--rtt", type=float, default=0.2, help="round-trip time in seconds for the latency share")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("MOEAUDIT_PROGRESS", "0")

    with tempfile.TemporaryDirectory() as tmp:
        ctx = audit.prepare(args.model, corpus="embedded", results_dir=tmp, progress=False)
    local = ctx.model
    remote, server = _server_model(local)
    layers = local.audit_layers(5)
    out = {"model": args.model, "layers": layers, "positions": args.positions, "batch_size": args.batch_size,
           "seq_per_chunk": args.seq_per_chunk, "texts": len(ctx.corpus), "top_k": local.layout.top_k,
           "machine": {"cpu": platform.machine(), "python": sys.version.split()[0], "torch": torch.__version__},
           "phases": {}}

    mark, t0 = _mark(server), time.perf_counter()
    clean = engine.clean_pass(remote, ctx.corpus, batch_size=8, progress=False)
    out["phases"]["clean_pass"] = _phase(server, mark, time.perf_counter() - t0)
    out["phases"]["clean_pass"]["max_abs_loss_diff"] = float(np.nanmax(np.abs(clean.tokens.loss - ctx.clean.tokens.loss)))

    positions = audit.audit_positions(ctx, n_positions=args.positions, seed=args.seed)
    req = single_expert_requests(ctx, layers, positions)
    seqs = sorted(req.seq_id.unique().tolist())
    chunks = [seqs[i:i + args.seq_per_chunk] for i in range(0, len(seqs), args.seq_per_chunk)]
    out["ablations"], out["chunks"] = len(req), len(chunks)
    for strategy in args.strategies.split(","):
        mark, t0 = _mark(server), time.perf_counter()
        rec = pd.concat([engine.run_ablations(remote, ctx.corpus, ctx.clean, req[req.seq_id.isin(c)], strategy=strategy,
                                              batch_size=args.batch_size, progress=False) for c in chunks])
        phase = _phase(server, mark, time.perf_counter() - t0)
        t1 = time.perf_counter()
        ref = pd.concat([engine.run_ablations(local, ctx.corpus, ctx.clean, req[req.seq_id.isin(c)], strategy=strategy,
                                             batch_size=args.batch_size, progress=False) for c in chunks])
        phase["local_wall_s"] = round(time.perf_counter() - t1, 2)
        phase["max_abs_delta_diff"] = float(np.max(np.abs(rec.delta_loss.to_numpy() - ref.delta_loss.to_numpy())))
        phase["round_trips_per_position"] = phase["requests"] / args.positions
        phase["rows_per_request"] = (len(req) + 0.0) / max(1, phase["requests"] - (len(chunks) if strategy == "kv" else 0))
        phase["latency_s_at_rtt"] = phase["requests"] * args.rtt
        out["phases"][f"ablations_{strategy}"] = phase

    cfg = local.hf.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    width = max(len(s) for s in ctx.corpus.sequences)
    out["cache"] = {"layers": cfg.num_hidden_layers, "kv_heads": kv_heads, "head_dim": head_dim, "width": int(width)}
    out["kv_scale"] = {name: {**dims, "factor_per_position": (dims["layers"] * dims["kv_heads"] * dims["head_dim"])
                              / (cfg.num_hidden_layers * kv_heads * head_dim)} for name, dims in CHECKPOINTS.items()}
    out["rtt_s"] = args.rtt
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
