"""How long the Slicer module keeps Slicer's GUI thread, per path, for a 512x512x300 volume
(int16 image, 5-class result), with slicer-core's real MRML classes (no Qt).

"before": the one-shot calls the module made until this change (one call on the GUI thread).
"after": the same work as a steps.Task driven like the panel's QTimer: the numbers are the
longest single GUI-thread slice, the number of slices, and the longest stall the GUI thread saw
between two ticks beyond the 10 ms it slept (helper threads holding Python's GIL would show
there). Run: python scripts/bench_slicer_gui.py [--shape K J I] [--repeat N]
"""
import argparse
import json
import os
import struct
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "slicer_module" / "SFRSegmentation"))
sys.path.insert(0, str(ROOT / "tests" / "slicer"))  # the test phantoms

import numpy as np  # noqa: E402
import slicer  # noqa: E402

from SFRSegmentationLib import ModelRegistry, SFRLogic, nifti, steps  # noqa: E402
from SFRSegmentationLib import scene as sc  # noqa: E402
from conftest import oblique_matrix, organs  # noqa: E402


def matrix():
    return oblique_matrix(spacing=(0.8, 0.8, 1.5))


CLASSES = {0: "background", 1: "liver", 2: "spleen", 3: "kidney", 4: "pancreas", 5: "vessels"}


def once(f):
    t0 = time.perf_counter()
    r = f()
    return time.perf_counter() - t0, r


def drive(task):
    """Like the panel: a tick, then the event loop (here: a 10 ms sleep). Returns (longest
    slice, slices, longest stall, wall time); a stall is a slice plus however late the thread
    woke from its sleep (waiting for the GIL that a helper thread held)."""
    t0 = time.perf_counter()
    stall = 0.0
    while True:
        tick = time.perf_counter()
        more = task.step()
        if not more:
            stall = max(stall, time.perf_counter() - tick)
            break
        time.sleep(0.01)
        stall = max(stall, time.perf_counter() - tick - 0.01)
    task.take()
    return task.longest_slice, task.slices, stall, time.perf_counter() - t0


def gui_stall_during(function):
    """Runs function() on a helper thread while this thread ticks every 5 ms; returns (wall
    time, longest gap between ticks minus 5 ms): how long a GUI thread would wait for the GIL."""
    done = threading.Event()
    out = {}

    def run():
        out["r"] = function()
        done.set()

    t0 = time.perf_counter()
    threading.Thread(target=run, daemon=True).start()
    last, worst = time.perf_counter(), 0.0
    while not done.is_set():
        time.sleep(0.005)
        now = time.perf_counter()
        worst = max(worst, now - last - 0.005)
        last = now
    return time.perf_counter() - t0, worst


def _cli_found():
    try:
        SFRLogic(mode="worker").cli
        return True
    except Exception:
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], help="K J I")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--part", choices=["all", "scene", "files"], default="all",
                    help="scene: the GUI-thread paths; files: panel open, file reads and writes")
    args = ap.parse_args()
    shape = tuple(args.shape)
    m = matrix()
    rng = np.random.default_rng(1)
    image = rng.integers(-1000, 1000, size=shape, dtype=np.int16)
    labels = organs(shape)
    print(f"volume {shape[2]}x{shape[1]}x{shape[0]} ({np.prod(shape) / 1e6:.1f} M voxels), load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          f"median (max) of {args.repeat}; times in s")
    rows = []

    def row(path, before, after):
        rows.append((path, before, after))
        b = f"{statistics.median(before):.3f} ({max(before):.3f})" if before else "-"
        cols = list(zip(*after))
        longest, slices, stall, wall = (statistics.median(x) for x in cols)
        print(f"{path:<46} before {b:>14}   after: longest slice {longest:.3f} ({max(cols[0]):.3f}) in {slices:.0f} slices, "
              f"longest stall {stall:.3f} ({max(cols[2]):.3f}), wall {wall:.2f}", flush=True)

    if args.part in ("all", "scene"):
        # Segment: copying the input volume.
        before, after = [], []
        for _ in range(args.repeat):
            scene = slicer.vtkMRMLScene()
            volume = sc.add_volume(scene, image, m, "CT")
            before.append(once(lambda: sc.volume_array_and_matrix(volume))[0])
            after.append(drive(steps.Task(sc.volume_copy_steps(volume))))
            scene.Clear(1)
        row("Segment: copy the input volume", before, after)

        # Segment: the result into a new node, and again into that node (re-segmentation).
        for into in ("new node", "existing node"):
            before, after = [], []
            for _ in range(args.repeat):
                for mode in ("before", "after"):
                    scene = slicer.vtkMRMLScene()
                    volume = sc.add_volume(scene, image, m, "CT")
                    node = sc.apply_labels(labels[:, :, :], volume, CLASSES).segmentation_node if into == "existing node" else None

                    if mode == "before":
                        def oneshot():
                            dtype = np.uint8
                            img = slicer.vtkOrientedImageData()
                            img.ShallowCopy(sc._image_data(labels.astype(dtype, copy=False)))
                            mm = sc.vtk.vtkMatrix4x4()
                            volume.GetIJKToRASMatrix(mm)
                            img.SetImageToWorldMatrix(mm)
                            target = node or scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT SFR")
                            target.CreateDefaultDisplayNodes()
                            assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(img, target, "", "")
                            # and the per-class voxel counts the panel logged
                            return [int(np.count_nonzero(labels == c)) for c in range(1, 6)]

                        before.append(once(oneshot)[0])
                    else:
                        after.append(drive(steps.Task(sc.import_labels_steps(labels, volume, CLASSES, node))))
                    scene.Clear(1)
            row(f"Segment: add a 5-class result ({into})", before, after)

        # Train: gathering one labelled case (volume copy + segments read back as a label map).
        before, after = [], []
        for _ in range(args.repeat):
            scene = slicer.vtkMRMLScene()
            volume = sc.add_volume(scene, image, m, "CT")
            node = sc.apply_labels(labels, volume, CLASSES).segmentation_node
            names = [CLASSES[c] for c in range(1, 6)]
            seg = node.GetSegmentation()
            ids = list(seg.GetSegmentIDs())
            lut = np.array([0] + [names.index(seg.GetSegment(i).GetName()) + 1 for i in ids], dtype=np.uint8)
            t_copy = once(lambda: sc.volume_array_and_matrix(volume))[0]
            t_export = once(lambda: sc._export_with_slicer(volume, node, ids, lut, shape))[0]
            before.append(max(t_copy, t_export))  # two ticks: the copy, then the export
            collector = sc.TrainingCollector([(volume, node)], log=lambda s: None)
            after.append(drive(collector._task))
            scene.Clear(1)
        row("Train: gather a labelled case (2 ticks before)", before, after)

        # Undo of a 5-class result added to a node that holds another segment.
        before, after = [], []
        for _ in range(args.repeat):
            for mode in ("before", "after"):
                scene = slicer.vtkMRMLScene()
                volume = sc.add_volume(scene, image, m, "CT")
                node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
                sc.apply_labels((labels == 1).astype(np.uint8), volume, {1: "manual"}, node)
                result = sc.apply_labels(labels, volume, CLASSES, node)
                if mode == "before":
                    def oneshot():
                        for segment_id in result.segment_ids:
                            node.GetSegmentation().RemoveSegment(segment_id)
                    before.append(once(oneshot)[0])
                else:
                    after.append(drive(steps.Task(sc.undo_steps(result))))
                scene.Clear(1)
        row("Undo a 5-class result", before, after)

    if args.part in ("all", "files"):
        with tempfile.TemporaryDirectory() as d:
            # Opening the panel: the logic (file checks only) and the model list (headers only).
            folder = Path(d) / "models"
            folder.mkdir()
            meta = json.dumps({"format": "sfrmodel", "classes": CLASSES, "training": {"method": "mean-teacher"}})
            header = json.dumps({"__metadata__": {"sfr": meta}, "w": {"dtype": "F32", "shape": [5 * 2 ** 20], "data_offsets": [0, 20 * 2 ** 20]}}).encode()
            for n in range(20):
                with open(folder / f"model{n}.sfrmodel", "wb") as f:
                    f.write(struct.pack("<Q", len(header)) + header)
                    f.write(bytes(20 * 2 ** 20))
            os.sync()  # the files written above must not be flushed while the list is timed
            times = []
            for _ in range(args.repeat):
                t, _ = once(lambda: (SFRLogic(mode="worker").describe() if _cli_found() else None, ModelRegistry(folder).list()))
                times.append(t)
            print(f"{'Panel open: logic + list of 20 models (20 MB each)':<46} {statistics.median(times):.3f} ({max(times):.3f}) on the GUI thread")

            # Unlabelled folder: a NRRD file read by Slicer's reader on a helper thread.
            scene = slicer.vtkMRMLScene()
            volume = sc.add_volume(scene, image, m, "CT")
            for ext in ("nrrd", "mha"):
                writer = slicer.vtkMRMLVolumeArchetypeStorageNode()
                writer.SetFileName(str(Path(d) / f"v.{ext}"))
                writer.SetUseCompression(0)
                writer.WriteData(volume)
                wall, stall = gui_stall_during(lambda: sc.read_volume_file(str(Path(d) / f"v.{ext}")))
                print(f"{'Unlabelled folder: read a ' + ext.upper() + ' (helper thread)':<46} wall {wall:.3f}, longest GUI stall {stall:.3f}")
            scene.Clear(1)

        # Helper-thread work that must not hold the GIL long (it would stall the GUI thread).
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "image.nii"
            wall, stall = gui_stall_during(lambda: nifti.write(path, image, m))
            print(f"{'NIfTI write (helper thread)':<44} wall {wall:.3f}, longest GUI stall {stall:.3f}")
            wall, stall = gui_stall_during(lambda: nifti.read(path))
            print(f"{'NIfTI read (helper thread)':<44} wall {wall:.3f}, longest GUI stall {stall:.3f}")
            gz = Path(d) / "image.nii.gz"
            nifti.write(gz, image, m)
            wall, stall = gui_stall_during(lambda: nifti.read(gz))
            print(f"{'NIfTI .nii.gz read (helper thread)':<44} wall {wall:.3f}, longest GUI stall {stall:.3f}")
            wall, stall = gui_stall_during(lambda: sc.prepare_labels(labels, m))
            print(f"{'result scan + labelmap (helper thread)':<44} wall {wall:.3f}, longest GUI stall {stall:.3f}")


if __name__ == "__main__":
    main()
