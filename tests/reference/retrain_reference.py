"""Independent PyTorch reference of SFR's re-training loop (src/pipeline/retrain.rs, src/ssl/).

The loop of UA-MT / ACMT / SFR: a V-Net student (BatchNorm, Dropout3d 0.5 at the bottleneck and
before the head) sees a batch of `lb` labelled crops followed by unlabelled crops; the loss is
0.5·(CE + Dice) on the labelled part (+ the same on SAM pseudo-labels of the unlabelled part,
weight `pseudo_label_weight`) + the mean-teacher term: softmax-MSE between the student's and an
EMA teacher's prediction of the unlabelled crops plus clamp(N(0, σ²), ±c) noise, weight
`consistency · exp(-5(1-t)²)` with t = iteration / iterations_per_epoch / rampup_epochs (clipped);
SGD with momentum and weight decay; after each step the teacher's trainable weights become
α·teacher + (1-α)·student with α = min(1 - 1/(step+1), ema_decay). The teacher runs in training
mode (batch statistics, dropout), as in UA-MT.

This file shares no code with the Rust side except the V-Net architecture of
vnet_reference.py (itself checked against the paper's reference code).

Sub-commands:
  steps <dir>
      <dir>/config.json: {"lb", "steps", "lr": [per step], "momentum", "weight_decay",
      "method": "supervised"|"mean-teacher", "consistency", "rampup_epochs",
      "iterations_per_epoch", "ema_decay", "noise_std", "noise_clamp", "dropout", "seed",
      "batchnorm": "joint"|"separate" (one student forward of the whole batch, or one of the
      labelled crops and one of the unlabelled),
      "n_filters", "num_classes", "threads"}; <dir>/init.safetensors (student state dict);
      <dir>/batches.safetensors (x0.., y0.. for each step). Runs the steps with
      torch.manual_seed(seed) (so dropout masks and noise come from the same generator as
      libtorch's in the Rust run when both draw in the same order) and writes losses.json,
      grads0.safetensors (student gradients after the first backward), student0.safetensors
      (the student after the first update), student.safetensors,
      teacher.safetensors (mean teacher only).
  train <data_dir> <out.json> [options]
      a whole run on a Decathlon folder (hippocampus): first --labeled cases labelled, the next
      --unlabeled unlabelled (labels never read), cases [--test-from, --test-to) for testing;
      per-volume z-score, pad to the patch with 0, random crops (no rot/flip), poly LR; then
      sliding-window inference (mean of softmax over windows) and Dice per class on the test
      cases. Options: --method supervised|mean-teacher, --consistency W, --iterations N,
      --seed S, --threads T, --n-filters F, --patch X,Y,Z, --unlabeled-batch U (0 = labelled
      crops only), --stride X,Y,Z, --optimizer sgd|adam, --lr L (0.01), --dropout P (0.5).
  evaluate <model.sfrmodel> <data_dir> [--bn keep|labeled|mixed|unlabeled|batch] [--batches N]
      Dice of a model written by `sfr train` on the test cases, with its own BatchNorm
      statistics or with them re-estimated (cumulative average over N batches of random crops
      of that kind, weights unchanged), or `batch`: each window normalised by its own statistics
      as in training: the bisection of the BatchNorm question.

The EMA uses `lerp_` (t + (1-α)(s - t)), as the Rust side does; UA-MT's `mul_(α).add_(s, 1-α)`
is the same up to rounding (measured: 7.4e-5 relative on one teacher running mean after 4
steps; with `lerp_` on both sides every tensor is bit-identical).
"""
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vnet_reference import VNet  # noqa: E402

SMOOTH = 1e-5


def dice_loss(probs, target, num_classes):
    """UA-MT's soft Dice, averaged over the foreground classes."""
    total = 0.0
    for k in range(1, num_classes):
        p = probs[:, k]
        t = (target == k).float()
        inter = (p * t).sum()
        total = total + 1.0 - (2 * inter + SMOOTH) / ((p * p).sum() + (t * t).sum() + SMOOTH)
    return total / (num_classes - 1)


def ce_dice(logits, target, num_classes):
    ce = F.cross_entropy(logits, target)
    return 0.5 * (ce + dice_loss(F.softmax(logits, dim=1), target, num_classes))


def consistency_weight(cfg, it):
    length = cfg["rampup_epochs"]
    epoch = it / max(cfg["iterations_per_epoch"], 1)
    t = 1.0 if length <= 0 else min(max(epoch / length, 0.0), 1.0)
    return cfg["consistency"] * math.exp(-5.0 * (1.0 - t) ** 2)


class Loop:
    """The student, the optimiser and (for mean teacher) the EMA teacher."""

    def __init__(self, cfg, init_state=None):
        self.cfg = cfg
        kw = dict(n_channels=1, n_classes=cfg["num_classes"], n_filters=cfg["n_filters"],
                  has_dropout=cfg["dropout"] > 0, dropout_p=max(cfg["dropout"], 1e-12))
        self.student = VNet(**kw)
        if init_state is not None:
            self.student.load_state_dict(init_state, strict=True)
        self.student.train()
        self.teacher = None
        if cfg["method"] == "mean-teacher":
            self.teacher = VNet(**kw)
            self.teacher.load_state_dict(self.student.state_dict(), strict=True)
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            self.teacher.train()
        if cfg.get("optimizer", "sgd") == "adam":
            self.opt = torch.optim.Adam(self.student.parameters(), lr=cfg["lr0"], weight_decay=cfg["weight_decay"])
        else:
            self.opt = torch.optim.SGD(self.student.parameters(), lr=cfg["lr0"], momentum=cfg["momentum"],
                                       weight_decay=cfg["weight_decay"])
        self.ema_steps = 0

    def step(self, x, y, it, lr, pseudo=None):
        cfg = self.cfg
        lb = y.shape[0]
        for g in self.opt.param_groups:
            g["lr"] = lr
        if cfg.get("batchnorm", "joint") == "separate" and x.shape[0] > lb:
            # two forwards: BatchNorm statistics of the labelled crops alone, then of the rest
            logits = torch.cat([self.student(x[:lb]), self.student(x[lb:])], 0)
        else:
            logits = self.student(x)
        loss = ce_dice(logits[:lb], y, cfg["num_classes"])
        if x.shape[0] > lb:
            unl_logits = logits[lb:]
            if pseudo is not None:
                loss = loss + cfg.get("pseudo_label_weight", 1.0) * ce_dice(unl_logits, pseudo, cfg["num_classes"])
            if self.teacher is not None:
                w = consistency_weight(cfg, it)
                unl = x[lb:]
                noise = torch.clamp(torch.randn_like(unl) * cfg["noise_std"], -cfg["noise_clamp"], cfg["noise_clamp"])
                with torch.no_grad():
                    t_probs = F.softmax(self.teacher(unl + noise), dim=1)
                s_probs = F.softmax(unl_logits, dim=1)
                loss = loss + w * ((s_probs - t_probs) ** 2).mean()
        self.opt.zero_grad()
        loss.backward()
        grads = {k: p.grad.detach().clone() for k, p in self.student.named_parameters()}
        self.opt.step()
        if self.teacher is not None:
            alpha = min(1.0 - 1.0 / (self.ema_steps + 1.0), cfg["ema_decay"])
            self.ema_steps += 1
            with torch.no_grad():
                for t, s in zip(self.teacher.parameters(), self.student.parameters()):
                    t.lerp_(s, 1.0 - alpha)
        return loss.item(), grads


def state(model):
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def steps(d):
    cfg = json.load(open(os.path.join(d, "config.json")))
    torch.set_num_threads(cfg.get("threads", 1))
    cfg["lr0"] = cfg["lr"][0]
    batches = load_file(os.path.join(d, "batches.safetensors"))
    loop = Loop(cfg, load_file(os.path.join(d, "init.safetensors")))
    torch.manual_seed(cfg["seed"])
    losses = []
    for i in range(cfg["steps"]):
        loss, grads = loop.step(batches[f"x{i}"], batches[f"y{i}"].long(), i, cfg["lr"][i])
        losses.append(loss)
        if i == 0:
            save_file(grads, os.path.join(d, "grads0.safetensors"))
            save_file(state(loop.student), os.path.join(d, "student0.safetensors"))
    json.dump(losses, open(os.path.join(d, "losses.json"), "w"))
    save_file(state(loop.student), os.path.join(d, "student.safetensors"))
    if loop.teacher is not None:
        save_file(state(loop.teacher), os.path.join(d, "teacher.safetensors"))


# ---- whole runs on a Decathlon folder ------------------------------------------------------

def load_cases(data_dir):
    import nibabel as nib
    meta = json.load(open(os.path.join(data_dir, "dataset.json")))
    cases = []
    for t in meta["training"]:
        img = os.path.join(data_dir, t["image"])
        lab = os.path.join(data_dir, t["label"])
        cases.append((img, lab))
    num_classes = max(int(k) for k in meta["labels"]) + 1
    return cases, num_classes, nib


def read_zyx(nib, path, dtype):
    # nibabel gives [i, j, k]; the loop works in [k, j, i] like the Rust side
    a = np.asarray(nib.load(path).dataobj).astype(dtype)
    return np.ascontiguousarray(a.transpose(2, 1, 0))


def zscore(a):
    a = a.astype(np.float64)
    s = a.std()
    return ((a - a.mean()) / s).astype(np.float32) if s > 1e-8 * max(abs(a.mean()), 1) else np.zeros_like(a, np.float32)


def pad_to(a, patch, value):
    new = [max(s, p) for s, p in zip(a.shape, patch)]
    if list(a.shape) == new:
        return a
    b = [(n - s) // 2 for n, s in zip(new, a.shape)]
    out = np.full(new, value, a.dtype)
    out[b[0]:b[0] + a.shape[0], b[1]:b[1] + a.shape[1], b[2]:b[2] + a.shape[2]] = a
    return out


def crop(rng, img, lab, patch):
    img = pad_to(img, patch, 0.0)
    c = [rng.integers(0, s - p + 1) for s, p in zip(img.shape, patch)]
    sl = tuple(slice(c[a], c[a] + patch[a]) for a in range(3))
    out_lab = pad_to(lab, patch, 0)[sl] if lab is not None else None
    return img[sl], out_lab


def sliding_window(model, img, patch, stride, num_classes):
    padded = pad_to(img, patch, 0.0)
    shape = padded.shape
    starts = []
    for a in range(3):
        n = max(math.ceil((shape[a] - patch[a]) / stride[a]), 0) + 1
        starts.append(sorted({min(i * stride[a], shape[a] - patch[a]) for i in range(n)}))
    acc = np.zeros((num_classes,) + shape, np.float32)
    cnt = np.zeros(shape, np.float32)
    with torch.no_grad():
        for z in starts[0]:
            for yy in starts[1]:
                for x in starts[2]:
                    sl = (slice(z, z + patch[0]), slice(yy, yy + patch[1]), slice(x, x + patch[2]))
                    t = torch.from_numpy(np.ascontiguousarray(padded[sl]))[None, None]
                    p = F.softmax(model(t), dim=1)[0].numpy()
                    acc[(slice(None),) + sl] += p
                    cnt[sl] += 1
    lab = (acc / cnt).argmax(0)
    b = [(s - o) // 2 for s, o in zip(shape, img.shape)]
    return lab[b[0]:b[0] + img.shape[0], b[1]:b[1] + img.shape[1], b[2]:b[2] + img.shape[2]]


def dice(pred, ref, c):
    p, r = pred == c, ref == c
    if not p.any() and not r.any():
        return 1.0
    return 2.0 * (p & r).sum() / (p.sum() + r.sum())


def train(data_dir, out_json, opts):
    torch.set_num_threads(int(opts.get("threads", 2)))
    seed = int(opts.get("seed", 2026))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    patch_xyz = [int(v) for v in opts.get("patch", "32,48,32").split(",")]
    patch = patch_xyz[::-1]
    stride = [int(v) for v in opts.get("stride", "16,24,16").split(",")][::-1]
    n_lab, n_unl = int(opts.get("labeled", 4)), int(opts.get("unlabeled", 146))
    test_from, test_to = int(opts.get("test_from", 150)), int(opts.get("test_to", 200))
    iters = int(opts.get("iterations", 2000))
    ub = int(opts.get("unlabeled_batch", 2))
    cases, num_classes, nib = load_cases(data_dir)
    labeled = [(zscore(read_zyx(nib, i, np.float32)), read_zyx(nib, l, np.int64)) for i, l in cases[:n_lab]]
    unlabeled = [zscore(read_zyx(nib, i, np.float32)) for i, _ in cases[n_lab:n_lab + n_unl]]
    lr0 = float(opts.get("lr", 0.01))
    cfg = dict(num_classes=num_classes, n_filters=int(opts.get("n_filters", 8)), dropout=float(opts.get("dropout", 0.5)),
               method=opts.get("method", "supervised"), consistency=float(opts.get("consistency", 0.1)),
               rampup_epochs=40.0, iterations_per_epoch=50, ema_decay=0.99, noise_std=0.1, noise_clamp=0.2,
               momentum=0.9, weight_decay=1e-4, lr0=lr0, optimizer=opts.get("optimizer", "sgd"))
    loop = Loop(cfg)
    t0 = time.time()
    for it in range(iters):
        lr = lr0 * (1.0 - it / iters) ** 0.9
        xs, ys = [], []
        for _ in range(2):
            img, lab = labeled[rng.integers(len(labeled))]
            ci, cl = crop(rng, img, lab, patch)
            xs.append(ci)
            ys.append(cl)
        if ub > 0 and unlabeled:
            for _ in range(ub):
                ci, _ = crop(rng, unlabeled[rng.integers(len(unlabeled))], None, patch)
                xs.append(ci)
        x = torch.from_numpy(np.stack(xs))[:, None]
        y = torch.from_numpy(np.stack(ys))
        loss, _ = loop.step(x, y, it, lr)
        if (it + 1) % max(iters // 10, 1) == 0:
            print(f"[reference] iteration {it + 1}/{iters} loss {loss:.4f} ({time.time() - t0:.0f} s)", file=sys.stderr)
    train_s = time.time() - t0
    loop.student.eval()
    per_class = {c: [] for c in range(1, num_classes)}
    for i, l in cases[test_from:test_to]:
        img = zscore(read_zyx(nib, i, np.float32))
        ref = read_zyx(nib, l, np.int64)
        pred = sliding_window(loop.student, img, patch, stride, num_classes)
        for c in per_class:
            per_class[c].append(dice(pred, ref, c))
    out = {"opts": opts, "train_s": train_s,
           "dice_mean": {str(c): float(np.mean(v)) for c, v in per_class.items()},
           "dice_std": {str(c): float(np.std(v)) for c, v in per_class.items()}}
    json.dump(out, open(out_json, "w"), indent=1)
    print(json.dumps(out))


def evaluate(model_path, data_dir, opts):
    """Dice of a .sfrmodel's V-Net on the test cases, optionally after recalibrating its
    BatchNorm running statistics (the bisection of the mixed-batch question): `--bn keep` uses
    the file's statistics, `labeled` / `mixed` / `unlabeled` re-estimate them (cumulative
    average, weights unchanged) from N random crops of that kind, in batches like training."""
    from safetensors import safe_open
    torch.set_num_threads(int(opts.get("threads", 2)))
    with safe_open(model_path, "pt") as f:
        meta = json.loads(f.metadata()["sfr"])
    sd = load_file(model_path)
    cases, num_classes, nib = load_cases(data_dir)
    model = VNet(n_channels=1, n_classes=num_classes, n_filters=meta["vnet"]["n_filters"])
    model.load_state_dict(sd, strict=True)
    patch = meta["patch"][::-1]
    stride = meta["inference"]["stride"][::-1]
    bn = opts.get("bn", "keep")
    if bn not in ("keep", "batch", "train"):
        rng = np.random.default_rng(int(opts.get("seed", 1)))
        n_lab, n_unl = int(opts.get("labeled", 4)), int(opts.get("unlabeled", 146))
        lab = [zscore(read_zyx(nib, i, np.float32)) for i, _ in cases[:n_lab]]
        unl = [zscore(read_zyx(nib, i, np.float32)) for i, _ in cases[n_lab:n_lab + n_unl]]
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over all batches
        model.train()
        model.has_dropout = False  # dropout off while estimating (train-mode BatchNorm only)
        with torch.no_grad():
            for _ in range(int(opts.get("batches", 50))):
                xs = []
                for kind in {"labeled": "llll", "mixed": "lluu", "unlabeled": "uuuu"}[bn]:
                    pool = lab if kind == "l" else unl
                    xs.append(crop(rng, pool[rng.integers(len(pool))], None, patch)[0])
                model(torch.from_numpy(np.stack(xs))[:, None])
    model.eval()
    if bn in ("batch", "train"):
        # BatchNorm with the statistics of each window (as in training); dropout off, or on
        # for `train` (the whole training-mode network)
        model.has_dropout = bn == "train"
        if bn == "train":
            model.dropout.train()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.train()
    test_from, test_to = int(opts.get("test_from", 150)), int(opts.get("test_to", 200))
    per_class = {c: [] for c in range(1, num_classes)}
    for i, l in cases[test_from:test_to]:
        img = zscore(read_zyx(nib, i, np.float32))
        ref = read_zyx(nib, l, np.int64)
        pred = sliding_window(model, img, patch, stride, num_classes)
        for c in per_class:
            per_class[c].append(dice(pred, ref, c))
    out = {"model": model_path, "bn": bn, "dice_mean": {str(c): float(np.mean(v)) for c, v in per_class.items()}}
    print(json.dumps(out))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "steps":
        steps(sys.argv[2])
    elif cmd == "train":
        rest = sys.argv[4:]
        opts = {rest[i].lstrip("-").replace("-", "_"): rest[i + 1] for i in range(0, len(rest), 2)}
        train(sys.argv[2], sys.argv[3], opts)
    elif cmd == "evaluate":
        rest = sys.argv[4:]
        opts = {rest[i].lstrip("-").replace("-", "_"): rest[i + 1] for i in range(0, len(rest), 2)}
        evaluate(sys.argv[2], sys.argv[3], opts)
    else:
        sys.exit(f"unknown command {cmd}")
