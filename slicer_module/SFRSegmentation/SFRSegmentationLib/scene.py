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

from . import classes, nifti, steps
from .inputs import InputError, TrainingData, check_memory
from .steps import SLICE_BYTES, Background

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

TERMINOLOGY_TAG = "TerminologyEntry"  # vtkSegment::GetTerminologyEntryTagName()

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


def _scalars_view(image, what: str) -> np.ndarray:
    """A ``[k, j, i]`` numpy view of a single-component vtkImageData's voxels."""
    scalars = image.GetPointData().GetScalars() if image is not None else None
    if scalars is None:
        raise InputError(f"{what} has no voxels")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(f"{what} has {image.GetNumberOfScalarComponents()} components per voxel (a vector or RGB volume): use a scalar volume")
    i, j, k = image.GetDimensions()
    return numpy_support.vtk_to_numpy(scalars).reshape(k, j, i)


def _identity(image) -> tuple:
    # What must stay the same while an image is copied in slices: the image and voxel array
    # objects, the array's modification time (Slicer code calls Modified() after changing
    # voxels in place) and the extent.
    scalars = image.GetPointData().GetScalars()
    return (image.GetAddressAsString("vtkObject"), scalars.GetAddressAsString("vtkObject") if scalars is not None else None,
            scalars.GetMTime() if scalars is not None else None, tuple(image.GetExtent()))


def _prefaulted(shape, dtype) -> np.ndarray:
    # Allocated and every page touched here, on a helper thread: the page faults of a fresh
    # array cost more than the copy into it.
    a = np.empty(shape, dtype=dtype)
    a.fill(0)
    return a


def copy_image_steps(get_image: Callable[[], object], what: str, region: Optional[Tuple[slice, slice, slice]] = None):
    """Task generator (steps.py): copies the voxels ``[k, j, i]`` of a scene image (or of
    ``region`` of it, slices of the ``[k, j, i]`` view) in slabs of at most ``SLICE_BYTES`` (at
    least one k-plane) per GUI-thread slice. ``get_image()`` fetches the image again for every
    slab (it raises when its node left the scene); an image that was replaced or modified
    between two slabs makes the copy fail rather than mix two states. Returns the array."""
    image = get_image()
    view = _scalars_view(image, what)
    if region is not None:
        view = view[region]
    ident = _identity(image)
    shape, dtype = view.shape, view.dtype
    plane = max(1, int(np.prod(shape[1:])) * dtype.itemsize)
    rows = max(1, SLICE_BYTES // plane)
    del view, image  # nothing of the scene's memory is held between slices
    out = yield Background(lambda: _prefaulted(shape, dtype), name="sfr-allocate")
    k = 0
    while k < shape[0]:
        image = get_image()
        if image is None or _identity(image) != ident:
            raise InputError(f"{what} changed while it was being read: start again")
        view = _scalars_view(image, what)
        if region is not None:
            view = view[region]
        n = min(rows, shape[0] - k)
        np.copyto(out[k : k + n], view[k : k + n])
        k += n
        del view, image
        yield f"reading {what} ({k}/{shape[0]} slices)"
    return out


def volume_copy_steps(volume_node):
    """Task generator: ``volume_array_and_matrix`` in GUI-thread slices (``copy_image_steps``):
    the voxels ``[k, j, i]`` (a copy) and the IJK-to-RAS matrix. Refused when the volume leaves
    the scene, is put under a transform or changes before the copy is complete."""
    what = f"'{_name(volume_node)}'"

    def get():
        if volume_node is None or not in_scene(volume_node):
            raise InputError(f"the volume {what} is no longer in the scene")
        require_untransformed(volume_node)
        return volume_node.GetImageData()

    get()
    view = volume_array(volume_node, copy=False)  # the checks of a one-shot copy
    check_memory(view.nbytes, f"copying {what}", "close other data or use fewer or smaller volumes")
    del view
    m = volume_matrix(volume_node)
    array = yield from copy_image_steps(get, what)
    get()
    if not np.array_equal(volume_matrix(volume_node), m):
        raise InputError(f"the geometry of {what} changed while it was being read: start again")
    return array, m


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


def segment_terminology(segment) -> str:
    """A segment's terminology entry string ("" when it has none). Slicer 5.8 and later have
    vtkSegment::GetTerminology; earlier versions keep it in the "TerminologyEntry" tag."""
    if hasattr(segment, "GetTerminology"):
        return segment.GetTerminology() or ""
    value = vtk.reference("") if hasattr(vtk, "reference") else vtk.mutable("")
    return str(value) if segment.GetTag(TERMINOLOGY_TAG, value) else ""


def set_segment_terminology(segment, entry: str) -> None:
    if hasattr(segment, "SetTerminology"):
        segment.SetTerminology(entry)
    else:
        segment.SetTag(TERMINOLOGY_TAG, entry)


def segment_infos(segmentation_node) -> List[classes.SegmentInfo]:
    s = segmentation_node.GetSegmentation()
    out = []
    for sid in s.GetSegmentIDs():
        segment = s.GetSegment(sid)
        out.append(classes.SegmentInfo(sid, segment.GetName(), segment_terminology(segment)))
    return out


def case_label(volume_node, segmentation_node) -> str:
    """How a labelled case is named in messages: its segmentation and its volume."""
    return f"{_name(segmentation_node)}' on '{_name(volume_node)}"


def class_mapping(pairs, missing: str = "error") -> classes.ClassMapping:
    """The labelled cases' segments -> the model's classes (classes.map_classes): names
    compared trimmed and without case, specific terminology codes matched; a case without a
    segment for a class is an error naming both unless ``missing="background"``."""
    return classes.map_classes([(case_label(v, s), segment_infos(s)) for v, s in pairs], missing)


def class_names_of(pairs) -> List[str]:
    """Class names from the segments of the labelled cases (first appearance; "Liver" and
    "liver" are one class)."""
    return class_mapping(pairs, "background").class_names


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


BINARY_LABELMAP = "Binary labelmap"  # vtkSegmentationConverter's representation name


def _matrix_of(oriented_image) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    oriented_image.GetImageToWorldMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _grid_offset(layer_matrix: np.ndarray, volume_ijk_to_ras: np.ndarray, tol: float = 1e-4) -> Optional[Tuple[int, int, int]]:
    """(di, dj, dk) such that voxel (i, j, k) of a labelmap with ``layer_matrix`` is voxel
    (i + di, j + dj, k + dk) of the volume; None unless the two grids coincide up to a whole
    number of voxels (same axes and spacing), i.e. unless no resampling is needed."""
    a, b = np.asarray(layer_matrix, dtype=float), np.asarray(volume_ijk_to_ras, dtype=float)
    if not np.allclose(a[:3, :3], b[:3, :3], rtol=0.0, atol=tol * max(1.0, float(np.abs(b[:3, :3]).max()))):
        return None
    shift = np.linalg.solve(b[:3, :3], a[:3, 3] - b[:3, 3])
    whole = np.round(shift)
    if np.abs(shift - whole).max() > tol:
        return None
    return int(whole[0]), int(whole[1]), int(whole[2])


def _export_with_slicer(volume_node, segmentation_node, ids, lut, shape) -> np.ndarray:
    """One ExportSegmentsToLabelmapNode call (resamples when the grids differ); values mapped
    through ``lut``. Temporary nodes are removed, also on failure."""
    scene = volume_node.GetScene()
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
        return lut[exported]
    finally:
        _remove_with_display(scene, labelmap, colors_before)


def export_label_steps(volume_node, segmentation_node, class_names: Sequence[str], segment_classes: Optional[Dict[str, int]] = None,
                       on_resample: Optional[Callable[[str], None]] = None):
    """Task generator (steps.py) giving ``(label, missing)``: the segments of
    ``segmentation_node`` as one label map on ``volume_node``'s grid (``[k, j, i]``; a segment
    whose class is ``class_names[c - 1]`` gets value c; where segments overlap, the later one
    wins, as in Slicer's export), and the class names this case has no segment for.
    ``segment_classes`` (segment id -> class index, from ``class_mapping``) decides each
    segment's class; without it a segment's name is matched trimmed and without case.

    When each segment's binary labelmap lies on the volume's grid (same axes and spacing, any
    whole-voxel shift: the usual case, a segmentation made on that volume), its voxels are
    copied out of the scene in slabs of at most ``SLICE_BYTES`` per GUI-thread slice, and the
    label map is put together on a helper thread. Otherwise Slicer resamples: one
    ExportSegmentsToLabelmapNode call, in one slice. Both give the same label map
    (tests/slicer/test_scene.py compares them)."""
    require_untransformed(segmentation_node)
    require_untransformed(volume_node)
    dtype = np.uint8 if len(class_names) < 256 else np.uint16
    shape = volume_array(volume_node, copy=False).shape
    segmentation = segmentation_node.GetSegmentation()
    ids = list(segmentation.GetSegmentIDs())
    present = [segmentation.GetSegment(i).GetName() for i in ids]
    keys = [classes.name_key(n) for n in class_names]
    lut = np.zeros(len(ids) + 1, dtype=dtype)
    for n, (segment_id, name) in enumerate(zip(ids, present)):
        if segment_classes is not None:
            if segment_id not in segment_classes:
                raise InputError(f"segment '{name}' was added to '{_name(segmentation_node)}' after the classes were decided: start again")
            lut[n + 1] = segment_classes[segment_id]
        elif classes.name_key(name) in keys:
            lut[n + 1] = keys.index(classes.name_key(name)) + 1
        else:
            raise InputError(f"segment '{name}' of '{_name(segmentation_node)}' is not one of the classes {list(class_names)}")
    missing = [c for i, c in enumerate(class_names) if i + 1 not in set(int(v) for v in lut[1:])]
    if not ids:
        label = yield Background(lambda: _prefaulted(shape, dtype), name="sfr-allocate")
        return label, missing

    # The plan: per segment its labelmap layer (segments may share one) and label value; per
    # layer the part of it inside the volume, on both grids.
    volume_m = volume_matrix(volume_node)
    nk, nj, ni = shape
    layers: Dict[str, Optional[Tuple[str, tuple, tuple]]] = {}
    plan: List[Tuple[int, str, int]] = []
    aligned = segmentation.GetSourceRepresentationName() == BINARY_LABELMAP
    for n, segment_id in enumerate(ids):
        if not aligned:
            break
        segment = segmentation.GetSegment(segment_id)
        layer = segment.GetRepresentation(BINARY_LABELMAP)
        if layer is None:
            aligned = False
            break
        key = layer.GetAddressAsString("vtkObject")
        plan.append((n, key, int(segment.GetLabelValue())))
        if key in layers:
            continue
        i0, i1, j0, j1, k0, k1 = layer.GetExtent()
        if i1 < i0 or j1 < j0 or k1 < k0 or layer.GetPointData().GetScalars() is None:
            layers[key] = None  # an empty segment
            continue
        offset = _grid_offset(_matrix_of(layer), volume_m)
        if offset is None:
            aligned = False
            break
        di, dj, dk = offset
        lo = (max(0, k0 + dk), max(0, j0 + dj), max(0, i0 + di))
        hi = (min(nk - 1, k1 + dk), min(nj - 1, j1 + dj), min(ni - 1, i1 + di))
        if any(h < l for l, h in zip(lo, hi)):
            layers[key] = None  # entirely outside the volume
            continue
        first = (k0, j0, i0)
        delta = (dk, dj, di)
        layer_region = tuple(slice(l - d - f, h - d - f + 1) for l, h, d, f in zip(lo, hi, delta, first))
        volume_region = tuple(slice(l, h + 1) for l, h in zip(lo, hi))
        layers[key] = (segment_id, layer_region, volume_region)
    if not aligned:
        # The one long GUI-thread slice left: Slicer resamples the segments onto the volume's
        # grid in one call (MRML, so not on a helper thread; ~1.5 s for 512x512x300). Said
        # before it happens, so a pause of the window has a reason in the log.
        text = (f"'{_name(segmentation_node)}' is not on the grid of '{_name(volume_node)}' (other axes, spacing or a "
                "fraction-of-a-voxel shift): Slicer resamples it in one step, and the window may pause for a moment")
        if on_resample is not None:
            on_resample(text)
        yield text
        return _export_with_slicer(volume_node, segmentation_node, ids, lut, shape), missing

    what = f"the segments of '{_name(segmentation_node)}'"

    def layer_getter(segment_id: str, key: str):
        def get():
            if not in_scene(segmentation_node) or not in_scene(volume_node):
                raise InputError(f"'{_name(segmentation_node)}' or '{_name(volume_node)}' was removed from the scene while it was being read")
            segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
            layer = segment.GetRepresentation(BINARY_LABELMAP) if segment is not None else None
            if layer is None or layer.GetAddressAsString("vtkObject") != key:
                raise InputError(f"{what} changed while they were being read: start again")
            return layer

        return get

    label = yield Background(lambda: _prefaulted(shape, dtype), name="sfr-allocate")
    copies: Dict[str, np.ndarray] = {}
    for key, entry in layers.items():
        if entry is not None:
            segment_id, layer_region, _ = entry
            copies[key] = yield from copy_image_steps(layer_getter(segment_id, key), what, layer_region)
    if list(segmentation_node.GetSegmentation().GetSegmentIDs()) != ids or not all(
        int(segmentation_node.GetSegmentation().GetSegment(ids[n]).GetLabelValue()) == value for n, _, value in plan
    ):
        raise InputError(f"{what} changed while they were being read: start again")

    def merge() -> np.ndarray:
        # In segment order, so that the later segment wins where segments overlap.
        for n, key, value in plan:
            entry = layers[key]
            if entry is not None:
                label[entry[2]][copies[key] == value] = lut[n + 1]
        return label

    label = yield Background(merge, name="sfr-merge-segments")
    return label, missing


def export_label(volume_node, segmentation_node, class_names: Sequence[str]) -> Tuple[np.ndarray, List[str]]:
    """``export_label_steps`` run to its end at once (scripts and tests)."""
    return steps.run(export_label_steps(volume_node, segmentation_node, class_names), "export")


# ---------------------------------------------------------------------------------------------
# Label maps -> segments


def unique_segment_name(segmentation, name: str, exclude: Optional[str] = None, also=()) -> str:
    """``name``, or "name (SFR)", "name (SFR 2)", ... when a segment (other than ``exclude``)
    already has it, or it is in ``also``."""
    existing = {segmentation.GetSegment(s).GetName() for s in segmentation.GetSegmentIDs() if s != exclude} | set(also)
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
    voxels: Dict[str, int] = field(default_factory=dict)  # segment id -> its number of voxels


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


def _check_targets(volume_node, segmentation_node):
    if not in_scene(volume_node):
        raise InputError(f"the volume '{_name(volume_node)}' was removed from the scene (or the scene was closed) while it was being segmented: the result was discarded")
    require_untransformed(volume_node)
    if segmentation_node is not None:
        if not in_scene(segmentation_node, volume_node.GetScene()):
            raise InputError(f"the segmentation '{_name(segmentation_node)}' was removed from the scene: choose another output, or create a new one")
        require_untransformed(segmentation_node)


@dataclass
class PreparedLabels:
    """A label map made ready for the scene on a helper thread (``prepare_labels``)."""

    image: object  # vtkOrientedImageData: the labels' bounding box, on the volume's grid
    values: List[int]  # the classes present, ascending
    voxels: Dict[int, int]  # class -> number of voxels


def prepare_labels(labels: np.ndarray, ijk_to_ras) -> Optional[PreparedLabels]:
    """What ImportLabelmapToSegmentationNode computes before it adds segments, done in numpy
    and on objects in no scene, so that it can run on a helper thread: the classes present (in
    ascending order, like Slicer's GetAllLabelValues), the labels cropped to the bounding box
    of their non-zero voxels (like its CalculateEffectiveExtent and padding), as one
    vtkOrientedImageData (uint8, or uint16 beyond 255) with the volume's IJK-to-RAS matrix.
    None when all labels are 0."""
    if np.issubdtype(labels.dtype, np.signedinteger) and labels.size and labels.min() < 0:
        raise InputError(f"labels must be non-negative integers, got {labels.dtype} with negative values")
    k_any = labels.any(axis=(1, 2))
    if not k_any.any():
        return None
    j_any, i_any = labels.any(axis=(0, 2)), labels.any(axis=(0, 1))
    (k0, k1), (j0, j1), (i0, i1) = ((int(np.argmax(a)), len(a) - 1 - int(np.argmax(a[::-1]))) for a in (k_any, j_any, i_any))
    crop = labels[k0 : k1 + 1, j0 : j1 + 1, i0 : i1 + 1]
    top = int(crop.max())
    dtype = np.uint8 if top < 256 else np.uint16
    voxels: Dict[int, int] = {}
    if top < 256:
        for value in range(1, top + 1):
            n = int(np.count_nonzero(crop == value))
            if n:
                voxels[value] = n
    else:
        found, counts = np.unique(crop, return_counts=True)
        voxels = {int(v): int(n) for v, n in zip(found, counts) if v}
    image = slicer.vtkOrientedImageData()
    image.SetExtent(i0, i1, j0, j1, k0, k1)
    image.AllocateScalars(numpy_support.get_vtk_array_type(np.dtype(dtype)), 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(crop.shape)[:] = crop
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(np.asarray(ijk_to_ras)[r, c]))
    image.SetImageToWorldMatrix(m)  # the volume's full IJK-to-RAS: oblique volumes included
    return PreparedLabels(image, sorted(voxels), voxels)


def import_labels_steps(labels: np.ndarray, volume_node, class_names: Dict[int, str], segmentation_node=None,
                        terminology: Optional[Dict[str, str]] = None):
    """Task generator (steps.py) giving an ApplyRecord: adds one new segment per class present
    in ``labels`` (``[k, j, i]`` on ``volume_node``'s grid) to ``segmentation_node``, or to a
    new node named "<volume> SFR" when None. Segments already there are never modified: the
    labels come in as new segments (named from ``class_names``, made unique, coloured by
    ``class_color``). No temporary node enters the scene.

    The result is what one ImportLabelmapToSegmentationNode call would give (the same
    segments, IDs, label values, shared labelmap, extent and geometry; tests/slicer compares
    them), but that call scans the whole volume on the GUI thread (1.2-1.9 s for 512x512x300).
    Here the scan and the labelmap are made on a helper thread (``prepare_labels``), and the
    GUI-thread slices only attach: one slice for the checks, one to create or pick the node,
    then one slice per segment (AddSegment of the prepared labelmap, its name and colour).

    Every new segment gets a terminology (DICOM SEG export needs one): ``terminology[class
    name]`` when the model's training segments were coded (registry.ModelEntry.terminology),
    else Slicer's generic "Tissue" with the class name as the segment's name.

    Refused: a volume or segmentation that left the scene (deleted, or Close Scene while the
    job ran or the result was being added: its result is discarded), a transformed volume or
    segmentation, a shape mismatch. On failure, the segments added so far (and a node created
    for them) are removed again."""
    _check_targets(volume_node, segmentation_node)
    labels = np.asarray(labels)
    shape = volume_array(volume_node, copy=False).shape
    if labels.shape != shape:
        raise InputError(f"labels of shape {labels.shape} do not fit '{_name(volume_node)}' ({shape})")
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"labels must be non-negative integers, got {labels.dtype}")
    m = volume_matrix(volume_node)
    prepared = yield Background(lambda: prepare_labels(labels, m), name="sfr-prepare-labels")
    if prepared is None:
        return ApplyRecord(segmentation_node, [], False)

    # The scene may have changed while the helper thread ran.
    _check_targets(volume_node, segmentation_node)
    if volume_array(volume_node, copy=False).shape != shape or not np.array_equal(volume_matrix(volume_node), m):
        raise InputError(f"the geometry of '{_name(volume_node)}' changed while it was being segmented: the result was discarded")
    scene = volume_node.GetScene()
    created = segmentation_node is None
    if created:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume_node.GetName()} SFR")
        segmentation_node.SetAttribute(RESULT_ATTRIBUTE, "1")
        segmentation_node.SetNodeReferenceID(SOURCE_VOLUME_ROLE, volume_node.GetID())
    record = ApplyRecord(segmentation_node, [], created)
    try:
        if segmentation_node.GetDisplayNode() is None:
            segmentation_node.CreateDefaultDisplayNodes()
        segmentation = segmentation_node.GetSegmentation()
        if segmentation.GetNumberOfSegments() == 0:
            # An empty node takes the volume's grid; a node with segments keeps its own.
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        existing = {segmentation.GetSegment(s).GetName(): segmentation.GetSegment(s).GetColor() for s in segmentation.GetSegmentIDs()}
        # Slicer's import names the new segments Label_1, Label_2, ... before ours renames them:
        # a later segment's placeholder counts when an earlier one is made unique.
        placeholders = [f"Label_{n + 1}" for n in range(len(prepared.values))]
        for n, value in enumerate(prepared.values):
            if n:
                yield f"adding segment {n + 1}/{len(prepared.values)}"
                _check_targets(volume_node, segmentation_node)
            segment = slicer.vtkSegment()
            segment.SetName(placeholders[n])
            segment.SetLabelValue(value)
            # All new segments share the one prepared labelmap (one layer), as in Slicer's import.
            segment.AddRepresentation(BINARY_LABELMAP, prepared.image)
            if not segmentation.AddSegment(segment, "", ""):
                raise RuntimeError("Slicer could not add the result's segments to the segmentation")
            segment_id = segmentation.GetSegmentIdBySegment(segment)
            record.segment_ids.append(segment_id)
            name = class_names.get(value, f"class {value}")
            set_segment_terminology(segment, (terminology or {}).get(name) or classes.generic_terminology_entry(name))
            segment.SetColor(*class_color(name, value, scene, existing))
            segment.SetName(unique_segment_name(segmentation, name, exclude=segment_id, also=placeholders[n + 1 :]))
            record.names[segment_id] = segment.GetName()
            record.voxels[segment_id] = prepared.voxels[value]
    except BaseException:
        # Also on GeneratorExit (the task was cancelled): nothing half-added stays.
        undo(record)
        if created and in_scene(segmentation_node) and segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
            scene.RemoveNode(segmentation_node)
        raise
    return record


def apply_labels(labels: np.ndarray, volume_node, class_names: Dict[int, str], segmentation_node=None,
                 terminology: Optional[Dict[str, str]] = None) -> ApplyRecord:
    """``import_labels_steps`` run to its end at once (scripts, tests, Slicer's self-test)."""
    return steps.run(import_labels_steps(labels, volume_node, class_names, segmentation_node, terminology), "import")


def undo_steps(record: ApplyRecord):
    """Task generator (steps.py) giving True when something was removed: removes exactly the
    segments the import added (and the node it created, once no other segment is in it), one
    segment per GUI-thread slice. False when there was nothing to undo (nothing added, node
    deleted, scene closed).

    Slicer's RemoveSegment clears a segment's voxels in the labelmap it shares with other
    segments: 0.4-0.6 s per segment of a 512x512x300 result. When every segment sharing that
    labelmap is being removed (the result's own layer, as the import made it), its voxels need
    no clearing: the segment is first given an empty labelmap of its own, and the removal is
    instant. The remaining segments and layers are the same either way."""
    node = record.segmentation_node
    if node is None or not record.segment_ids or node.GetScene() is None:
        return False
    removing = set(record.segment_ids)
    removed = False
    for n, segment_id in enumerate(record.segment_ids):
        if n:
            yield f"removing segment {n + 1}/{len(record.segment_ids)}"
            if node.GetScene() is None:
                return removed
        segmentation = node.GetSegmentation()
        segment = segmentation.GetSegment(segment_id)
        if segment is None:
            continue
        sharing: List[str] = []
        if segment.GetRepresentation(BINARY_LABELMAP) is not None:
            segmentation.GetSegmentIDsSharingBinaryLabelmapRepresentation(segment_id, sharing, True)
        if sharing and set(sharing) <= removing:
            segment.AddRepresentation(BINARY_LABELMAP, slicer.vtkOrientedImageData())
        segmentation.RemoveSegment(segment_id)
        removed = True
    if record.created and node.GetScene() is not None and node.GetSegmentation().GetNumberOfSegments() == 0:
        node.GetScene().RemoveNode(node)
        removed = True
    return removed


def undo(record: ApplyRecord) -> bool:
    """``undo_steps`` run to its end at once."""
    return steps.run(undo_steps(record), "undo")


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


def read_volume_file(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """A volume file (NRRD, MHA, NIfTI, ...) read by Slicer's own reader
    (vtkMRMLVolumeArchetypeStorageNode, ITK, the reader ``slicer.util.loadVolume`` uses for
    scalar volumes) into a volume node that never enters a scene: nothing of the scene is
    touched, so this runs on a helper thread. Returns the voxels ``[k, j, i]`` and the
    IJK-to-RAS matrix."""
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(os.path.basename(path))
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    storage.SetSingleFile(1)
    if not storage.ReadData(node) or node.GetImageData() is None:
        raise InputError(f"{path}: Slicer could not read this volume file")
    return volume_array(node), volume_matrix(node)


def volume_files(folder: str) -> List[str]:
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(VOLUME_SUFFIXES))
    if not files:
        raise InputError(f"no volume file (NIfTI, NRRD, MHA) in {folder}")
    return [os.path.join(folder, f) for f in files]


class TrainingCollector:
    """Gathers training cases from the scene in short GUI-thread slices (a timer runs one
    ``step()`` per tick), so that Slicer stays responsive: a volume's voxels are copied a slab
    at a time and a labelled case's segments are read the same way (``export_label_steps``);
    the scene is only touched in those slices, on the caller's thread. Volume files of a
    folder never enter the scene: they are read on a helper thread (NIfTI by the module's
    reader, other formats by ``read_file(path) -> (voxels, IJK-to-RAS)``, default
    ``read_volume_file``: Slicer's reader on a node outside the scene).

    The classes are decided first (``class_mapping``; ``missing`` as there). Each case, once
    copied, goes to the sink on a helper thread and is let go: ``sink_factory(classes)`` makes
    the sink (default: a TrainingData, which keeps every case; in worker mode
    ``SFRLogic.training_sink`` gives a DecathlonWriter, which writes each case to a file as it
    arrives, so at most one case is held in memory whatever the number of cases). Before
    anything is copied, the memory check covers what the sink will hold: every case for a sink
    that keeps them, the largest case otherwise.

    ``total`` and ``done`` count volumes (for a progress bar); ``step()`` runs one slice.
    ``result()`` is then the filled sink, for ``SFRLogic.start_training``; ``close()`` lets go
    of it (a cancelled gathering: a writer's folder is removed)."""

    def __init__(self, pairs, unlabeled_nodes=(), folder: Optional[str] = None,
                 read_file: Callable[[str], Tuple[np.ndarray, np.ndarray]] = read_volume_file, log: Callable[[str], None] = print,
                 missing: str = "error", sink_factory: Optional[Callable] = None):
        pairs = list(pairs)
        if not pairs:
            raise InputError("add at least one labelled case (a volume with its segmentation)")
        # The classes are decided now, before any voxel is copied: a case missing a class's
        # segment is an error here (missing="error") or an explicit choice ("background").
        self.mapping = class_mapping(pairs, missing)
        self.class_names = self.mapping.class_names
        self.log = log
        for note in self.mapping.notes():
            log(note)
        self._steps: List[Tuple[str, Callable[[], object]]] = []
        sizes: List[int] = []  # bytes each scene case holds while it is copied (image + label)
        for (v, s), cm in zip(pairs, self.mapping.cases):
            self._steps.append((f"exporting '{s.GetName()}' on '{v.GetName()}'", lambda v=v, s=s, cm=cm: self._labeled(v, s, cm.segment_classes)))
            view = volume_array(v, copy=False)
            sizes.append(view.nbytes + view.size * (1 if len(self.class_names) < 256 else 2))
        for v in unlabeled_nodes:
            if any(_same(v, pv) for pv, _ in pairs):
                continue
            self._steps.append((f"copying '{v.GetName()}'", lambda v=v: self._unlabeled(v)))
            sizes.append(volume_array(v, copy=False).nbytes)
        if folder:
            for n, path in enumerate(volume_files(folder)):
                reader = (lambda p: nifti.read(p)) if path.lower().endswith(NIFTI_SUFFIXES) else read_file
                self._steps.append((f"reading {os.path.basename(path)}", lambda p=path, n=n, r=reader: self._file(p, n, r)))
        classes_ = ["background"] + list(self.class_names)
        self.sink = (sink_factory or TrainingData)(classes_)
        self.total = len(self._steps)
        self.done = 0
        try:
            self._check_memory(sizes)
        except BaseException:
            self.close()
            raise
        self._task = steps.Task(self._gather(), "gathering the training data")

    def _check_memory(self, sizes: List[int]) -> None:
        from . import inputs

        if inputs.available_memory_bytes() is None:
            self.log(f"note: {inputs.MEMORY_CHECK_UNAVAILABLE}")
            return
        if not sizes:
            return
        if getattr(self.sink, "holds_all", True):
            check_memory(sum(sizes), f"keeping the {len(sizes)} cases of the scene in memory for training",
                         "use the worker process mode (it writes each case to a file as it is gathered), or fewer or smaller volumes")
        else:
            # One case at a time, plus the labelmap copies of its segments while it is exported.
            check_memory(2 * max(sizes), "gathering the largest case", "close other data or use smaller volumes")

    def _gather(self):
        for _message, make in self._steps:
            yield from make()
            self.done += 1
            if self.done < self.total:
                yield self.next_message()

    def _labeled(self, volume_node, segmentation_node, segment_classes):
        image, m = yield from volume_copy_steps(volume_node)
        yield f"exporting '{segmentation_node.GetName()}'"
        label, missing = yield from export_label_steps(volume_node, segmentation_node, self.class_names, segment_classes,
                                                       on_resample=self.log)
        if missing and self.mapping.missing != "background":
            # Segments removed after the mapping was decided: never silently background.
            raise InputError(f"'{case_label(volume_node, segmentation_node)}' no longer has a segment for {', '.join(missing)}: start again")
        cid = case_id(volume_node)
        sink = self.sink
        # Checked and handed to the sink (a file write in worker mode) on a helper thread; the
        # generator's references end here, so a writing sink frees the case.
        yield Background(lambda: sink.add_labeled(image, label, m, case_id=cid), name="sfr-case")
        del image, label

    def _unlabeled(self, volume_node):
        image, m = yield from volume_copy_steps(volume_node)
        cid = case_id(volume_node)
        sink = self.sink
        yield Background(lambda: sink.add_unlabeled(image, m, case_id=cid), name="sfr-case")
        del image

    def _file(self, path: str, n: int, read):
        sink = self.sink
        cid = f"{n:04d}_{os.path.basename(path)}"

        def read_and_add():
            try:
                image, m = read(path)
            except InputError:
                raise
            except (OSError, ValueError) as e:
                raise InputError(f"{path}: {e}") from e
            return sink.add_unlabeled(image, m, case_id=cid)

        yield Background(read_and_add, name="sfr-read-volume")

    @property
    def finished(self) -> bool:
        return self._task.finished

    @property
    def slices(self) -> int:
        return self._task.slices

    def next_message(self) -> str:
        return self._steps[self.done][0] if self.done < self.total else "done"

    def step(self) -> bool:
        """Runs the next GUI-thread slice; returns True while more remain. Raises the error
        that stopped the gathering (the sink is then closed)."""
        try:
            more = self._task.step()
            if not more:
                self._task.take()
        except BaseException:
            self.close()
            raise
        return more

    def run(self) -> "TrainingCollector":
        try:
            self._task.run()
        except BaseException:
            self.close()
            raise
        return self

    def counts(self) -> Tuple[int, int]:
        return self.sink.counts()

    def result(self):
        """The filled sink (TrainingData or DecathlonWriter), checked; only once finished."""
        if not self.finished:
            raise RuntimeError("the training data has not been gathered yet")
        self.sink.check_ready()
        return self.sink

    def builder(self) -> Callable:
        """``result()`` as the function ``SFRLogic.start_training`` accepts (kept for scripts)."""
        sink = self.result()
        return lambda reporter=None: sink

    def close(self) -> None:
        """Stops a gathering and lets go of what it gathered (a writer removes its folder)."""
        task = getattr(self, "_task", None)
        if task is not None and not task.finished:
            task.cancel()
        close = getattr(self.sink, "close", None)
        if close is not None:
            close()
