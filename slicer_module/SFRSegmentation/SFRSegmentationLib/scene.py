"""The MRML side of the module: volumes to arrays with their geometry, segmentations to label
maps, results into segmentation nodes (class names and colours, existing segments untouched),
undo, and node bookkeeping that survives Close Scene.

No Qt here: this file imports ``slicer`` (only its MRML / segmentation classes) and ``vtk``,
which Slicer's Python and the ``slicer-core`` package (Slicer's MRML libraries, headless) both
provide, so tests/slicer/test_scene.py runs it against the real vtkMRMLScene,
vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode and vtkSlicerSegmentationsModuleLogic.
Nodes are passed in; their scene is the node's own (``node.GetScene()``), never a global.

Nodes are held by reference, not by ID: ``vtkMRMLScene::Clear`` (Close Scene) reuses IDs, so
an ID kept across a scene close can name a new, unrelated node. A node removed from its scene
(or whose scene was closed) has ``GetScene() is None``; ``in_scene`` checks exactly that.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from . import nifti
from .inputs import InputError, TrainingData, check_memory

# A segmentation node created for a result carries this attribute and a reference (role below)
# to the volume it segments: the output selector proposes it again only for that volume.
RESULT_ATTRIBUTE = "SFRSegmentation.Result"
SOURCE_VOLUME_ROLE = "SFRSegmentationSourceVolume"

# Colours when the class name is not in a colour table of the scene: entries 1-10 of Slicer's
# GenericAnatomyColors (tissue, bone, skin, connective tissue, blood, organ, mass, muscle,
# foreign object, waste), so results look like Slicer's own label maps.
PALETTE = [
    (128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (216, 101, 79),
    (221, 130, 101), (144, 238, 144), (192, 104, 88), (220, 245, 20), (78, 63, 0),
]
COLOR_TABLES = ("GenericAnatomyColors",)

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _segmentations_logic():
    return slicer.vtkSlicerSegmentationsModuleLogic


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or a.GetAddressAsString("vtkObject") == b.GetAddressAsString("vtkObject")


def in_scene(node, scene=None) -> bool:
    """True when ``node`` is still in a scene (``scene``, when given): False after it was
    removed or its scene was closed."""
    if node is None or node.GetScene() is None:
        return False
    return scene is None or _same(node.GetScene(), scene)


def _name(node) -> str:
    return node.GetName() if node is not None else "(none)"


def require_untransformed(node, what: str = "") -> None:
    if node.GetParentTransformNode() is not None:
        raise InputError(
            f"{what or repr(_name(node))} is under a transform ('{node.GetParentTransformNode().GetName()}'): "
            "harden the transform first (Data module, right-click > Harden transform), so that voxels and geometry agree"
        )


# ---------------------------------------------------------------------------------------------
# Volumes


def volume_matrix(volume_node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def volume_array(volume_node, copy: bool = True) -> np.ndarray:
    """Voxels ``[k, j, i]`` (``slicer.util.arrayFromVolume``'s order). ``copy=False`` gives a
    view of the node's memory: valid only while the node keeps that image."""
    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"'{_name(volume_node)}' has no voxels")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(
            f"'{_name(volume_node)}' has {image.GetNumberOfScalarComponents()} components per voxel "
            "(a vector or RGB volume): use a scalar volume"
        )
    i, j, k = image.GetDimensions()
    a = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k, j, i)
    if not copy:
        return a
    check_memory(a.nbytes, f"copying '{_name(volume_node)}'", "close other data or use fewer or smaller volumes")
    return a.copy()


def volume_array_and_matrix(volume_node, copy: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """A volume's voxels ``[k, j, i]`` and its IJK-to-RAS matrix (oblique included). A volume
    under a transform is refused: its voxels and matrix would not say where it is."""
    if volume_node is None or not in_scene(volume_node):
        raise InputError(f"the volume '{_name(volume_node)}' is no longer in the scene")
    require_untransformed(volume_node)
    return volume_array(volume_node, copy), volume_matrix(volume_node)


def _image_data(array: np.ndarray) -> vtk.vtkImageData:
    a = np.ascontiguousarray(array)
    k, j, i = a.shape
    image = vtk.vtkImageData()
    image.SetDimensions(i, j, k)
    image.AllocateScalars(numpy_support.get_vtk_array_type(a.dtype), 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(a.shape)[:] = a
    return image


def add_volume(scene, array: np.ndarray, ijk_to_ras, name: str, class_name: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node with the voxels ``[k, j, i]`` (copied) and the IJK-to-RAS matrix."""
    node = scene.AddNewNodeByClass(class_name, name)
    set_volume(node, array, ijk_to_ras)
    return node


def set_volume(node, array: np.ndarray, ijk_to_ras) -> None:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(np.asarray(ijk_to_ras)[r, c]))
    node.SetIJKToRASMatrix(m)
    node.SetAndObserveImageData(_image_data(np.asarray(array)))


# ---------------------------------------------------------------------------------------------
# Segmentations -> label maps


def segment_names(segmentation_node) -> List[str]:
    s = segmentation_node.GetSegmentation()
    return [s.GetSegment(i).GetName() for i in s.GetSegmentIDs()]


def class_names_of(pairs) -> List[str]:
    """Class names from the segments of the labelled cases (by name, first appearance)."""
    names: List[str] = []
    for _volume, segmentation in pairs:
        for name in segment_names(segmentation):
            if name not in names:
                names.append(name)
    return names


def _remove_with_display(scene, node, keep_ids) -> None:
    """Removes a temporary node and the display and colour nodes that came with it."""
    extra = []
    display = node.GetDisplayNode() if hasattr(node, "GetDisplayNode") else None
    if display is not None:
        extra.append(display)
        color = display.GetColorNode() if hasattr(display, "GetColorNode") else None
        if color is not None and color.GetID() not in keep_ids:
            extra.append(color)
    scene.RemoveNode(node)
    for n in extra:
        if n.GetScene() is not None:
            scene.RemoveNode(n)


def export_label(volume_node, segmentation_node, class_names: Sequence[str]) -> Tuple[np.ndarray, List[str]]:
    """The segments of ``segmentation_node`` as one label map on ``volume_node``'s grid
    (``[k, j, i]``; a segment named ``class_names[c - 1]`` gets value c; where segments overlap,
    the later one wins), and the class names this case has no segment for. One Slicer call
    (ExportSegmentsToLabelmapNode) exports all segments, resampled to the volume's grid when
    the segmentation has another geometry. Temporary nodes are removed, also on failure."""
    require_untransformed(segmentation_node)
    require_untransformed(volume_node)
    scene = volume_node.GetScene()
    dtype = np.uint8 if len(class_names) < 256 else np.uint16
    shape = volume_array(volume_node, copy=False).shape
    segmentation = segmentation_node.GetSegmentation()
    ids = list(segmentation.GetSegmentIDs())
    present = [segmentation.GetSegment(i).GetName() for i in ids]
    missing = [n for n in class_names if n not in present]
    if not ids:
        return np.zeros(shape, dtype=dtype), missing
    lut = np.zeros(len(ids) + 1, dtype=dtype)
    for n, name in enumerate(present):
        if name not in class_names:
            raise InputError(f"segment '{name}' of '{_name(segmentation_node)}' is not one of the classes {list(class_names)}")
        lut[n + 1] = list(class_names).index(name) + 1
    colors_before = {scene.GetNthNodeByClass(i, "vtkMRMLColorNode").GetID() for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorNode"))}
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "SFR export (temporary)")
    try:
        ok = _segmentations_logic().ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, volume_node)
        if not ok or labelmap.GetImageData() is None:
            raise InputError(f"Slicer could not export the segments of '{_name(segmentation_node)}' on the grid of '{_name(volume_node)}'")
        exported = volume_array(labelmap, copy=False)
        if exported.shape != shape:
            raise InputError(
                f"the segments of '{_name(segmentation_node)}' exported on '{_name(volume_node)}' have shape "
                f"{exported.shape}, the volume {shape}"
            )
        # Exported values are positions in `ids` (1-based): map them to class indices.
        label = lut[exported]
    finally:
        _remove_with_display(scene, labelmap, colors_before)
    return label, missing


# ---------------------------------------------------------------------------------------------
# Label maps -> segments


def unique_segment_name(segmentation, name: str, exclude: Optional[str] = None) -> str:
    existing = {segmentation.GetSegment(s).GetName() for s in segmentation.GetSegmentIDs() if s != exclude}
    if name not in existing:
        return name
    candidate, n = f"{name} (SFR)", 2
    while candidate in existing:
        candidate, n = f"{name} (SFR {n})", n + 1
    return candidate


def class_color(name: str, value: int, scene=None, existing: Optional[Dict[str, Tuple[float, float, float]]] = None) -> Tuple[float, float, float]:
    """A class's colour (0..1 RGB): that of a segment of the same name already in the target
    segmentation; else the colour of that name in Slicer's anatomy colour table, when the
    scene has it; else a fixed palette entry for the class index."""
    if existing and name in existing:
        return tuple(existing[name])
    if scene is not None:
        for table in COLOR_TABLES:
            node = scene.GetFirstNodeByName(table)
            if node is None or not node.IsA("vtkMRMLColorTableNode"):
                continue
            for candidate in (name, name.lower()):
                idx = node.GetColorIndexByName(candidate)
                if idx > 0:
                    rgba = [0.0, 0.0, 0.0, 0.0]
                    node.GetColor(idx, rgba)
                    return tuple(float(x) for x in rgba[:3])
    r, g, b = PALETTE[(max(1, int(value)) - 1) % len(PALETTE)]
    return (r / 255.0, g / 255.0, b / 255.0)


@dataclass
class ApplyRecord:
    """What ``apply_labels`` did, for ``undo``: the node (a reference) and the segments added."""

    segmentation_node: object
    segment_ids: List[str] = field(default_factory=list)
    created: bool = False
    names: Dict[str, str] = field(default_factory=dict)  # segment id -> name given


def result_node_for(volume_node):
    """The segmentation node an earlier result for this volume was put in (created by
    ``apply_labels``), or None: the output selector's default, so that one volume's labels
    never land in another volume's result node."""
    scene = volume_node.GetScene() if volume_node is not None else None
    if scene is None:
        return None
    found = None
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
        if node.GetAttribute(RESULT_ATTRIBUTE) == "1" and _same(node.GetNodeReference(SOURCE_VOLUME_ROLE), volume_node):
            found = node
    return found


def apply_labels(labels: np.ndarray, volume_node, class_names: Dict[int, str], segmentation_node=None) -> ApplyRecord:
    """Adds one new segment per class present in ``labels`` (``[k, j, i]`` on ``volume_node``'s
    grid) to ``segmentation_node``, or to a new node named "<volume> SFR" when None. Segments
    already there are never modified: the labels are imported as new segments (named from
    ``class_names``, made unique, coloured by ``class_color``). No temporary node enters the
    scene. Returns the record for ``undo``.

    Refused: a volume or segmentation that left the scene (deleted, or Close Scene while the
    job ran: its result is discarded), a transformed volume or segmentation, a shape mismatch."""
    if not in_scene(volume_node):
        raise InputError(f"the volume '{_name(volume_node)}' was removed from the scene (or the scene was closed) while it was being segmented: the result was discarded")
    scene = volume_node.GetScene()
    require_untransformed(volume_node)
    if segmentation_node is not None:
        if not in_scene(segmentation_node, scene):
            raise InputError(f"the segmentation '{_name(segmentation_node)}' was removed from the scene: choose another output, or create a new one")
        require_untransformed(segmentation_node)
    labels = np.asarray(labels)
    shape = volume_array(volume_node, copy=False).shape
    if labels.shape != shape:
        raise InputError(f"labels of shape {labels.shape} do not fit '{_name(volume_node)}' ({shape})")
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise InputError(f"labels must be non-negative integers, got {labels.dtype}")
    if not labels.any():
        return ApplyRecord(segmentation_node, [], False)
    created = segmentation_node is None
    if created:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume_node.GetName()} SFR")
        segmentation_node.SetAttribute(RESULT_ATTRIBUTE, "1")
        segmentation_node.SetNodeReferenceID(SOURCE_VOLUME_ROLE, volume_node.GetID())
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0:
        # An empty node takes the volume's grid; a node with segments keeps its own (the import
        # resamples into it).
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    existing = {segmentation.GetSegment(s).GetName(): segmentation.GetSegment(s).GetColor() for s in segmentation.GetSegmentIDs()}
    before = set(segmentation.GetSegmentIDs())
    dtype = np.uint8 if labels.max() < 256 else np.uint16
    image = slicer.vtkOrientedImageData()
    image.ShallowCopy(_image_data(labels.astype(dtype, copy=False)))
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    image.SetImageToWorldMatrix(m)  # the volume's full IJK-to-RAS: oblique volumes included
    ok = _segmentations_logic().ImportLabelmapToSegmentationNode(image, segmentation_node, "", "")
    added = [s for s in segmentation.GetSegmentIDs() if s not in before]
    if not ok:
        for s in added:
            segmentation.RemoveSegment(s)
        if created:
            scene.RemoveNode(segmentation_node)
        raise RuntimeError("Slicer could not import the label map into the segmentation")
    names = {}
    for segment_id in added:
        segment = segmentation.GetSegment(segment_id)
        value = int(segment.GetLabelValue())  # the voxel value it came from
        name = class_names.get(value, f"class {value}")
        segment.SetColor(*class_color(name, value, scene, existing))
        segment.SetName(unique_segment_name(segmentation, name, exclude=segment_id))
        names[segment_id] = segment.GetName()
    return ApplyRecord(segmentation_node, added, created, names)


def undo(record: ApplyRecord) -> bool:
    """Removes exactly the segments ``apply_labels`` added (and the node it created, once no
    other segment is in it). Segments added or edited since are kept. False when there was
    nothing to undo (nothing added, node deleted, scene closed)."""
    node = record.segmentation_node
    if node is None or not record.segment_ids or node.GetScene() is None:
        return False
    segmentation = node.GetSegmentation()
    removed = False
    for segment_id in record.segment_ids:
        if segmentation.GetSegment(segment_id) is not None:
            segmentation.RemoveSegment(segment_id)
            removed = True
    if record.created and segmentation.GetNumberOfSegments() == 0:
        node.GetScene().RemoveNode(node)
        removed = True
    return removed


# ---------------------------------------------------------------------------------------------
# The labelled cases the user picked, and gathering training data from the scene


class LabeledPairs:
    """(volume, segmentation) pairs held as node references. ``pairs()`` drops those whose
    nodes left the scene, so a pair can never re-attach to a new node that got the same ID."""

    def __init__(self):
        self._pairs: List[Tuple[object, object]] = []

    def add(self, volume_node, segmentation_node) -> bool:
        if volume_node is None or segmentation_node is None:
            raise InputError("choose a volume and its segmentation first")
        if any(_same(v, volume_node) and _same(s, segmentation_node) for v, s in self.pairs()):
            return False
        self._pairs.append((volume_node, segmentation_node))
        return True

    def remove(self, rows) -> None:
        current = self.pairs()
        self._pairs = [p for n, p in enumerate(current) if n not in set(rows)]

    def pairs(self) -> List[Tuple[object, object]]:
        self._pairs = [(v, s) for v, s in self._pairs if in_scene(v) and in_scene(s, v.GetScene())]
        return list(self._pairs)

    def clear(self) -> None:
        self._pairs = []

    def __len__(self) -> int:
        return len(self.pairs())


def case_id(volume_node) -> str:
    # Names repeat in a scene ("1: Unnamed Series"); IDs do not (within one scene).
    return f"{volume_node.GetName()} [{volume_node.GetID()}]"


def volume_files(folder: str) -> List[str]:
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(VOLUME_SUFFIXES))
    if not files:
        raise InputError(f"no volume file (NIfTI, NRRD, MHA) in {folder}")
    return [os.path.join(folder, f) for f in files]


class TrainingCollector:
    """Gathers training cases from the scene in small steps, so that a GUI timer can run one
    step per tick and stay responsive: each ``step()`` copies one volume (and exports its
    segments to a label map, one Slicer call) — the scene is only touched here, on the caller's
    thread. Volume files of a folder: NIfTI files are read later on a helper thread; other
    formats need Slicer's readers and are loaded one per step by ``load_volume_file(path) ->
    node`` (the node is removed after copying).

    ``builder()`` then gives the function that ``SFRLogic.start_training`` runs on a helper
    thread: it builds and checks the TrainingData (and reads the NIfTI files)."""

    def __init__(self, pairs, unlabeled_nodes=(), folder: Optional[str] = None,
                 load_volume_file: Optional[Callable[[str], object]] = None, log: Callable[[str], None] = print):
        pairs = list(pairs)
        if not pairs:
            raise InputError("add at least one labelled case (a volume with its segmentation)")
        self.class_names = class_names_of(pairs)
        if not self.class_names:
            raise InputError("the segmentations of the labelled cases have no segments")
        if len(self.class_names) > 255:
            raise InputError(f"{len(self.class_names)} segment names: at most 255 classes are supported")
        self.log = log
        self.labeled: List[Tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
        self.unlabeled: List[Tuple[str, np.ndarray, np.ndarray]] = []
        self.nifti_files: List[str] = []
        self._steps: List[Tuple[str, Callable[[], None]]] = []
        for v, s in pairs:
            self._steps.append((f"exporting '{s.GetName()}' on '{v.GetName()}'", lambda v=v, s=s: self._labeled(v, s)))
        for v in unlabeled_nodes:
            if any(_same(v, pv) for pv, _ in pairs):
                continue
            self._steps.append((f"copying '{v.GetName()}'", lambda v=v: self._unlabeled(v)))
        if folder:
            for n, path in enumerate(volume_files(folder)):
                if path.lower().endswith(NIFTI_SUFFIXES):
                    self.nifti_files.append(path)
                elif load_volume_file is None:
                    raise InputError(f"{path}: only NIfTI files can be read here (no volume reader given)")
                else:
                    self._steps.append((f"reading {os.path.basename(path)}", lambda p=path, n=n: self._file(p, n, load_volume_file)))
        self.total = len(self._steps)
        self.done = 0

    def _labeled(self, volume_node, segmentation_node) -> None:
        image, m = volume_array_and_matrix(volume_node)
        label, missing = export_label(volume_node, segmentation_node, self.class_names)
        if missing:
            self.log(f"warning: '{segmentation_node.GetName()}' has no segment {', '.join(missing)}: "
                     "those structures count as absent (background) in this case")
        self.labeled.append((case_id(volume_node), image, m, label))

    def _unlabeled(self, volume_node) -> None:
        image, m = volume_array_and_matrix(volume_node)
        self.unlabeled.append((case_id(volume_node), image, m))

    def _file(self, path: str, n: int, load) -> None:
        node = load(path)
        if node is None:
            raise InputError(f"{path}: Slicer could not read this volume file")
        try:
            image, m = volume_array_and_matrix(node)
        finally:
            if node.GetScene() is not None:
                node.GetScene().RemoveNode(node)
        self.unlabeled.append((f"{n:04d}_{os.path.basename(path)}", image, m))

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    def next_message(self) -> str:
        return self._steps[self.done][0] if not self.finished else "done"

    def step(self) -> bool:
        """Runs the next step; returns True while steps remain."""
        if not self.finished:
            self._steps[self.done][1]()
            self.done += 1
        return not self.finished

    def run(self) -> "TrainingCollector":
        while self.step():
            pass
        return self

    def builder(self) -> Callable:
        labeled, unlabeled, files = self.labeled, self.unlabeled, list(self.nifti_files)
        classes = ["background"] + list(self.class_names)
        # The collector lets go of the arrays: from here the builder owns them.
        self.labeled, self.unlabeled = [], []

        def build(reporter=None) -> TrainingData:
            data = TrainingData(classes)
            total = len(labeled) + len(unlabeled) + len(files)
            for n, (cid, image, m, label) in enumerate(labeled):
                if reporter is not None:
                    reporter.report(f"checking labelled case {cid}", n, total)
                data.add_labeled(image, label, m, case_id=cid)
            for n, (cid, image, m) in enumerate(unlabeled):
                if reporter is not None:
                    reporter.report(f"checking unlabelled case {cid}", len(labeled) + n, total)
                data.add_unlabeled(image, m, case_id=cid)
            for n, path in enumerate(files):
                if reporter is not None:
                    reporter.report(f"reading {os.path.basename(path)}", len(labeled) + len(unlabeled) + n, total)
                try:
                    image, m = nifti.read(path)
                except (OSError, ValueError) as e:
                    raise InputError(f"{path}: {e}") from e
                data.add_unlabeled(image, m, case_id=f"{n:04d}_{os.path.basename(path)}")
            labeled.clear()
            unlabeled.clear()
            return data

        return build
