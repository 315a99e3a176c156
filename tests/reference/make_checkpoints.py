"""PyTorch checkpoints for tests/pytorch_checkpoint.rs, and the exact bytes our reader must find.

usage: make_checkpoints.py OUT_DIR [--vit-b]

Writes into OUT_DIR (all with torch.save unless said otherwise):
  module.pth          state_dict() of a small nn.Module: OrderedDict with `_metadata`,
                      parameters and buffers (BatchNorm running stats, int64 num_batches_tracked)
  module_f16.pth      the same state dict in float16 (to load into an f32 model)
  dtypes.pth          a plain dict: f64/f32/f16/bf16/i64/i32/i16/i8/u8/bool tensors, a 0-d tensor,
                      an empty tensor, a transposed (non-contiguous) view, two slices sharing one
                      storage at offsets, a step-2 slice, an expanded (stride 0) view, a Parameter
  dtypes_proto4.pth   the same dict with pickle protocol 4 (FRAME, MEMOIZE, SHORT_BINUNICODE...)
  nested.pth          {"model": module state dict, "epoch": 3, "optimizer": Adam state dict},
                      written through a BytesIO buffer, so its zip prefix is "archive"
  bigendian.pth       a dict of contiguous tensors rewritten with byteorder "big" and every
                      storage byte-swapped (what a big-endian machine writes)
  sam_tiny.pth        state_dict() of a small model built from segment_anything.modeling
  module.safetensors, dtypes.safetensors   the same tensors as safetensors
  evil_global.pth     a hand-written pickle calling os.system (would create OUT_DIR/pwned)
  evil_reduce.pth     a pickle made by pickle.dumps of an object reducing to os.system
  view_beyond.pth     a tensor view of 10 elements over a 4-element storage
  storage_lies.pth    a storage declared 1000 elements long whose entry holds 4
  legacy.pth          the pre-1.6 format (_use_new_zipfile_serialization=False), not supported
  expected.json       per file and tensor: dtype, shape, nbytes, crc32 and (when small) the hex
                      of the contiguous little-endian row-major bytes
With --vit-b also sam_vit_b.pth: segment_anything.build_sam_vit_b()'s state dict (~375 MB, the
official checkpoint's format), with its entries in expected.json and its parameter count.
"""
import collections
import io
import json
import os
import pickle
import sys
import types
import zipfile
import zlib
import importlib.util

import torch


def sam_modeling():
    """segment_anything.modeling without running the package __init__ (it imports torchvision
    for the predictor, which the model builders do not need)."""
    spec = importlib.util.find_spec("segment_anything")
    if spec is None:
        sys.exit("segment-anything is not installed (pip install segment-anything)")
    if "segment_anything" not in sys.modules:
        pkg = types.ModuleType("segment_anything")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["segment_anything"] = pkg
    import segment_anything.modeling as modeling
    import segment_anything.build_sam as build_sam
    return modeling, build_sam


def raw_bytes(t):
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def describe(sd):
    out = []
    for name, t in sd.items():
        b = raw_bytes(t)
        e = {"name": name, "dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
             "nbytes": len(b), "crc32": zlib.crc32(b)}
        if len(b) <= 4096:
            e["hex"] = b.hex()
        out.append(e)
    return out


def small_module():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2),
                            torch.nn.BatchNorm1d(2))
    m.train()
    m(torch.randn(5, 4))  # running stats and num_batches_tracked become non-trivial
    return m


def dtype_dict():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(10, generator=g)
    wide = torch.randn(3, 6, generator=g)
    d = {
        "f64": torch.randn(2, 3, generator=g, dtype=torch.float64),
        "f32": torch.randn(2, 3, generator=g),
        "f16": torch.randn(3, 2, generator=g).half(),
        "bf16": torch.randn(4, generator=g).bfloat16(),
        "i64": torch.tensor([[-(2 ** 40), 1], [7, 2 ** 62]], dtype=torch.int64),
        "i32": torch.tensor([-5, 2 ** 30], dtype=torch.int32),
        "i16": torch.tensor([-300, 300], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255, 7], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "transposed": torch.randn(3, 4, generator=g).t(),
        "slice_a": base[1:4],
        "slice_b": base[6:],
        "step2": wide[:, ::2],
        "expanded": torch.randn(3, 1, generator=g).expand(3, 4),
        "param": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
    }
    assert not d["transposed"].is_contiguous() and not d["step2"].is_contiguous()
    assert d["slice_a"].untyped_storage().data_ptr() == d["slice_b"].untyped_storage().data_ptr()
    return d


def write_zip(path, prefix, pickle_bytes, storages, byteorder="little"):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", pickle_bytes)
        z.writestr(f"{prefix}/byteorder", byteorder)
        for k, b in storages.items():
            z.writestr(f"{prefix}/data/{k}", b)
        z.writestr(f"{prefix}/version", "3\n")


class _Storage:
    """Stands for a storage in a hand-made pickle; becomes a persistent id."""

    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class _Rebuild:
    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def crafted_tensor_file(path, size, stride, declared_numel, real_numel):
    buf = io.BytesIO()
    t = _Rebuild(_Storage("0", declared_numel), 0, size, stride, False, collections.OrderedDict())
    _Pickler(buf, protocol=2).dump({"x": t})
    write_zip(path, "crafted", buf.getvalue(), {"0": torch.arange(real_numel, dtype=torch.float32).numpy().tobytes()})


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def bigendian_file(path, d):
    """torch.save of `d` (contiguous tensors, one storage each, keys in dict order), then every
    storage byte-swapped and the byteorder record set to "big"."""
    torch.save(d, path)
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    prefix = next(n for n in entries if n.endswith("/data.pkl"))[: -len("data.pkl")]
    out = {}
    for n, b in entries.items():
        if n == prefix + "byteorder":
            b = b"big"
        elif n.startswith(prefix + "data/"):
            t = list(d.values())[int(n[len(prefix + "data/"):])]
            es = t.element_size()
            assert len(b) == t.numel() * es
            b = b"".join(b[i:i + es][::-1] for i in range(0, len(b), es))
        out[n] = b
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for n, b in out.items():
            z.writestr(n, b)


def sam_tiny(modeling):
    from functools import partial
    torch.manual_seed(2)
    return modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(
            depth=2, embed_dim=32, img_size=64, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=2, patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=(1,), window_size=2, out_chans=16),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=16, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=4),
        mask_decoder=modeling.MaskDecoder(
            num_multimask_outputs=3,
            transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=16, mlp_dim=32, num_heads=2),
            transformer_dim=16, iou_head_depth=3, iou_head_hidden_dim=16),
    )


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    vit_b = "--vit-b" in sys.argv[2:]
    os.makedirs(out, exist_ok=True)
    from safetensors.torch import save_file

    expected = {}

    def save(name, obj, sd, **kw):
        torch.save(obj, os.path.join(out, name), **kw)
        expected[name] = describe(sd)

    module_sd = small_module().state_dict()
    assert hasattr(module_sd, "_metadata")
    save("module.pth", module_sd, module_sd)
    f16 = collections.OrderedDict(
        (k, v.half() if v.is_floating_point() else v) for k, v in module_sd.items())
    save("module_f16.pth", f16, f16)

    d = dtype_dict()
    save("dtypes.pth", d, d)
    save("dtypes_proto4.pth", d, d, pickle_protocol=4)

    model = small_module()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    nested = {"model": model.state_dict(), "epoch": 3, "optimizer": opt.state_dict()}
    buf = io.BytesIO()
    torch.save(nested, buf)
    with open(os.path.join(out, "nested.pth"), "wb") as f:
        f.write(buf.getvalue())
    with zipfile.ZipFile(os.path.join(out, "nested.pth")) as z:
        assert any(n.startswith("archive/") for n in z.namelist())
    expected["nested.pth"] = describe(model.state_dict())

    be = {k: d[k].contiguous().clone() for k in ("f64", "f32", "f16", "bf16", "i64", "i32", "i16", "bool")}
    bigendian_file(os.path.join(out, "bigendian.pth"), be)
    expected["bigendian.pth"] = describe(be)

    modeling, build_sam = sam_modeling()
    tiny = sam_tiny(modeling).state_dict()
    save("sam_tiny.pth", tiny, tiny)

    save_file({k: v.contiguous() for k, v in module_sd.items()}, os.path.join(out, "module.safetensors"),
              metadata={"format": "pt", "note": "module"})
    expected["module.safetensors"] = describe(module_sd)
    # safetensors refuses shared or non-contiguous tensors: give it dense copies
    dense = {k: v.detach().contiguous().clone() for k, v in d.items()}
    save_file(dense, os.path.join(out, "dtypes.safetensors"))
    # safetensors orders tensors by dtype alignment then name; compare by name on the Rust side
    expected["dtypes.safetensors"] = describe(dense)

    # Hostile files. The hand-written pickle is the classic one: GLOBAL 'os system'.
    pwned = os.path.join(out, "pwned")
    evil = b"\x80\x02cos\nsystem\nq\x00X" + len(f"touch {pwned}").to_bytes(4, "little") + \
        f"touch {pwned}".encode() + b"\x85R."
    write_zip(os.path.join(out, "evil_global.pth"), "evil_global", evil, {})
    write_zip(os.path.join(out, "evil_reduce.pth"), "evil_reduce",
              pickle.dumps({"x": _Evil(f"touch {pwned}")}, protocol=2), {})
    crafted_tensor_file(os.path.join(out, "view_beyond.pth"), (10,), (1,), 4, 4)
    crafted_tensor_file(os.path.join(out, "storage_lies.pth"), (4,), (1,), 1000, 4)
    torch.save(module_sd, os.path.join(out, "legacy.pth"), _use_new_zipfile_serialization=False)

    info = {}
    if vit_b:
        torch.manual_seed(3)
        sam = build_sam.build_sam_vit_b(checkpoint=None)
        sd = sam.state_dict()
        torch.save(sd, os.path.join(out, "sam_vit_b.pth"))
        expected["sam_vit_b.pth"] = describe(sd)
        info["vit_b_parameters"] = sum(p.numel() for p in sam.parameters())
        info["vit_b_state_dict_elements"] = sum(t.numel() for t in sd.values())

    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({"files": expected, "info": info}, f)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
