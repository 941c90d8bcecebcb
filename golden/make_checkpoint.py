#!/usr/bin/env python3
"""Builds a tiny but structurally realistic Gemma4 checkpoint with the installed transformers and save_pretrained.

  golden/make_checkpoint.py OUT --spec SPEC.json   (with a transformers venv's python; golden/README.md)

SPEC keys:
  text: dict of Gemma4TextConfig kwargs
  cls: "cg" (Gemma4ForConditionalGeneration, text+vision+audio) | "cg-text" (CG with text only) | "causal"
  disk_dtype: "fp32" | "bf16"
  max_shard_size: e.g. "20KB" (None: one file)
  seed: int
  google_style: bool  -- add k_proj/v_proj/k_norm on KV-shared layers and lm_head.weight (== embed) as Google's converter does
  top: dict of extra Gemma4Config kwargs (cg only)
"""
import argparse, json, os, sys
import torch
import transformers
from transformers import (Gemma4Config, Gemma4TextConfig, Gemma4ForCausalLM, Gemma4ForConditionalGeneration,
                          Gemma4VisionConfig, Gemma4AudioConfig)


def tiny_vision(text_hidden):
    return dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, head_dim=8, patch_size=4, position_embedding_size=64, pooling_kernel_size=2)


def tiny_audio():
    return dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=[4, 4],
                conv_kernel_size=3, output_proj_dims=16, attention_chunk_size=4, attention_context_left=5)


def realistic_init(model, seed, norm_noise=0.2, scalar_random=True):
    """HF init distribution, then conditioning like export_hf.condition, then non-trivial norms and layer_scalar
    (Google's real checkpoints have layer_scalar != 1 and norms far from 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" not in name and not name.startswith("model.layers") and not name.startswith("model.embed") \
                    and not name.startswith("model.norm") and not name.startswith("model.per_layer"):
                continue  # towers: keep HF init
            if "norm" in name:
                p.copy_(1.0 + norm_noise * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            if ".post_" in name and "norm" in name:
                p.mul_(0.03)
            elif name.endswith("q_norm.weight") or name.endswith("k_norm.weight"):
                p.mul_(float(p.shape[0]) ** -0.25)
            elif name.endswith("embed_tokens.weight"):
                p.mul_(3.0)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar") and scalar_random:
                b.copy_(0.5 + 0.5 * torch.rand(b.shape, generator=g))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--spec", required=True)
    a = ap.parse_args()
    spec = json.load(open(a.spec))
    seed = spec.get("seed", 0)
    torch.manual_seed(seed)
    text = Gemma4TextConfig(**spec["text"])
    cls = spec.get("cls", "causal")
    if cls == "causal":
        cfg = text
        model = Gemma4ForCausalLM(cfg)
    else:
        kw = dict(text_config=text)
        if cls in ("cg", "cg-vision"):
            kw["vision_config"] = Gemma4VisionConfig(**tiny_vision(text.hidden_size))
            if cls == "cg": kw["audio_config"] = Gemma4AudioConfig(**tiny_audio())
        kw.update(spec.get("top", {}))
        cfg = Gemma4Config(**kw)
        model = Gemma4ForConditionalGeneration(cfg)
    model = model.to(torch.float32)
    realistic_init(model, seed, spec.get("norm_noise", 0.2), spec.get("scalar_random", True))
    if spec.get("untie_lm_head"):
        with torch.no_grad():
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() + 0.01)
    disk = spec.get("disk_dtype", "fp32")
    if disk == "bf16":
        model = model.to(torch.bfloat16)
        # keep rope inv_freq fp32 irrelevant for disk (non-persistent)
    kwargs = dict(safe_serialization=True)
    if spec.get("max_shard_size"):
        kwargs["max_shard_size"] = spec["max_shard_size"]
    model.save_pretrained(a.out, **kwargs)
    if spec.get("google_style"):
        google_style(a.out, model, cfg)
    print(a.out, sorted(os.listdir(a.out)))


def google_style(out, model, cfg):
    """Adds what Google's converter writes and transformers >= 5.5.2 drops: k_proj/v_proj/k_norm on shared layers,
    and lm_head.weight equal to embed_tokens."""
    from safetensors.torch import load_file, save_file
    path = os.path.join(out, "model.safetensors")
    assert os.path.exists(path), "google_style needs a single-file save"
    sd = load_file(path)
    meta = {"format": "pt"}
    prefix = "model.language_model." if any(k.startswith("model.language_model.") for k in sd) else "model."
    g = torch.Generator().manual_seed(123)
    dt = sd[prefix + "embed_tokens.weight"].dtype
    # shapes from the source layer of the same type: layer j's k_proj/k_norm/v_proj (the first non-shared of that type)
    j = json.load(open(os.path.join(out, "config.json")))
    t = j.get("text_config", j)
    L, Ns = t["num_hidden_layers"], t["num_kv_shared_layers"]
    first = L - Ns
    for i in range(first, L):
        src = max(k for k in range(first) if t["layer_types"][k] == t["layer_types"][i])
        base = f"{prefix}layers.{i}.self_attn."
        for n in ("k_proj.weight", "v_proj.weight", "k_norm.weight"):
            s_name = f"{prefix}layers.{src}.self_attn.{n}"
            if s_name not in sd: continue
            shape = sd[s_name].shape
            val = (3.0 + torch.randn(shape, generator=g)) if "norm" in n else 0.5 * torch.randn(shape, generator=g)
            sd[base + n] = val.to(dt)  # garbage: must never be used
    sd["lm_head.weight"] = sd[prefix + "embed_tokens.weight"].clone()
    save_file(sd, path, metadata=meta)


if __name__ == "__main__":
    main()
