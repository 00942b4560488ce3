"""Tensor-parallel loading (transformers' ``tp_plan="auto"``) traced by nnsight on two CPU processes.

``torchrun --nproc-per-node 2`` (gloo) shards tiny-olmoe; each rank wraps it in nnsight's
``LanguageModel`` (whose ``tp`` support reassembles sharded values inside a trace) and runs the
engine's clean pass and token-mode ablations (both strategies). Records equal one process within
float32 rounding of the sharded matmuls. nnsight 0.8.1 looks up ``_get_parameter_plan`` in
``transformers.distributed.tensor_parallel``; transformers 5.23 has it in
``transformers.distributed.parallel_utils``, so the worker aliases it first (see docs/multi_device.md).
Skipped where ``torchrun`` or the gloo backend is unavailable.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

WORKER = textwrap.dedent('''
    import os, sys, warnings
    warnings.simplefilter("ignore")
    import torch
    import transformers.distributed.parallel_utils as PU
    import transformers.distributed.tensor_parallel as TP
    if not hasattr(TP, "_get_parameter_plan"):  # nnsight 0.8.1 looks for it here; transformers 5.23 moved it
        TP._get_parameter_plan = PU._get_parameter_plan
    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from moeaudit import engine
    from moeaudit.models import AuditModel, layout_from_config, remote_wrapper
    from moeaudit.tooling.testing import random_token_corpus
    from moeaudit.zoo import zoo_path

    tp, out = sys.argv[1] == "tp", sys.argv[2]
    path = str(zoo_path("tiny-olmoe"))
    hf = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto" if tp else None, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    model = AuditModel("tiny-olmoe", hf, remote_wrapper(hf, tokenizer=tok), layout_from_config(hf.config), tok)
    corpus = random_token_corpus(n_seqs=2, length=12, vocab_size=hf.config.vocab_size)
    clean = engine.clean_pass(model, corpus, progress=False)
    L = model.layout.moe_layers[1]
    req = pd.DataFrame([{"seq_id": s, "t": t, "layer": L, "removed": [int(clean.active(s, t, L)[0])]}
                        for s in (0, 1) for t in (3, 6)])
    result = {"loss": clean.tokens.loss.to_numpy(), "norm": clean.routing[L]["norm"]}
    for strategy in ("kv", "full"):
        result[strategy] = engine.run_ablations(model, corpus, clean, req, progress=False,
                                                strategy=strategy).delta_loss.to_numpy()
    torch.save(result, f"{out}_{os.environ.get('RANK', 0)}.pt")
''')


def _torchrun() -> str | None:
    exe = Path(sys.executable).with_name("torchrun")
    if not exe.exists() or not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        return None
    return str(exe)


@pytest.mark.skipif(_torchrun() is None, reason="torchrun or the gloo backend is not available")
def test_tensor_parallel_records_equal_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MOEAUDIT_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), "one", str(tmp_path / "one")], check=True, env=env, timeout=300,
                   capture_output=True)
    proc = subprocess.run([_torchrun(), "--standalone", "--nproc-per-node", "2", str(script), "tp",
                           str(tmp_path / "tp")], env=env, timeout=300, capture_output=True, text=True)
    if proc.returncode != 0 and "gloo" in proc.stderr.lower() and "tp_0.pt" not in os.listdir(tmp_path):
        pytest.skip(f"torchrun could not start two gloo processes: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = torch.load(tmp_path / "one_0.pt", weights_only=False)
    for rank in (0, 1):
        sharded = torch.load(tmp_path / f"tp_{rank}.pt", weights_only=False)
        for key in ("loss", "norm", "kv", "full"):  # float32 rounding of sharded matmuls and their all-reduce
            np.testing.assert_allclose(sharded[key], one[key], atol=2e-5, rtol=0, err_msg=f"rank {rank}: {key}")
