"""Reference outputs of the official `segment-anything` SAM for tests/sam_parity.rs.

For one configuration (`tiny` or `vit_b`) this script:
1. builds the official model with the checkpoint's shape (the official 3 multimask outputs, image
   size `--ckpt-size`), re-initialises every tensor under `--seed` (zero-initialised ones such as
   rel_pos and pos_embed included, so that every term of the forward pass matters), and saves its
   state dict with `torch.save` (`checkpoint.pth`) and as `checkpoint.safetensors`;
2. builds the per-class model SFR uses (`num_multimask_outputs = num_classes`, image size
   `--image-size`) and loads the checkpoint the way SAMed's `load_from` does: the absolute position
   embedding is resized bilinearly (align_corners=False) and the relative position tables of the
   global-attention blocks are resized bilinearly along their length; decoder tensors of the mask
   tokens, hypernetwork MLPs and IoU head are not taken from the checkpoint when the class count
   differs. Those decoder tensors get seeded random values, saved in `decoder_overrides.safetensors`
   so that the Rust side can put the same values in;
3. runs a seeded input batch through `image_encoder` and then, image by image as `Sam.forward`
   does, through the prompt encoder without prompts and the mask decoder, keeping every mask token
   (SAMed's per-class output: token 0 = background, token c = class c), and saves
   `outputs.safetensors`: input, image embedding, low-res logits, IoU predictions, and the
   adapted pos_embed / rel_pos tables for a direct check of the resizing.

The official SAM package imports torchvision at the top of the package for its predictor; only
`segment_anything.modeling` is needed here, so the package is entered without running its
`__init__`.
"""
import argparse
import importlib.util
import json
import os
import sys
import time
import types
from functools import partial

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

spec = importlib.util.find_spec("segment_anything")
if spec is None:
    sys.exit("segment-anything is not installed (pip install segment-anything)")
pkg = types.ModuleType("segment_anything")
pkg.__path__ = list(spec.submodule_search_locations)
sys.modules["segment_anything"] = pkg
from segment_anything.modeling import (  # noqa: E402
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

# Same numbers as SamConfig::vit_b() / SamConfig::tiny() in src/nn/sam/mod.rs.
CONFIGS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn=(2, 5, 8, 11), window=14,
                  prompt_dim=256, mask_in_chans=16, dec_depth=2, dec_mlp=2048, dec_heads=8,
                  iou_hidden=256),
    "tiny": dict(embed_dim=64, depth=4, num_heads=2, global_attn=(1, 3), window=3,
                 prompt_dim=32, mask_in_chans=16, dec_depth=2, dec_mlp=64, dec_heads=2,
                 iou_hidden=32),
}
PATCH = 16


def build(c, image_size, num_multimask_outputs):
    grid = image_size // PATCH
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=c["depth"], embed_dim=c["embed_dim"], img_size=image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=c["num_heads"],
            patch_size=PATCH, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=c["global_attn"], window_size=c["window"],
            out_chans=c["prompt_dim"]),
        prompt_encoder=PromptEncoder(
            embed_dim=c["prompt_dim"], image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size), mask_in_chans=c["mask_in_chans"]),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=num_multimask_outputs,
            transformer=TwoWayTransformer(depth=c["dec_depth"], embedding_dim=c["prompt_dim"],
                                          mlp_dim=c["dec_mlp"], num_heads=c["dec_heads"]),
            transformer_dim=c["prompt_dim"], iou_head_depth=3,
            iou_head_hidden_dim=c["iou_hidden"]),
    ).eval()


def randomise(tensors):
    """Seeded values for every tensor: norms near 1, everything else small noise at a scale
    that keeps activations O(1) through the blocks."""
    with torch.no_grad():
        for name, t in tensors:
            if name.endswith("positional_encoding_gaussian_matrix"):
                t.copy_(torch.randn_like(t))
            elif t.dim() == 1 and ("norm" in name or "neck.1" in name or "neck.3" in name
                                   or "upscaling.1" in name or "downscaling.1" in name
                                   or "downscaling.4" in name) and name.endswith("weight"):
                t.copy_(1.0 + 0.1 * torch.randn_like(t))
            elif t.dim() == 1:
                t.copy_(0.1 * torch.randn_like(t))
            elif "rel_pos" in name:
                t.copy_(0.5 * torch.randn_like(t))
            elif name.endswith(("pos_embed", "iou_token.weight", "mask_tokens.weight",
                                "no_mask_embed.weight")):
                t.copy_(0.5 * torch.randn_like(t))
            else:
                fan_in = t[0].numel()
                t.copy_(torch.randn_like(t) / fan_in ** 0.5)


DECODER_GROUPS = ("mask_tokens", "output_hypernetworks_mlps", "iou_prediction_head")


def samed_load(model, ckpt, c, image_size):
    """SAMed's `load_from`, with the global blocks picked by index rather than by digits in the
    key (SAMed's string test only works for vit_b)."""
    own = model.state_dict()
    new = {k: v.clone() for k, v in ckpt.items()
           if k in own and not any(g in k for g in DECODER_GROUPS)}
    token = image_size // PATCH
    pos = new["image_encoder.pos_embed"]
    if pos.shape[1] != token:
        pos = F.interpolate(pos.permute(0, 3, 1, 2), (token, token), mode="bilinear",
                            align_corners=False).permute(0, 2, 3, 1)
        new["image_encoder.pos_embed"] = pos
        for i in c["global_attn"]:
            for hw in ("h", "w"):
                k = f"image_encoder.blocks.{i}.attn.rel_pos_{hw}"
                t = new[k]
                t = F.interpolate(t[None, None], (token * 2 - 1, t.shape[1]), mode="bilinear",
                                  align_corners=False)
                new[k] = t[0, 0]
    own.update(new)
    model.load_state_dict(own)
    return [k for k in own if any(g in k for g in DECODER_GROUPS)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=sorted(CONFIGS), required=True)
    ap.add_argument("--ckpt-size", type=int, required=True)
    ap.add_argument("--image-size", type=int, required=True)
    ap.add_argument("--num-classes", type=int, required=True)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-safetensors-checkpoint", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    c = CONFIGS[a.config]
    torch.manual_seed(a.seed)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    os.makedirs(a.out, exist_ok=True)

    # 1. The "official" checkpoint: 3 multimask outputs, pretraining image size.
    official = build(c, a.ckpt_size, 3)
    n_params = sum(p.numel() for p in official.parameters())
    sd = official.state_dict()
    randomise(list(sd.items()))
    torch.save(sd, os.path.join(a.out, "checkpoint.pth"))
    if not a.no_safetensors_checkpoint:
        save_file({k: v.contiguous() for k, v in sd.items()},
                  os.path.join(a.out, "checkpoint.safetensors"))

    # 2. The per-class model, loaded SAMed's way; decoder heads get seeded new values.
    model = build(c, a.image_size, a.num_classes)
    reinit = samed_load(model, sd, c, a.image_size)
    own = model.state_dict()
    overrides = {k: own[k] for k in reinit}
    randomise(list(overrides.items()))
    save_file({k: v.contiguous() for k, v in overrides.items()},
              os.path.join(a.out, "decoder_overrides.safetensors"))

    # 3. Forward pass without prompts, every mask token kept.
    x = torch.randn(a.batch, 3, a.image_size, a.image_size)
    t0 = time.perf_counter()
    with torch.no_grad():
        emb = model.image_encoder(x)
        logits, ious = [], []
        for b in range(a.batch):
            sparse, dense = model.prompt_encoder(points=None, boxes=None, masks=None)
            m, q = model.mask_decoder.predict_masks(
                image_embeddings=emb[b:b + 1], image_pe=model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
            logits.append(m)
            ious.append(q)
        logits = torch.cat(logits)
        ious = torch.cat(ious)
        forward_seconds = time.perf_counter() - t0
        dense_pe = model.prompt_encoder.get_dense_pe()
    out = {"input": x, "image_embedding": emb, "low_res_logits": logits,
           "iou_predictions": ious, "dense_pe": dense_pe,
           "pos_embed": model.image_encoder.pos_embed.detach()}
    for i in c["global_attn"]:
        for hw in ("h", "w"):
            k = f"image_encoder.blocks.{i}.attn.rel_pos_{hw}"
            out[k] = own[k]
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(a.out, "outputs.safetensors"))
    print(json.dumps({"official_parameters": n_params, "reinitialised": reinit,
                      "state_dict_keys": len(sd), "forward_seconds": forward_seconds,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
