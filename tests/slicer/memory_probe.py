"""Peak memory of gathering training data from a scene (issue 35, item 5), for a list of
synthetic cases, with each sink: ``TrainingData`` (keeps every case: in-process mode) and
``worker.DecathlonWriter`` (writes each case to a file as it arrives: worker mode, the
default). Used by tests/slicer/test_memory.py (small cases) and run by hand for the figure in
slicer_module/README.md:

    source scripts/env.sh && python tests/slicer/memory_probe.py --shape 300 512 512 --labeled 3 --unlabeled 2

Two numbers per sink: the peak of the module's own numpy allocations during the gathering
(tracemalloc; numpy reports its buffers to it; the scene's VTK memory is not counted), and
the process's peak resident memory before and after (``resource``'s ru_maxrss, where the
system has it: Linux and macOS; skipped with a message elsewhere)."""
import argparse
import gc
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1] / "slicer_module" / "SFRSegmentation"), str(HERE)]

import slicer  # noqa: E402

from SFRSegmentationLib import TrainingData, worker  # noqa: E402
from SFRSegmentationLib import scene as sc  # noqa: E402


def peak_rss_bytes():
    try:
        import resource
    except ImportError:
        return None
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


def build_scene(shape, n_labeled, n_unlabeled):
    scene = slicer.vtkMRMLScene()
    m = np.diag([0.8, 0.8, 1.5, 1.0])
    nk, nj, ni = shape
    pairs, unlabeled = [], []
    rng = np.random.default_rng(0)
    for n in range(n_labeled + n_unlabeled):
        image = rng.integers(-1000, 1000, size=shape, dtype=np.int16)
        v = sc.add_volume(scene, image, m, f"case{n}")
        del image
        if n < n_labeled:
            label = np.zeros(shape, np.uint8)
            label[nk // 4 : nk // 2, nj // 4 : 3 * nj // 4, ni // 4 : 3 * ni // 4] = 1
            label[nk // 2 : 3 * nk // 4, nj // 3 : nj // 2, ni // 2 : 3 * ni // 4] = 2
            s = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"labels{n}")
            sc.apply_labels(label, v, {1: "liver", 2: "spleen"}, s)
            del label
            pairs.append((v, s))
        else:
            unlabeled.append(v)
    return scene, pairs, unlabeled


def gather(pairs, unlabeled, sink_factory):
    gc.collect()
    tracemalloc.start()
    t0 = time.perf_counter()
    collector = sc.TrainingCollector(pairs, unlabeled, log=lambda m: None, sink_factory=sink_factory)
    collector.run()
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    sink = collector.result()
    return peak, seconds, sink


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], metavar=("K", "J", "I"))
    ap.add_argument("--labeled", type=int, default=3)
    ap.add_argument("--unlabeled", type=int, default=2)
    ap.add_argument("--sink", choices=["writer", "memory", "both"], default="both")
    a = ap.parse_args(argv)
    shape = tuple(a.shape)
    scene, pairs, unlabeled = build_scene(shape, a.labeled, a.unlabeled)
    voxels = int(np.prod(shape))
    out = {"shape_kji": shape, "labeled": a.labeled, "unlabeled": a.unlabeled,
           "case_bytes": {"image_int16": voxels * 2, "label_uint8": voxels},
           "all_cases_bytes": (a.labeled + a.unlabeled) * voxels * 2 + a.labeled * voxels,
           "peak_rss_after_scene": peak_rss_bytes()}
    with tempfile.TemporaryDirectory() as tmp:
        if a.sink in ("writer", "both"):
            peak, seconds, sink = gather(pairs, unlabeled, lambda classes: worker.DecathlonWriter(classes, tmp))
            out["writer"] = {"traced_peak": peak, "seconds": round(seconds, 2), "counts": sink.counts(),
                             "peak_rss_after": peak_rss_bytes()}
            sink.close()
        if a.sink in ("memory", "both"):
            peak, seconds, sink = gather(pairs, unlabeled, TrainingData)
            out["memory"] = {"traced_peak": peak, "seconds": round(seconds, 2), "counts": sink.counts(),
                             "peak_rss_after": peak_rss_bytes()}
            del sink
    if peak_rss_bytes() is None:
        out["note"] = "resource.getrusage is not available here: no resident-memory figure"
    scene.Clear(1)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
