#!/usr/bin/env python3
"""The peers of bench_cuda_attention on a GPU: FlexAttention (torch.compile) and SDPA, on the same shapes and
masks (B 1, Hq 8, Hkv 2 / 4, S 8k / 16k / 32k, head_dim 256 / 512, bf16; causal / sliding 512 / packed documents),
then the C++ benchmark binary; prints one table and writes every figure as JSON.

TFLOP/s are over allowed elements A of one head: forward 4*A*D*Hq, forward + backward 14*A*D*Hq (as the C++ bench).
A peer that cannot run a shape (no kernel for head_dim 512, out of memory) is reported with its error, not hidden.

    python bench/flex_attention_peer.py --bin build/bench/bench_cuda_attention --json reports/gpu/attention.json
    python bench/flex_attention_peer.py --quick   # S 8k only, fewer repetitions
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

DOC_LENGTHS = [3000, 1000, 2048, 4096, 500, 1644]  # as bench_cuda_attention.cpp: repeated, the last cut at S
WINDOW = 512


def doc_lengths(S):
    out, t, i = [], 0, 0
    while t < S:
        L = min(DOC_LENGTHS[i % len(DOC_LENGTHS)], S - t)
        out.append(L)
        t += L
        i += 1
    return out


def allowed_elements(kind, S):
    if kind == "causal":
        return S * (S + 1) / 2
    if kind == "sliding512":
        return sum(min(q + 1, WINDOW) for q in range(S))
    return sum(L * (L + 1) / 2 for L in doc_lengths(S))


def document_ids(S, device):
    ids = torch.empty(S, dtype=torch.int32, device=device)
    t = 0
    for i, L in enumerate(doc_lengths(S)):
        ids[t:t + L] = i + 1
        t += L
    return ids


def mask_mod_for(kind, S, device):
    if kind == "causal":
        return lambda b, h, q, k: q >= k
    if kind == "sliding512":
        return lambda b, h, q, k: (q >= k) & (q - k < WINDOW)
    docs = document_ids(S, device)
    return lambda b, h, q, k: (q >= k) & (docs[q] == docs[k])


def dense_mask(kind, S, device):
    q = torch.arange(S, device=device).view(-1, 1)
    k = torch.arange(S, device=device).view(1, -1)
    m = q >= k
    if kind == "sliding512":
        m &= q - k < WINDOW
    if kind == "docs":
        d = document_ids(S, device)
        m &= d.view(-1, 1) == d.view(1, -1)
    return m


def time_ms(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def measure(name, fwd, args, kind, S, D, hq, hkv, warmup, reps):
    rec = {"impl": name, "mask": kind, "S": S, "D": D, "Hq": hq, "Hkv": hkv, "dtype": "bf16"}
    A = allowed_elements(kind, S)
    rec["allowed_elements"] = A
    q, k, v, dout = args
    try:
        with torch.no_grad():
            rec["fwd_ms"] = time_ms(lambda: fwd(q, k, v), warmup, reps)
        rec["fwd_tflops"] = 4 * A * D * hq / (rec["fwd_ms"] * 1e-3) / 1e12
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))

        def step():
            out = fwd(qg, kg, vg)
            out.backward(dout)

        rec["fwd_bwd_ms"] = time_ms(step, warmup, reps)
        rec["fwd_bwd_tflops"] = 14 * A * D * hq / (rec["fwd_bwd_ms"] * 1e-3) / 1e12
    except Exception as e:  # a peer without a kernel for this shape, or out of memory: reported, not hidden
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    torch.cuda.empty_cache()
    return rec


def run_peers(seqs, dims, hkvs, masks, warmup, reps, on_record=lambda records: None):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    dev = "cuda"
    records = []
    for kind in masks:
        for S in seqs:
            for D in dims:
                for hkv in hkvs:
                    hq = 8
                    torch.manual_seed(0)
                    q = torch.randn(1, hq, S, D, device=dev, dtype=torch.bfloat16)
                    k = torch.randn(1, hkv, S, D, device=dev, dtype=torch.bfloat16)
                    v = torch.randn(1, hkv, S, D, device=dev, dtype=torch.bfloat16)
                    dout = torch.randn(1, hq, S, D, device=dev, dtype=torch.bfloat16)
                    scale = D ** -0.5
                    try:
                        bm = create_block_mask(mask_mod_for(kind, S, dev), None, None, S, S, device=dev, BLOCK_SIZE=128)
                        fx = lambda a, b, c: flex(a, b, c, block_mask=bm, scale=scale, enable_gqa=True)
                        records.append(measure("flex_attention", fx, (q, k, v, dout), kind, S, D, hq, hkv, warmup, reps))
                    except Exception as e:
                        records.append({"impl": "flex_attention", "mask": kind, "S": S, "D": D, "Hq": hq, "Hkv": hkv,
                                        "error": f"{type(e).__name__}: {e}"[:300]})
                    if kind == "causal":
                        sd = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True, scale=scale,
                                                                            enable_gqa=True)
                    else:
                        m = dense_mask(kind, S, dev)
                        sd = lambda a, b, c, m=m: F.scaled_dot_product_attention(a, b, c, attn_mask=m, scale=scale,
                                                                                 enable_gqa=True)
                    records.append(measure("sdpa", sd, (q, k, v, dout), kind, S, D, hq, hkv, warmup, reps))
                    print(json.dumps(records[-2]), json.dumps(records[-1]), sep="\n", flush=True)
                    on_record(records)
                    del q, k, v, dout
                    torch.cuda.empty_cache()
    return records


def run_binary(path, seqs, dims, hkvs, masks, warmup, reps, kernels):
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as f:
        out = f.name
    cmd = [path, "--seq", ",".join(map(str, seqs)), "--dim", ",".join(map(str, dims)), "--hkv",
           ",".join(map(str, hkvs)), "--masks", ",".join(masks), "--warmup", str(warmup), "--reps", str(reps),
           "--kernels", kernels, "--json", out]
    print("+", " ".join(cmd), flush=True)
    rc = subprocess.run(cmd).returncode
    records = []
    if os.path.exists(out):
        with open(out) as f:
            records = [json.loads(line) for line in f if line.strip()]
        os.unlink(out)
    if rc != 0:
        records.append({"impl": "cpharness_cuda", "error": f"exit status {rc}"})
    return records


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default="build/bench/bench_cuda_attention", help="the C++ benchmark binary")
    p.add_argument("--json", help="write every record here")
    p.add_argument("--quick", action="store_true", help="S 8k only, 1 warm-up, 3 repetitions")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--no-binary", action="store_true")
    p.add_argument("--seqs", help="comma-separated sequence lengths (default 8192,16384,32768; --quick: 8192)")
    p.add_argument("--dims", default="256,512", help="comma-separated head dims")
    p.add_argument("--hkv", default="2,4", help="comma-separated K/V head counts (Hq is 8)")
    p.add_argument("--masks", default="causal,sliding512,docs", help="comma-separated: causal, sliding512, docs")
    p.add_argument("--kernels", default="tc", choices=["tc", "fp32", "both"],
                   help="tensor-core kernels (tc), the fp32 CUDA-core ones, or both side by side")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("flex_attention_peer: no CUDA device", file=sys.stderr)
        return 2
    ints = lambda text: [int(x) for x in text.split(",") if x]
    seqs = ints(a.seqs) if a.seqs else ([8192] if a.quick else [8192, 16384, 32768])
    dims, hkvs, masks = ints(a.dims), ints(a.hkv), [m for m in a.masks.split(",") if m]
    warmup, reps = (1, 3) if a.quick else (2, 5)
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name()}

    def save(records):  # after every record, so a run cut short keeps what it measured
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"environment": env, "command": " ".join(sys.argv), "records": records}, f, indent=1)

    records = []
    if not a.no_binary:
        records += run_binary(a.bin, seqs, dims, hkvs, masks, warmup, reps, a.kernels)
        save(records)
    if not a.no_peers:
        done = list(records)
        records += run_peers(seqs, dims, hkvs, masks, warmup, reps, lambda peer: save(done + peer))
    print(f"\n{'impl':20} {'mask':10} {'S':>6} {'D':>4} {'Hkv':>3} | {'fwd ms':>9} {'TFLOP/s':>8} | "
          f"{'f+b ms':>9} {'TFLOP/s':>8}")
    for r in records:
        if "mask" not in r:
            print(r)
            continue
        if "error" in r and "fwd_ms" not in r:
            print(f"{r['impl']:20} {r['mask']:10} {r['S']:>6} {r['D']:>4} {r['Hkv']:>3} | {r['error'][:60]}")
            continue
        fb = f"{r.get('fwd_bwd_ms', float('nan')):9.3f} {r.get('fwd_bwd_tflops', float('nan')):8.2f}"
        print(f"{r['impl']:20} {r['mask']:10} {r['S']:>6} {r['D']:>4} {r['Hkv']:>3} | {r['fwd_ms']:9.3f} "
              f"{r['fwd_tflops']:8.2f} | {fb}" + (f"  ({r['error'][:40]})" if "error" in r else ""))
    save(records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
