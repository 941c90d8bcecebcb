"""Synthetic report.json documents shaped like the default suite's (cases/default): five cases, cp 2 and 4,
three optimizer steps, about 300 checks, with every optional field the HTML page draws.

    default_suite_report()               every check passes
    default_suite_report(failing=True)   tiny-e2b-packed at cp 4 fails train.grad_norm_parity (steps 1, 2) with a
                                         first divergence in layer 13's gradients
    legacy_report()                      the passing suite without the optional fields (what cpharness wrote
                                         before them): every figure section must say its data is absent

Statuses and the summary are derived from the checks exactly as harness/report/report.cpp derives them, so the
documents validate against reports/schema/report.schema.json.
"""

import copy
import math
import random

# id, description, dtype, cp sizes, layers, sliding window, full-attention period, seq_len, documents, padding,
# which check families run
CASES = [
    ("e4b-pattern", "E4B's 42-layer pattern at tiny width, cp 2: the cache builds 4 masks per rank per step.",
     "fp32", [2], 42, 16, 6, 64, [30, 34], 0, ("cache", "ring", "train_loss")),
    ("tiny-31b-vision", "31B structure at tiny width: vision groups spanning shard edges, tail padding.",
     "fp32", [2, 4], 12, 16, 6, 64, [26, 18], 20, ("all",)),
    ("tiny-e2b-packed", "E2B structure at tiny width: KV sharing, three packed documents crossing shard edges.",
     "fp32", [2, 4], 35, 16, 5, 96, [40, 30, 20], 6, ("all",)),
    ("tiny-e4b-bf16", "bf16 lane of the E4B structure with packed documents and padding, k = 3.",
     "bf16", [2], 42, 16, 6, 80, [33, 40], 7, ("all",)),
    ("tiny-e4b-odd-length", "E4B structure at tiny width: a length not divisible by cp, windows crossing edges.",
     "fp32", [2, 4], 42, 32, 6, 77, [50, 27], 0, ("all",)),
]
STEPS = 3
BLOCK = 8  # the fixture's block size (the grids are small enough to draw)
FAIL_CASE, FAIL_CP, FAIL_LAYER = "tiny-e2b-packed", 4, 13
PARAMS = ["input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
          "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
          "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]


def judge(name, cp, rank, metric, observed, threshold, policy, details=None, step=None):
    if policy == "count":
        ok = observed == threshold
        msg = f"observed {observed:g} {'==' if ok else '!='} expected {threshold:g} (count)"
    else:
        ok = math.isfinite(observed) and observed <= threshold
        msg = f"observed {observed:.6g} {'<=' if ok else '>'} allowed {threshold:.6g} ({policy})"
    c = {"name": name, "status": "pass" if ok else "fail", "cp": cp, "rank": rank, "step": step, "metric": metric,
         "observed": observed, "threshold": threshold, "policy": policy, "message": msg, "details": details or {}}
    if not math.isfinite(observed):
        c["observed"] = None
        c["observed_nonfinite"] = "nan" if math.isnan(observed) else ("inf" if observed > 0 else "-inf")
    return c


def layer_type(i, period):
    return "full_attention" if (i + 1) % period == 0 else "sliding_attention"


def doc_ids(seq_len, docs, padding):
    out = []
    for d, n in enumerate(docs):
        out += [d + 1] * n
    return out + [0] * padding


def block_tiles(seq_len, n, rank, owner, window, docs, padding, full):
    """The tile grid rank `rank` computes against the K/V chunk of `owner` (contiguous shards)."""
    local = math.ceil(seq_len / n)
    ids = doc_ids(seq_len, docs, padding) + [0] * (local * n - seq_len)
    q0, k0 = rank * local, owner * local
    nb = math.ceil(local / BLOCK)
    rows = []
    for qb in range(nb):
        row = ""
        for kb in range(nb):
            seen = allowed = 0
            for q in range(q0 + qb * BLOCK, min(q0 + (qb + 1) * BLOCK, q0 + local)):
                for k in range(k0 + kb * BLOCK, min(k0 + (kb + 1) * BLOCK, k0 + local)):
                    seen += 1
                    ok = k <= q and ids[q] != 0 and ids[q] == ids[k] and (full or q - k < window)
                    allowed += ok
            row += "E" if allowed == 0 else ("F" if allowed == seen else "P")
        rows.append(row)
    return {"q_blocks": nb, "kv_blocks": nb, "tiles": rows}


def grad_names(layers):
    names = ["norm.weight"]
    for i in reversed(range(layers)):
        names += [f"layers.{i}.{p}" for p in PARAMS]
    return names + ["embed_tokens.weight"]


def build_case(spec, failing, rng):
    cid, desc, dtype, cps, layers, window, period, seq_len, docs, padding, families = spec
    fams = set(families)
    want = lambda f: "all" in fams or f in fams
    bf16 = dtype == "bf16"
    policy = "bf16_oracle_relative" if bf16 else "fp32_relative"
    case = {"id": cid, "description": desc, "cp_sizes": cps, "dtype": dtype, "status": "pass", "skip_reason": None,
            "error": None, "duration_s": round(rng.uniform(8, 40), 2), "checks": [], "trajectories": {},
            "block_mask_cache": {}, "ring": {}, "reference_cp": 1, "divergence_profile": {}, "block_masks": {},
            "block_mask_cache_expected": {}}
    base_loss = [12.4 - 0.21 * s + rng.uniform(-0.01, 0.01) for s in range(STEPS)]
    base_gn = [3.1 - 0.4 * s + rng.uniform(-0.05, 0.05) for s in range(STEPS)]
    base_pn = [88.0 + 0.01 * s for s in range(STEPS)]
    case["trajectories"]["1"] = {"loss": base_loss, "grad_norm": base_gn, "param_norm": base_pn}
    if bf16:
        case["oracle_trajectory"] = {"dtype": "fp32", "loss": [v * (1 + 2e-4) for v in base_loss],
                                     "grad_norm": [v * (1 - 6e-4) for v in base_gn], "param_norm": base_pn}
    geometries = {(layer_type(i, period)) for i in range(layers)}
    for n in cps:
        fails_here = failing and cid == FAIL_CASE and n == FAIL_CP
        noise = 1e-3 if bf16 else 1e-7
        thr = (3 * 2e-3 + 1e-3) if bf16 else 1e-5
        rel_loss = [rng.uniform(0.2, 1.0) * noise for _ in range(STEPS)]
        rel_gn = [rng.uniform(0.2, 1.0) * noise * 3 for _ in range(STEPS)]
        if fails_here:
            rel_gn = [rel_gn[0], 4.1e-4, 2.7e-3]
        case["trajectories"][str(n)] = {
            "loss": [v * (1 + e) for v, e in zip(base_loss, rel_loss)],
            "grad_norm": [v * (1 + e) for v, e in zip(base_gn, rel_gn)],
            "param_norm": [v * (1 + 1e-8) for v in base_pn]}
        checks = case["checks"]
        if want("mask"):
            for r in range(n):
                checks.append(judge("mask.dense_slice", n, r, "mismatched_elements", 0, 0, "count"))
                checks.append(judge("mask.block_classification", n, r, "mismatched_chunks", 0, 0, "count"))
            for r in range(n):
                checks.append(judge("attention.parity", n, r, "rel_l2_fp64", rng.uniform(1e-8, 3e-7), 1e-5,
                                    "fp32_relative"))
                checks.append(judge("attention.parity", n, r, "padded_rows_max_abs", 0.0, 0.0, "exact"))
        if want("ring"):
            for r in range(n):
                checks.append(judge("ring.rotation_order", n, r, "wrong_passes", 0, 0, "count",
                                    {"first_wrong": None, "forward_passes": layers, "backward_passes": layers}))
                checks.append(judge("ring.grad_return", n, r, "count_mismatches", 0, 0, "count",
                                    {"ring_exchanges": 2 * layers * (n - 1), "expected_ring_exchanges": 2 * layers * (n - 1)}))
        lookups, builds = layers * n * 2, len(geometries) * n
        if want("cache"):
            for r in range(n):
                per_step = [{"lookups": lookups, "builds": builds, "hits": lookups - builds, "resets": 1}] * STEPS
                checks.append(judge("cache.build_count", n, r, "steps_with_wrong_counts", 0, 0, "count",
                                    {"expected_builds_cached": builds, "expected_builds_uncached": lookups,
                                     "expected_lookups": lookups, "per_step": per_step}))
                checks.append(judge("cache.hit_count", n, r, "steps_with_wrong_hits", 0, 0, "count",
                                    {"expected_hits": lookups - builds, "per_step": per_step}))
                checks.append(judge("cache.generation_reset", n, r, "steps_without_one_reset", 0, 0, "count",
                                    {"per_step": per_step}))
        train_names = ["train.loss_parity", "train.grad_norm_parity", "train.param_parity"] if want("all") else \
            ["train.loss_parity"]
        training = []
        for s in range(STEPS):
            for name in train_names:
                obs = {"train.loss_parity": rel_loss[s], "train.grad_norm_parity": rel_gn[s]}.get(name, 1e-8)
                training.append(judge(name, n, None, "rel_abs_diff", obs, thr, policy,
                                      {"candidate": 0.0, "reference": 0.0, "cp1_same_lane": 0.0}, step=s))
        if want("all"):
            training.append(judge("train.param_parity", n, None, "tensors_out_of_tolerance_worst_ratio",
                                  0.0, 1.0, policy, {"what": "final parameters, relative L2 per tensor / allowed"}))
        training.append(judge("train.loss_parity", n, None, "logits_rel_l2_step0", rng.uniform(1e-7, 5e-7) * (1e4 if bf16 else 1),
                              thr, policy, {"what": "step-0 logits on real tokens, global order"}))
        # Per-layer profile at step 0 (the failing case leaves tolerance in layer FAIL_LAYER's gradients).
        hidden = [{"name": "embeddings", "rel": 0.0, "threshold": thr}]
        for i in range(layers):
            hidden.append({"name": f"layers.{i}.output", "rel": noise * 0.05 * (1 + i / 4) * rng.uniform(0.5, 1.5),
                           "threshold": thr if not bf16 else thr * rng.uniform(0.8, 1.2)})
        grads = []
        first = None
        for g in grad_names(layers):
            layer = int(g.split(".")[1]) if g.startswith("layers.") else (layers if g.startswith("norm") else -1)
            rel = noise * rng.uniform(0.3, 3.0)
            if fails_here and 0 <= layer <= FAIL_LAYER and "self_attn" in g:
                rel = thr * rng.uniform(3, 60)
            if fails_here and first is None and rel > thr:
                first = {"kind": "gradient", "tensor": g, "layer": layer, "rel_error": rel,
                         "dump": f"reports/out/dumps/{cid}-cp{n}-first-divergence.h5"}
            grads.append({"name": g, "rel": rel, "threshold": thr})
        case["divergence_profile"][str(n)] = {"step": 0, "policy": policy, "hidden": hidden, "grads": grads}
        if first:
            for c in training:
                if c["status"] == "fail":
                    c["details"]["first_divergence"] = first
                    c["message"] += f"; first divergence: gradient {first['tensor']} (rel {first['rel_error']:.3g})"
        checks.extend(training)
        if want("all") and not bf16:
            checks.append(judge("kvshare.loss_parity", n, None, "rel_abs_diff_loss", rng.uniform(1e-8, 1e-7), 1e-5,
                                policy))
            checks.append(judge("kvshare.bug_detected", n, None, "tolerance_over_loss_shift", 0.02, 1.0, "fp32_relative"))
        if want("all"):
            checks.append(judge("determinism.repeat_bitwise", n, None, "differences", 0, 0, "exact"))
        # Counters, ring and masks.
        case["block_mask_cache"][str(n)] = [[{"lookups": lookups, "builds": builds, "hits": lookups - builds,
                                              "evictions": 0, "resets": 1} for _ in range(STEPS)] for _ in range(n)]
        case["block_mask_cache_expected"][str(n)] = {"lookups": lookups, "builds": builds, "hits": lookups - builds,
                                                     "resets": 1, "builds_uncached": lookups}
        owners = [[(r - s) % n for s in range(n)] for r in range(n)]
        local_bytes = 2 * 1 * 2 * math.ceil(seq_len / n) * 32 * 4
        case["ring"][str(n)] = {"owners": owners, "owners_by_pass": {"forward": owners, "backward": owners},
                                "mode": "collect",
                                "passes": [{"pass": "forward", "comm_ops": layers * n * (n - 1), "bytes": 0,
                                            "peak_chunks": n},
                                           {"pass": "backward", "comm_ops": 2 * layers * n * (n - 1),
                                            "bytes": layers * n * (n - 1) * local_bytes, "peak_chunks": n}]}
        grids = []
        for lt in sorted(geometries):
            for r in range(n):
                for o in range(n):
                    g = block_tiles(seq_len, n, r, o, window, docs, padding, lt == "full_attention")
                    grids.append({"layer_type": lt, "rank": r, "chunk_owner": o, **g})
        case["block_masks"][str(n)] = grids
    # Performance of every run: the reference on the CPU, candidates on one GPU (peak bytes are the device's).
    case["performance"] = {"1": {"device": "cpu", "device_name": "cpu", "devices": 1, "tokens_per_step": seq_len,
                                 "step_seconds": [0.5] * STEPS, "tokens_per_s_per_device": [seq_len / 0.5] * STEPS,
                                 "peak_allocated_bytes": [None] * STEPS, "peak_reserved_bytes": [None] * STEPS}}
    for n in cps:
        case["performance"][str(n)] = {"device": "cuda:0", "device_name": "NVIDIA H200", "devices": 1,
                                       "tokens_per_step": seq_len, "step_seconds": [0.25] * STEPS,
                                       "tokens_per_s_per_device": [seq_len / 0.25] * STEPS,
                                       "peak_allocated_bytes": [3 * 2**30] * STEPS,
                                       "peak_reserved_bytes": [4 * 2**30] * STEPS}
    return case


def finalize(report):
    """Derives case and report statuses and the summary from the checks (as report.cpp does)."""
    totals = dict.fromkeys(["checks_total", "checks_passed", "checks_failed", "checks_errors", "checks_skipped"], 0)
    counts = dict.fromkeys(["passed", "failed", "errors", "skipped"], 0)
    for case in report["cases"]:
        st = [c["status"] for c in case["checks"]]
        if case["error"] or "error" in st:
            case["status"] = "error"
        elif "fail" in st:
            case["status"] = "fail"
        elif case["skip_reason"]:
            case["status"] = "skipped"
        elif not st:
            case["status"], case["error"] = "error", "no checks ran"
        else:
            case["status"] = "pass" if "pass" in st else "skipped"
        counts[{"pass": "passed", "fail": "failed", "error": "errors", "skipped": "skipped"}[case["status"]]] += 1
        totals["checks_total"] += len(st)
        for key, s in (("checks_passed", "pass"), ("checks_failed", "fail"), ("checks_errors", "error"),
                       ("checks_skipped", "skipped")):
            totals[key] += st.count(s)
    statuses = [c["status"] for c in report["cases"]]
    report["status"] = "error" if report["error"] or "error" in statuses else ("fail" if "fail" in statuses else "pass")
    report["summary"] = {"cases": len(report["cases"]), **counts, **totals,
                         "duration_s": round(sum(c["duration_s"] for c in report["cases"]), 2)}
    return report


def default_suite_report(failing=False, seed=7):
    rng = random.Random(seed)
    report = {"schema_version": "1.0", "tool": {"name": "cpharness", "version": "0.1.0", "git_sha": "647f839a1b2c"},
              "environment": {"torch": "2.11.0", "cuda": None, "nccl": None, "device": "cpu", "comm_backend": "local",
                              "determinism": {"torch.use_deterministic_algorithms": True, "omp_threads": 2},
                              "transformers": None},
              "timestamp": "2025-06-02T09:14:05Z", "status": "pass", "error": None, "summary": {}, "cases": []}
    for spec in CASES:
        report["cases"].append(build_case(spec, failing, rng))
    return finalize(report)


OPTIONAL_CASE_KEYS = ("reference_cp", "oracle_trajectory", "divergence_profile", "block_masks", "block_mask_cache_expected")


def legacy_report():
    """The passing suite with only the fields cpharness wrote before the HTML page (no optional ones)."""
    r = copy.deepcopy(default_suite_report())
    for case in r["cases"]:
        for k in OPTIONAL_CASE_KEYS:
            case.pop(k, None)
        for ring in case["ring"].values():
            ring.pop("owners_by_pass", None)
    return r


def bare_report():
    """A report whose cases carry checks only (no trajectories, counters or ring): e.g. a compare or a skipped run."""
    r = legacy_report()
    for case in r["cases"]:
        case["trajectories"], case["block_mask_cache"], case["ring"] = {}, {}, {}
    return r
