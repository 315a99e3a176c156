"""The module's state in the scene: a ``vtkMRMLScriptedModuleNode`` parameter node holding the
labelled cases (volume + segmentation, as node references), the unlabelled volumes, the
method, the preset and the options. It is saved with the scene, comes back when the scene is
loaded, and can be set from a script (``SFRParameters.of_scene(slicer.mrmlScene).preset =
"cpu-lora"``).

Slicer 5 modules wrap their parameter node with ``@parameterNodeWrapper``; that package
(slicer.parameterNodeWrapper) is not part of slicer-core, where this module's scene code is
tested, so this is a thin class with the same role over the same node type, tested against the
real MRML classes (tests/slicer/test_parameters.py). Plain Python: it touches only the node it
is given and its scene.

Cases are node references with one role per case and side ("SFRCaseVolume3",
"SFRCaseSegmentation3"): MRML drops a reference when its node is removed, so a pair whose
volume or segmentation was deleted loses one side and is dropped as a whole, and no other pair
shifts (a single multi-valued role per side would pair the wrong nodes after a removal).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from .inputs import NORMALIZATIONS, InputError
from .logic import METHODS, PRESETS, default_preset

MODULE_NAME = "SFRSegmentation"
CASE_VOLUME = "SFRCaseVolume"
CASE_SEGMENTATION = "SFRCaseSegmentation"
UNLABELED = "SFRUnlabeledVolume"
DEFAULTS = {
    "Method": "mean-teacher",
    "Normalization": "auto",
    "UseSam": "true",
    "MissingAsBackground": "false",
    "UnlabeledFolder": "",
    "SamCheckpoint": "",
}


def _same(a, b) -> bool:
    return a is b or (a is not None and b is not None and a.GetID() == b.GetID() and a.GetScene() is b.GetScene())


class SFRParameters:
    """The parameter node's values as Python attributes, and the labelled cases with the
    interface of scene.LabeledPairs (``add``, ``remove``, ``pairs``, ``clear``, ``len``)."""

    def __init__(self, node, defaults: Optional[dict] = None):
        """``defaults``: values for parameters the node does not have yet (e.g. the user's last
        choices from the application settings); the rest from DEFAULTS and default_preset()."""
        self.node = node
        values = dict(DEFAULTS, Preset=default_preset())
        values.update({k: v for k, v in (defaults or {}).items() if v})
        for key, value in values.items():
            if node.GetParameter(key) == "":
                node.SetParameter(key, str(value))

    @classmethod
    def of_scene(cls, scene, defaults: Optional[dict] = None) -> "SFRParameters":
        """The module's parameter node of ``scene`` (a singleton, as
        ScriptedLoadableModuleLogic.getParameterNode makes it), created when absent."""
        node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)  # CreateNodeByClass returns a new reference (as in Slicer's own code)
            node.SetSingletonTag(MODULE_NAME)
            node.SetModuleName(MODULE_NAME)
            node.SetName(scene.GenerateUniqueName(MODULE_NAME))
            node = scene.AddNode(node)
        return cls(node, defaults)

    # -- values ----------------------------------------------------------------------------
    def _choice(self, key: str, allowed, value: str) -> None:
        if value not in allowed:
            raise InputError(f"{key.lower()} must be one of {', '.join(allowed)}, got {value!r}")
        self.node.SetParameter(key, value)

    @property
    def method(self) -> str:
        return self.node.GetParameter("Method")

    @method.setter
    def method(self, value: str) -> None:
        self._choice("Method", METHODS, value)

    @property
    def preset(self) -> str:
        return self.node.GetParameter("Preset")

    @preset.setter
    def preset(self, value: str) -> None:
        self._choice("Preset", PRESETS, value)

    @property
    def normalization(self) -> str:
        """The *Intensities* choice: "auto", "zscore" or "ct" (inputs.resolve_normalization)."""
        return self.node.GetParameter("Normalization")

    @normalization.setter
    def normalization(self, value: str) -> None:
        self._choice("Normalization", NORMALIZATIONS, value)

    @property
    def use_sam(self) -> bool:
        return self.node.GetParameter("UseSam") == "true"

    @use_sam.setter
    def use_sam(self, on: bool) -> None:
        self.node.SetParameter("UseSam", "true" if on else "false")

    @property
    def missing_as_background(self) -> bool:
        return self.node.GetParameter("MissingAsBackground") == "true"

    @missing_as_background.setter
    def missing_as_background(self, on: bool) -> None:
        self.node.SetParameter("MissingAsBackground", "true" if on else "false")

    @property
    def unlabeled_folder(self) -> str:
        return self.node.GetParameter("UnlabeledFolder")

    @unlabeled_folder.setter
    def unlabeled_folder(self, path: str) -> None:
        self.node.SetParameter("UnlabeledFolder", path or "")

    @property
    def sam_checkpoint(self) -> str:
        return self.node.GetParameter("SamCheckpoint")

    @sam_checkpoint.setter
    def sam_checkpoint(self, path: str) -> None:
        self.node.SetParameter("SamCheckpoint", path or "")

    # -- labelled cases --------------------------------------------------------------------
    def _count(self) -> int:
        try:
            return int(self.node.GetParameter("CaseCount") or 0)
        except ValueError:
            return 0

    def _write(self, pairs: List[Tuple[object, object]]) -> None:
        wasModifying = self.node.StartModify()
        for n in range(max(self._count(), len(pairs))):
            self.node.RemoveNodeReferenceIDs(f"{CASE_VOLUME}{n}")
            self.node.RemoveNodeReferenceIDs(f"{CASE_SEGMENTATION}{n}")
        for n, (v, s) in enumerate(pairs):
            self.node.SetNodeReferenceID(f"{CASE_VOLUME}{n}", v.GetID())
            self.node.SetNodeReferenceID(f"{CASE_SEGMENTATION}{n}", s.GetID())
        self.node.SetParameter("CaseCount", str(len(pairs)))
        self.node.EndModify(wasModifying)

    def pairs(self) -> List[Tuple[object, object]]:
        """The complete pairs, in order (a pair whose node was removed is gone)."""
        out = []
        for n in range(self._count()):
            v = self.node.GetNodeReference(f"{CASE_VOLUME}{n}")
            s = self.node.GetNodeReference(f"{CASE_SEGMENTATION}{n}")
            if v is not None and s is not None:
                out.append((v, s))
        return out

    def add(self, volume_node, segmentation_node) -> bool:
        if volume_node is None or segmentation_node is None:
            raise InputError("choose a volume and its segmentation first")
        current = self.pairs()
        if any(_same(v, volume_node) and _same(s, segmentation_node) for v, s in current):
            return False
        self._write(current + [(volume_node, segmentation_node)])
        return True

    def remove(self, rows) -> None:
        rows = set(rows)
        self._write([p for n, p in enumerate(self.pairs()) if n not in rows])

    def clear(self) -> None:
        self._write([])

    def __len__(self) -> int:
        return len(self.pairs())

    # -- unlabelled volumes ----------------------------------------------------------------
    def unlabeled(self) -> List[object]:
        return [self.node.GetNthNodeReference(UNLABELED, n) for n in range(self.node.GetNumberOfNodeReferences(UNLABELED))
                if self.node.GetNthNodeReference(UNLABELED, n) is not None]

    def set_unlabeled(self, nodes) -> None:
        wasModifying = self.node.StartModify()
        self.node.RemoveNodeReferenceIDs(UNLABELED)
        for v in nodes:
            self.node.AddNodeReferenceID(UNLABELED, v.GetID())
        self.node.EndModify(wasModifying)


__all__ = ["SFRParameters", "MODULE_NAME"]
