"""Class mapping: the segments of every labelled case -> the classes of the model, decided
before any voxel is copied, so that training data can never be silently wrong.

Why a step of its own: a labelled case is a segmentation with named segments, and different
cases are segmented by different people. "Liver" in one case and "liver " in the next are the
same organ; a case without a "spleen" segment does not say that the spleen is absent. Matching
by exact name made two classes of the first and trained the second as background for that
class (with only a log line). Here:

- a segment's class is found by its name, trimmed and compared without case ("Liver" = "liver"),
  or by its terminology's type code (SNOMED-like, e.g. SCT^10200004 "Liver"), when the code is a
  specific one: two segments with the same specific code are the same class whatever their
  names. Slicer's default "Tissue" code (SCT^85756007), given to any new segment, says nothing
  about what was painted and is never used to match;
- a case that has no segment for one of the classes is an error naming the case and the class,
  unless the caller chose ``missing="background"`` (then that case counts the class as absent,
  and the mapping says so in ``notes``);
- one name coded two different ways in two cases is an error (which one would the model learn?).

Pure Python (no Slicer): scene.py reads the segments' names and terminology strings and hands
them here; tests/slicer/test_classes.py tests it with the real segmentation nodes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .inputs import InputError

MISSING_POLICIES = ("error", "background")

# Slicer's terminology entry string (vtkSlicerTerminologiesModuleLogic's serialisation):
# "context~category~type~typeModifier~anatomicContext~anatomicRegion~anatomicRegionModifier",
# each code "scheme^value^meaning".
GENERIC_TISSUE = ("SCT", "85756007", "Tissue")
GENERIC_CATEGORY = ("SCT", "85756007", "Tissue")
TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

Code = Tuple[str, str, str]  # (coding scheme, value, meaning)


def _code(text: str) -> Optional[Code]:
    parts = (text or "").split("^")
    if len(parts) < 2 or not parts[0].strip() or not parts[1].strip():
        return None
    return parts[0].strip(), parts[1].strip(), (parts[2].strip() if len(parts) > 2 else "")


@dataclass(frozen=True)
class Terminology:
    """The parts of a terminology entry that identify a structure."""

    category: Optional[Code] = None
    type: Optional[Code] = None
    type_modifier: Optional[Code] = None
    region: Optional[Code] = None
    region_modifier: Optional[Code] = None

    @staticmethod
    def parse(entry: Optional[str]) -> Optional["Terminology"]:
        """None for an empty entry or one without a type code."""
        if not entry:
            return None
        p = entry.split("~")
        p += [""] * (7 - len(p))
        t = Terminology(_code(p[1]), _code(p[2]), _code(p[3]), _code(p[5]), _code(p[6]))
        return t if t.type is not None else None

    @property
    def specific(self) -> bool:
        """True when the type code says what the structure is (not Slicer's default Tissue)."""
        return self.type is not None and self.type[:2] != GENERIC_TISSUE[:2]

    def key(self) -> Tuple:
        """What two segments must share to be the same structure by their codes."""
        strip = lambda c: c[:2] if c else None  # noqa: E731 - meanings differ in wording, codes do not
        return (strip(self.type), strip(self.type_modifier), strip(self.region), strip(self.region_modifier))

    def describe(self) -> str:
        parts = [f"{self.type[0]}^{self.type[1]} ({self.type[2] or '?'})"]
        if self.type_modifier:
            parts.append(f"modifier {self.type_modifier[2] or self.type_modifier[1]}")
        if self.region:
            parts.append(f"region {self.region[2] or self.region[1]}")
        return ", ".join(parts)

    def entry(self) -> str:
        """Back to Slicer's serialised form."""
        c = lambda code: "^".join(code) if code else "^^"  # noqa: E731
        return "~".join([TERMINOLOGY_CONTEXT, c(self.category or GENERIC_CATEGORY), c(self.type), c(self.type_modifier),
                         ANATOMIC_CONTEXT, c(self.region), c(self.region_modifier)])


def generic_terminology_entry(name: str) -> str:
    """A result segment's terminology when its class has no code: Slicer's generic "Tissue",
    as a new segment of Segment Editor gets; the class name stays the segment's name."""
    return Terminology(GENERIC_CATEGORY, GENERIC_TISSUE).entry()


def name_key(name: str) -> str:
    """Trimmed, inner whitespace collapsed, case-insensitive ("Liver " = "liver")."""
    return " ".join(str(name).split()).casefold()


@dataclass
class SegmentInfo:
    segment_id: str
    name: str
    terminology: str = ""  # Slicer's serialised entry, "" when the segment has none


@dataclass
class ModelClass:
    index: int  # 1..n (0 is background)
    name: str  # as first written (trimmed)
    terminology: Optional[Terminology] = None  # the first specific code seen, if any
    spellings: List[str] = field(default_factory=list)  # every distinct name that mapped here


@dataclass
class CaseMapping:
    case: str  # the case's name, for messages
    segment_classes: Dict[str, int]  # segment id -> class index
    missing: List[str]  # class names this case has no segment for


@dataclass
class ClassMapping:
    classes: List[ModelClass]
    cases: List[CaseMapping]
    missing: str = "error"

    @property
    def class_names(self) -> List[str]:
        return [c.name for c in self.classes]

    def training_classes(self) -> Dict[int, str]:
        return {0: "background", **{c.index: c.name for c in self.classes}}

    def terminology(self) -> Dict[str, str]:
        """class name -> terminology entry, for the classes whose segments were coded."""
        return {c.name: c.terminology.entry() for c in self.classes if c.terminology is not None}

    def notes(self) -> List[str]:
        """Lines for the panel's log: merged spellings, cases counted as background."""
        out = []
        for c in self.classes:
            if len(c.spellings) > 1:
                out.append(f"class '{c.name}' from segments named {', '.join(repr(s) for s in c.spellings)}")
        for cm in self.cases:
            for name in cm.missing:
                out.append(f"'{cm.case}' has no segment '{name}': counted as background there (your choice)")
        return out

    def describe(self) -> str:
        def one(c: ModelClass) -> str:
            return f"{c.index} {c.name}" + (f" [{c.terminology.describe()}]" if c.terminology else "")

        return "; ".join(one(c) for c in self.classes)


def map_classes(cases: Sequence[Tuple[str, Sequence[SegmentInfo]]], missing: str = "error") -> ClassMapping:
    """``cases``: (case name, its segments) for every labelled case, in the table's order.
    Returns the classes (in order of first appearance) and every segment's class. Raises
    InputError naming the case and the class for a missing segment (``missing="error"``), for
    conflicting codes, and for a case without segments."""
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
    if not cases:
        raise InputError("add at least one labelled case (a volume with its segmentation)")
    entries: List[Tuple[int, SegmentInfo, str, Optional[Terminology]]] = []
    for n, (case, segments) in enumerate(cases):
        if not segments:
            raise InputError(f"labelled case '{case}': its segmentation has no segments")
        for s in segments:
            key = name_key(s.name)
            if not key:
                raise InputError(f"labelled case '{case}': segment {s.segment_id} has an empty name")
            entries.append((n, s, key, Terminology.parse(s.terminology)))

    # Union-find over the segments: same name key, or same specific code, is the same class.
    parent = list(range(len(entries)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the root stays the first appearance

    first_by_name: Dict[str, int] = {}
    first_by_code: Dict[Tuple, int] = {}
    for e, (_n, _s, key, term) in enumerate(entries):
        union(e, first_by_name.setdefault(key, e))
        if term is not None and term.specific:
            union(e, first_by_code.setdefault(term.key(), e))

    classes: List[ModelClass] = []
    class_of_root: Dict[int, ModelClass] = {}
    codes_of_root: Dict[int, Dict[Tuple, Tuple[str, str]]] = {}
    for e, (n, s, key, term) in enumerate(entries):
        root = find(e)
        if root not in class_of_root:
            c = ModelClass(len(classes) + 1, " ".join(s.name.split()))
            classes.append(c)
            class_of_root[root] = c
        c = class_of_root[root]
        if " ".join(s.name.split()) not in c.spellings:
            c.spellings.append(" ".join(s.name.split()))
        if term is not None and term.specific:
            seen = codes_of_root.setdefault(root, {})
            seen.setdefault(term.key(), (cases[n][0], s.name))
            if c.terminology is None:
                c.terminology = term
            if len(seen) > 1:
                (k1, (case1, name1)), (k2, (case2, name2)) = list(seen.items())[:2]
                raise InputError(
                    f"class '{c.name}': segment '{name1}' of '{case1}' and segment '{name2}' of '{case2}' "
                    "have the same name but different terminology codes: rename one of them or fix its terminology "
                    "(Segment Editor, double-click the segment's colour)"
                )
    if len(classes) > 255:
        raise InputError(f"{len(classes)} classes: at most 255 are supported")

    mappings: List[CaseMapping] = []
    for n, (case, _segments) in enumerate(cases):
        seg_classes = {s.segment_id: class_of_root[find(e)].index for e, (m, s, _k, _t) in enumerate(entries) if m == n}
        have = set(seg_classes.values())
        absent = [c.name for c in classes if c.index not in have]
        if absent and missing == "error":
            raise InputError(
                f"labelled case '{case}' has no segment for class '{absent[0]}'"
                + (f" (nor {', '.join(repr(a) for a in absent[1:])})" if len(absent) > 1 else "")
                + f"; the classes come from the segments of all labelled cases ({', '.join(c.name for c in classes)})"
                + ". Add the segment (an empty one if the structure is truly absent in this case), remove the case, "
                "or choose to count missing segments as background"
            )
        mappings.append(CaseMapping(case, seg_classes, absent))
    return ClassMapping(classes, mappings, missing)


__all__ = [
    "MISSING_POLICIES", "Terminology", "SegmentInfo", "ModelClass", "CaseMapping", "ClassMapping", "map_classes",
    "name_key", "generic_terminology_entry",
]
