#!/usr/bin/env python3
"""Exports goldens from Hugging Face transformers itself (one installed version), in the layout of golden/README.md.

    python golden/export_hf.py --inputs DIR_OR_FILE... --out golden/hf-<version> [--no-cache-variant] [--save-pretrained ID]

Each input is an HDF5 file written by the C++ side (`cpharness golden record CASE -o F.h5`): its /inputs are the
batch the harness uses, and its /provenance attribute `config` is the model configuration as HF config.json text
(ModelConfig::to_json). For each input file this script
  1. builds that configuration as a transformers `Gemma4ForCausalLM` (fp32, eager attention) with HF's init distribution drawn per
     parameter from a seeded generator, then rescales a few of them for fp32 conditioning (see `condition` below);
  2. detects, by feature and not by version string, how this transformers version shares K/V between layers
     (gemma4-spec §4.3/§7): `shared_kv_states` in the attention forward (dict keyed by source layer index when the
     layer has `kv_shared_layer_index`, else by layer type), or the Cache's `shared_layers` (5.5.0/5.5.1, sharing
     only when a cache is passed);
  3. runs the batch forward and backward with an explicit attention mask per layer type, built from the batch's
     document ids, padding and vision groups as spec §3.4 says (HF cannot derive packed-document masks when a
     cache is passed, and the cache is what makes 5.5.0/5.5.1 share K/V);
  4. writes <out>/<case_id>.h5: provenance (kind hf-export, transformers and torch versions, the detected
     mechanism, the config), the inputs, the initial weights under the names the harness loads, and step 0's
     loss, logits, hidden states (index 0 = embedding output, i + 1 = output of decoder layer i, taken with hooks
     so no final norm is mixed in) and the gradient of every parameter.
On a cache-gated version, models with KV-shared layers are exported a second time with use_cache=False into
<case_id>-no-cache.h5: the 5.5.0/5.5.1 bug (shared layers use their own, dead K/V).
--save-pretrained ID also writes <out>/<ID>-checkpoint/ (save_pretrained: safetensors + config.json) for the
C++ checkpoint loader.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys

import h5py
import numpy as np
import torch
import transformers
from transformers import Gemma4ForCausalLM, Gemma4TextConfig

TOOL = "export_hf.py"


def fail(path: str, field: str, message: str) -> None:
    print(f"export_hf.py: error: {path}: {field}: {message}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------------------------------------------
# Reading the C++-written input file

def read_tensor(ds) -> torch.Tensor:
    arr = ds[()]
    tag = ds.attrs.get("dtype")
    if isinstance(tag, bytes):
        tag = tag.decode()
    if tag == "bool" or arr.dtype == np.bool_:
        return torch.from_numpy(np.asarray(arr).astype(np.bool_))
    if tag == "bfloat16":
        return torch.from_numpy(np.asarray(arr).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.asarray(arr))


def read_inputs(path: str):
    with h5py.File(path, "r") as f:
        if "provenance" not in f or "config" not in f["provenance"].attrs:
            fail(path, "provenance/config", "missing: record the inputs with `cpharness golden record CASE -o F.h5`")
        prov = {k: (v.decode() if isinstance(v, bytes) else str(v)) for k, v in f["provenance"].attrs.items()}
        if "inputs" not in f:
            fail(path, "inputs", "missing")
        inputs = {name: read_tensor(f["inputs"][name]) for name in f["inputs"]}
    for need in ("input_ids", "labels", "position_ids"):
        if need not in inputs:
            fail(path, f"inputs/{need}", "missing")
    if "vision_group_ids" in inputs:
        problem = vision_groups_problem(inputs["vision_group_ids"])
        if problem:
            fail(path, "inputs/vision_group_ids", problem)
    return prov, inputs


def vision_groups_problem(groups: torch.Tensor):
    """Why these group ids are not the groups transformers derives from which tokens are vision tokens
    (get_block_sequence_ids_for_mask: a group starts at each vision token after a text token), or None. The masks
    below take the ids as given, so ids transformers would not derive would make a golden of masks no version
    computes (the harness refuses them too: train::vision_groups_problem)."""
    g = torch.as_tensor(groups).to(torch.int64)
    if g.dim() != 2:
        return f"expected [batch, seq_len], got {g.dim()} dimensions"
    if bool((g < -1).any()):
        return "ids below -1 (text is -1, groups are >= 0)"
    is_vision = g >= 0
    touching = is_vision[:, 1:] & is_vision[:, :-1] & (g[:, 1:] != g[:, :-1])
    if bool(touching.any()):
        b, t = (int(x) for x in touching.nonzero()[0])
        return (f"row {b} token {t + 1}: groups {int(g[b, t])} and {int(g[b, t + 1])} touch, and transformers, which "
                f"derives groups from contiguous vision tokens, would see one group")
    starts = is_vision.clone()
    starts[:, 1:] &= ~is_vision[:, :-1]
    for b in range(g.size(0)):
        if len(set(g[b][is_vision[b]].tolist())) != int(starts[b].sum()):
            return (f"row {b}: a group resumes after text, and transformers, which derives groups from contiguous "
                    f"vision tokens, would see two groups")
    return None


# ---------------------------------------------------------------------------------------------------------------
# The model

def hf_config(cfg: dict) -> Gemma4TextConfig:
    keys = dict(cfg)
    keys.pop("model_type", None)
    config = Gemma4TextConfig(**keys)
    config._attn_implementation = "eager"
    return config


def fnv1a(s: str) -> int:
    h = 1469598103934665603
    for ch in s.encode():
        h = ((h ^ ch) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


def seeded_hf_init(model: Gemma4ForCausalLM, seed: int) -> None:
    """HF's init distribution (Gemma4PreTrainedModel._init_weights: weights normal(0, initializer_range), RMSNorm
    weights 1, layer_scalar 1), drawn per parameter from a generator seeded by (seed, parameter name) rather than
    from the global stream. HF's own draw order depends on which modules a version builds (5.5.0/5.5.1 build k/v
    projections on KV-shared layers, later versions do not), so with the global stream two versions would start
    from different weights and every comparison between them would begin with a weight difference."""
    std = model.config.initializer_range
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
                continue
            gen = torch.Generator().manual_seed((seed ^ fnv1a(harness_name(name))) & 0x7FFFFFFFFFFFFFFF)
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * std)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.fill_(1.0)


def condition(model: Gemma4ForCausalLM) -> None:
    """HF's init (normal std 0.02, every RMSNorm weight 1) makes the tiny presets' real depths (35 to 60 layers)
    badly conditioned in fp32 (README, "Numerics"): measured on tiny-e4b-hf, HF fp32 against HF fp64 on the same
    weights differs by up to 1e-4 (layer 0's k_norm gradient), so no fp32 reimplementation could be held to the
    1e-4 gradient tolerance. After HF's seeded init, this scales the norms that close a sublayer
    (post_attention, post_feedforward, post_per_layer_input) by 0.03, q_norm/k_norm by head_dim^-1/4 (attention
    has scale 1.0) and embed_tokens by 3; then HF fp32 against fp64 is within 1e-5 for every gradient of the three
    models (measured with 5.5.2: tiny-e2b-hf 2.5e-6, tiny-e4b-hf 6.3e-6, tiny-31b-hf 9.2e-6). Every value is exported, so the C++
    side loads exactly these weights."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".post_" in name and "norm" in name:
                p.mul_(0.03)
            elif name.endswith("q_norm.weight") or name.endswith("k_norm.weight"):
                p.mul_(float(p.shape[0]) ** -0.25)
            elif name.endswith("embed_tokens.weight"):
                p.mul_(3.0)


def kv_share_mechanism(model: Gemma4ForCausalLM) -> str:
    """Detected by feature (spec §7.1), never by version string."""
    layer = model.model.layers[0]
    attn_params = inspect.signature(type(layer.self_attn).forward).parameters
    has_index = hasattr(layer.self_attn, "kv_shared_layer_index")
    if "shared_kv_states" in attn_params:
        return "shared-kv-states-by-index" if has_index else "shared-kv-states-by-type"
    if has_index:
        return "cache-shared-layers"
    raise SystemExit("export_hf.py: error: cannot tell how this transformers version shares K/V "
                     "(no shared_kv_states argument and no kv_shared_layer_index attribute)")


# ---------------------------------------------------------------------------------------------------------------
# Masks: spec §3.4, the rule of this transformers version (the harness's, kernels/dense_mask.cpp, from 5.13 on)

def version_tuple() -> tuple:
    return tuple(int(x) for x in transformers.__version__.split(".")[:2])


def vision_mask_rule() -> str:
    """The vision-group rule of this transformers version (the harness's model.vision_mask / hf_vision_mask):
    5.5 .. 5.8 (create_causal_mask_mapping with mm_token_type_ids) OR a group after the sliding window, full layers
    causal; 5.9 .. 5.12 (create_masks_for_generate with block_sequence_ids) overlay the group on every layer type, so
    full layers open it too; 5.13 on (create_masks_for_vision_model) OR it with causal inside the window only."""
    if version_tuple() < (5, 9):
        return "group_past_window"
    if version_tuple() < (5, 13):
        return "group_on_every_layer"
    return "group_inside_window"


def opens_vision_groups(config: Gemma4TextConfig) -> bool:
    """Gemma4Model.forward opens vision groups only where use_bidirectional_attention is "vision"; any other model
    gets the plain masks (create_masks_for_generate)."""
    return getattr(config, "use_bidirectional_attention", None) == "vision"


def allowed_mask(inputs: dict, S: int, B: int, window: int | None, vision_bidirectional: bool) -> torch.Tensor:
    i = torch.arange(S).view(1, S, 1)
    j = torch.arange(S).view(1, 1, S)
    order = (j <= i).expand(B, S, S)
    in_window = (j > i - window).expand(B, S, S) if window is not None else torch.ones(B, S, S, dtype=torch.bool)
    vg = inputs.get("vision_group_ids")
    rule = vision_mask_rule()
    if vision_bidirectional and vg is not None and (window is not None or rule == "group_on_every_layer"):
        gq, gk = vg.unsqueeze(2), vg.unsqueeze(1)
        group = (gq == gk) & (gq >= 0)
        allowed = (in_window & (order | group)) if rule == "group_inside_window" else ((order & in_window) | group)
    else:
        allowed = order & in_window
    doc = inputs.get("document_ids")
    if doc is not None:
        dq, dk = doc.unsqueeze(2), doc.unsqueeze(1)
        allowed = allowed & (dq == dk) & (dq > 0)
    pad = inputs.get("padding")
    if pad is not None:
        allowed = allowed & pad.logical_not().unsqueeze(1)
    return allowed


def transformers_own_masks(config: Gemma4TextConfig, inputs: dict):
    """The boolean masks [B, S, S] per layer type that this transformers version builds itself in Gemma4Model's
    multimodal path (from mm_token_type_ids, padding as the attention mask), or (None, why) where this version has
    none of the builders known here."""
    from transformers.models.gemma4 import modeling_gemma4 as mg
    import transformers.masking_utils as mu
    B, S = inputs["input_ids"].shape
    vg = inputs.get("vision_group_ids")
    # (A model that opens none gets the plain masks, which the builders give for a batch without vision tokens.)
    mm = (vg >= 0).long() if vg is not None and opens_vision_groups(config) else torch.zeros(B, S, dtype=torch.long)
    emb = torch.zeros(B, S, 4)
    pad = inputs.get("padding")
    attention_mask = (~pad).long() if pad is not None else None
    kw = dict(config=config, inputs_embeds=emb, attention_mask=attention_mask, past_key_values=None,
              position_ids=inputs["position_ids"])
    if hasattr(mg, "create_causal_mask_mapping"):
        masks = mg.create_causal_mask_mapping(mm_token_type_ids=mm, **kw)
    elif hasattr(mg, "get_block_sequence_ids_for_mask"):
        blocks = mg.get_block_sequence_ids_for_mask(mm, device=emb.device)
        builder = getattr(mg, "create_masks_for_vision_model", None) or mu.create_masks_for_generate
        accepted = inspect.signature(builder).parameters
        if "cache" in accepted:  # 5.24 renamed past_key_values
            kw["cache"] = kw.pop("past_key_values")
        masks = builder(block_sequence_ids=blocks, **kw)
    else:
        return None, "no known mask builder in modeling_gemma4"
    out = {}
    for layer_type, m in masks.items():
        if m is None:
            return None, f"transformers gives no materialised {layer_type} mask"
        m = m[:, 0] if m.dim() == 4 else m
        out[layer_type] = m if m.dtype == torch.bool else (m == 0)
    return out, ""


def check_masks_are_the_versions(config: Gemma4TextConfig, inputs: dict, case_id: str) -> None:
    """The explicit masks passed to transformers must be the ones this version builds itself (documents, which it
    cannot derive with a mask given, AND'd onto its own): a version that changes its rule fails the export here
    instead of yielding a golden of a mask no transformers computes. Compared over real query rows and keys."""
    theirs, why = transformers_own_masks(config, inputs)
    if theirs is None:
        print(f"{case_id}: masks not cross-checked against transformers' own ({why})")
        return
    B, S = inputs["input_ids"].shape
    mine = additive_masks(config, inputs)
    pad = inputs.get("padding")
    real = (~pad) if pad is not None else torch.ones(B, S, dtype=torch.bool)
    rows = real.unsqueeze(2) & real.unsqueeze(1)
    doc = inputs.get("document_ids")
    for layer_type in sorted(mine):
        if layer_type not in theirs:
            raise SystemExit(f"export_hf.py: error: {case_id}: transformers builds no {layer_type} mask "
                             f"(it builds {sorted(theirs)})")
        t = theirs[layer_type].to(torch.bool)
        if doc is not None:
            t = t & (doc.unsqueeze(2) == doc.unsqueeze(1)) & (doc.unsqueeze(2) > 0)
        a = mine[layer_type][:, 0] == 0
        differ = (a != t) & rows
        if differ.any():
            b, i, j = (int(x) for x in differ.nonzero()[0])
            raise SystemExit(f"export_hf.py: error: {case_id}: the {layer_type} mask built here differs from "
                             f"transformers {transformers.__version__}'s own in {int(differ.sum())} entries (first: "
                             f"row {b}, query {i}, key {j}: here {bool(a[b, i, j])}, transformers {bool(t[b, i, j])}); "
                             f"this version's vision-group rule ({vision_mask_rule()}) is not the one it builds")


def additive_masks(config: Gemma4TextConfig, inputs: dict) -> dict:
    """{layer_type: [B, 1, S, S] additive fp32 mask}: 0 where allowed, finfo(fp32).min where blocked (HF eager)."""
    B, S = inputs["input_ids"].shape
    vision = opens_vision_groups(config)
    out = {}
    for layer_type in sorted(set(config.layer_types)):
        window = config.sliding_window if layer_type == "sliding_attention" else None
        allowed = allowed_mask(inputs, S, B, window, vision)
        out[layer_type] = torch.where(allowed, 0.0, torch.finfo(torch.float32).min).unsqueeze(1).to(torch.float32)
    return out


# ---------------------------------------------------------------------------------------------------------------
# One export

def harness_name(hf_name: str) -> str:
    return hf_name[len("model."):] if hf_name.startswith("model.") else hf_name


def initial_weights(model: Gemma4ForCausalLM) -> dict:
    """Parameters and persistent buffers (layer_scalar) under the harness's names; the tied lm_head is left out."""
    out = {}
    for name, t in model.state_dict().items():
        if name.startswith("lm_head."):
            continue
        out[harness_name(name)] = t.detach().clone()
    return out


def run(model, config, inputs, use_cache: bool, explicit_mask: bool = True):
    model.zero_grad(set_to_none=True)
    hidden = {}
    layers = model.model.layers

    def pre_hook(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        hidden[0] = h.detach().clone()

    def make_hook(i):
        def hook(module, args, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            hidden[i + 1] = h.detach().clone()
        return hook

    handles = [layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    handles += [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        out = model(
            input_ids=inputs["input_ids"],
            # None: transformers packs by itself (documents from position_ids restarts), as in SFT packing.
            attention_mask=additive_masks(config, inputs) if explicit_mask else None,
            position_ids=inputs["position_ids"],
            labels=inputs["labels"],
            use_cache=use_cache,
            # Numerically nothing (hidden states come from the hooks above); it keeps 5.24's KV-shared slicing
            # (_maybe_slice_kv_shared_inputs, a no-op at logits_to_keep=0) from indexing per_layer_inputs that a
            # model without per-layer inputs does not have (TypeError; 5.25 guards it).
            output_hidden_states=True,
        )
        out.loss.backward()
    finally:
        for h in handles:
            h.remove()
    grads = {}
    for name, p in model.named_parameters():
        # A parameter the forward never used (5.5.0's redundant k/v on shared layers while sharing) has no
        # gradient in PyTorch; its gradient is zero.
        grads[harness_name(name)] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
    return out.loss.item(), out.logits.detach().clone(), hidden, grads


def put(f, path: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    tag = None
    if t.dtype == torch.bool:
        arr, tag = t.numpy().astype(np.uint8), "bool"
    else:
        arr = t.numpy()
    # Contiguous and uncompressed: random fp32 values gain < 10% from gzip, while a chunk index per dataset
    # costs more than that for these small tensors.
    ds = f.create_dataset(path, data=arr)
    if tag:
        ds.attrs["dtype"] = tag


def write_golden(path, prov, inputs, weights, loss, logits, hidden, grads) -> None:
    tmp = path + ".tmp"
    with h5py.File(tmp, "w", libver=("v108", "latest")) as f:
        f.attrs["layout_version"] = "1"
        g = f.create_group("provenance")
        for k, v in prov.items():
            g.attrs[k] = v
        for name, t in sorted(inputs.items()):
            put(f, f"inputs/{name}", t)
        for name, t in sorted(weights.items()):
            put(f, f"weights/{name}", t)
        f["steps/0/loss"] = np.float64(loss)
        grad_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
        f["steps/0/grad_norm"] = np.float64(grad_norm)
        put(f, "steps/0/logits", logits)
        for i, h in sorted(hidden.items()):
            put(f, f"steps/0/hidden/{i}", h)
        for name, t in sorted(grads.items()):
            put(f, f"steps/0/grads/{name}", t)
    os.replace(tmp, path)


def has_vision_groups(inputs):
    groups = inputs.get("vision_group_ids")
    return groups is not None and bool((np.asarray(groups) >= 0).any())


def packed_without_padding(inputs: dict) -> bool:
    """More than one document in a row and no padding: transformers can pack such a batch by position ids alone."""
    pad = inputs.get("padding")
    doc = inputs.get("document_ids")
    if doc is None or (pad is not None and bool(pad.any())):
        return False
    return bool((doc[:, 1:] != doc[:, :-1]).any())


def export_one(input_path: str, out_dir: str, no_cache_variant: bool, save_pretrained: set,
               packed_by_positions: bool = False) -> list:
    src_prov, inputs = read_inputs(input_path)
    case_id = src_prov.get("case_id") or os.path.splitext(os.path.basename(input_path))[0]
    cfg = json.loads(src_prov["config"])
    seed = int(src_prov.get("init_seed", "0") or 0)
    config = hf_config(cfg)
    check_masks_are_the_versions(config, inputs, case_id)
    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(config).to(torch.float32)
    seeded_hf_init(model, seed)
    condition(model)
    model.train()  # dropout is 0; training mode as in fine-tuning (it also routes 5.5.x masks as in training)
    mechanism = kv_share_mechanism(model)
    shares = any(getattr(layer.self_attn, "is_kv_shared_layer", False) for layer in model.model.layers)
    cache_gated = mechanism == "cache-shared-layers"
    weights = initial_weights(model)

    variants = [(case_id, cache_gated and shares, True)]  # (file id, use_cache, explicit mask)
    if cache_gated and shares and no_cache_variant:
        variants.append((f"{case_id}-no-cache", False, True))
    # transformers finds packed documents from position_ids restarts only with no attention mask and no cache
    # (masking_utils: `attention_mask is None and past_key_values is None`); a cache-gated version shares K/V only
    # with a cache, so there the variant cannot be made.
    if packed_by_positions and packed_without_padding(inputs):
        if has_vision_groups(inputs):
            # transformers would see no vision groups there (the variant passes no mask and no mm_token_type_ids),
            # while the file's vision_group_ids tell the harness to apply them.
            print(f"{case_id}: no -by-positions variant with vision groups (it passes transformers no mask)")
        elif cache_gated and shares:
            print(f"{case_id}: no -by-positions variant on a cache-gated version (it needs use_cache=False)")
        else:
            variants.append((f"{case_id}-by-positions", False, False))
    written = []
    for file_id, use_cache, explicit_mask in variants:
        loss, logits, hidden, grads = run(model, config, inputs, use_cache, explicit_mask)
        prov = {
            "kind": "hf-export",
            "tool": TOOL,
            "tool_version": "1",
            "torch_version": torch.__version__.split("+")[0],
            # Where the last bits come from: the same inputs and weights exported by another torch build or CPU
            # (its vector instruction set) differ in the last bits of the hidden states (2.5e-8 seen).
            "torch_build": str(torch.__version__),
            "torch_cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
            "transformers_version": transformers.__version__,
            "dtype": "fp32",
            "case_id": case_id,
            "case_hash": src_prov.get("case_hash", ""),
            "config": src_prov["config"],
            "kv_share_mechanism": mechanism,
            "hf_use_cache": "true" if use_cache else "false",
            "hf_attn_implementation": "eager",
            "hf_init": f"HF init distribution, per-parameter generator (seed {seed}, name); post-sublayer norms x0.03, q/k norms x hd^-1/4, embed_tokens x3",
            "hf_mask": "explicit additive fp32 mask per layer type from document_ids, padding, vision_group_ids, "
                       f"vision groups as this version builds them ({vision_mask_rule()}; checked against its own masks)",
            # The rule the harness reproduces (case key model.vision_mask): read by hf-parity.
            "hf_vision_mask": vision_mask_rule(),
        }
        file_inputs = inputs
        if not explicit_mask:
            prov["hf_mask"] = "none: transformers splits packed documents at position_ids restarts (find_packed_sequence_indices)"
            file_inputs = {k: v for k, v in inputs.items() if k not in ("document_ids", "padding")}
        if cache_gated and shares and not use_cache:
            prov["hf_note"] = "use_cache=False on a cache-gated version: KV-shared layers use their own K/V (the 5.5.0/5.5.1 bug)"
        path = os.path.join(out_dir, f"{file_id}.h5")
        write_golden(path, prov, file_inputs, weights, loss, logits, hidden, grads)
        print(f"{path}: loss {loss:.8f} ({mechanism}, use_cache={use_cache})")
        written.append(path)
    if case_id in save_pretrained:
        ckpt = os.path.join(out_dir, f"{case_id}-checkpoint")
        model.save_pretrained(ckpt, safe_serialization=True)
        print(f"{ckpt}: {sorted(os.listdir(ckpt))}")
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", nargs="+", required=True, help="input .h5 files (or directories of them)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-cache-variant", action="store_true",
                    help="on a cache-gated version, also export models with KV sharing with use_cache=False")
    ap.add_argument("--save-pretrained", action="append", default=[], metavar="CASE_ID")
    ap.add_argument("--packed-by-positions", action="store_true",
                    help="for inputs with packed documents and no padding, also export <case_id>-by-positions.h5: "
                         "no attention mask and no document_ids, transformers finds the documents from position_ids")
    a = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    files = []
    for p in a.inputs:
        files += sorted(os.path.join(p, n) for n in os.listdir(p) if n.endswith(".h5")) if os.path.isdir(p) else [p]
    if not files:
        fail(" ".join(a.inputs), "inputs", "no .h5 files")
    os.makedirs(a.out, exist_ok=True)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    for p in files:
        export_one(p, a.out, a.no_cache_variant, set(a.save_pretrained), a.packed_by_positions)


if __name__ == "__main__":
    main()
