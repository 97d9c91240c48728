#!/usr/bin/env python
"""Mean KL and top-1 agreement of any ONNX causal LM of SmolLM2 (ours, onnxruntime-genai's, ...) against
llamaexport's float32 PyTorch reference, on the shipped held-out text (401 SmolLM2 tokens; at most 512).

    python scripts/peer_kl.py ~/.cache/llamaexport-bench/genai-smollm2-int4/model.onnx [more.onnx | x.gguf ...]

One forward over the whole text (empty KV cache); inputs are fed by name (input_ids, attention_mask,
position_ids and num_logits_to_keep = 0 if the graph has them, empty past_key_values.*: [1, K, 0, hd], or a
zeroed buffer of the graph's static length for an in-place cache), so graphs from other exporters work too. A .gguf
runs in llama.cpp (llama-cpp-python, `logits_all=True`, one batch over the same token ids; not installed by
scripts/setup.sh: `pip install llama-cpp-python`, which compiles llama.cpp). Used for docs/accuracy.md's
held-out table: it puts each system's int8/int4 speed next to its error.
"""
import sys

import numpy as np
import onnxruntime as ort
import torch

from llamaexport.model.checkpoint import load_checkpoint
from llamaexport.model.reference import build_reference
from llamaexport.model.tokenizer import load_tokenizer
from llamaexport.verify.parity import compare_logits, heldout_text

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from bench_peers import smollm2_gguf  # noqa: E402


def gguf_logits(path, ids) -> np.ndarray:
    from llama_cpp import Llama
    llm = Llama(path, n_ctx=len(ids) + 8, n_batch=len(ids), n_ubatch=len(ids), logits_all=True, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], np.float32)


def main(paths):
    gguf = str(smollm2_gguf())
    ck, tok = load_checkpoint(gguf), load_tokenizer(gguf)
    ids = tok.encode(heldout_text())[:512]
    ref = build_reference(ck.config, {k: ck.weights[k] for k in ck.weights})
    t = torch.tensor([ids])
    with torch.no_grad():
        want = ref(t, torch.ones_like(t), torch.arange(len(ids))[None], ref.empty_cache(1))[0][0].numpy()
    for path in paths:
        if path.endswith(".gguf"):
            c = compare_logits(want, gguf_logits(path, ids))
            print(f"{path}: mean KL {float(c['kl'].mean()):.4f}, top-1 agreement {float(c['top1'].mean()):.3f} "
                  f"({len(ids)} tokens)")
            continue
        so = ort.SessionOptions()
        so.log_severity_level = 3
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        feed = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, len(ids)), np.int64)}
        for i in s.get_inputs():
            if i.name == "position_ids":
                feed[i.name] = np.arange(len(ids))[None]
            elif i.name == "num_logits_to_keep":
                feed[i.name] = np.array(0, np.int64)  # every position
            elif i.name.startswith("past"):
                dtype = np.float16 if "float16" in i.type else np.float32
                length = i.shape[2] if isinstance(i.shape[2], int) else 0  # static: an in-place max-length cache
                feed[i.name] = np.zeros((1, ck.config.n_kv_heads, length, ck.config.head_dim), dtype)
        c = compare_logits(want, s.run(["logits"], feed)[0][0])  # the same measures as `llamaexport check`
        kl, top1 = float(c["kl"].mean()), float(c["top1"].mean())
        print(f"{path}: mean KL {kl:.4f}, top-1 agreement {top1:.3f} ({len(ids)} tokens)")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
