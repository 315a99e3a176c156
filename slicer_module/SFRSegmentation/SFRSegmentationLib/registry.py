"""The model folder: the ``.sfrmodel`` files of a folder the user chose, listed from their
headers only (no library needed, so the list works before any library is loaded)."""
from __future__ import annotations

import datetime
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from . import modelfile
from .jobs import Model

MODEL_SUFFIX = ".sfrmodel"
# Beside a model: the terminology of its classes (class name -> Slicer terminology entry) taken
# from the segments it was trained on, so results carry the same codes (DICOM SEG export needs
# them). A file of its own because the model's metadata is written by the sfr tool, which
# knows class names only.
TERMINOLOGY_SUFFIX = ".terminology.json"


def terminology_path(model_path) -> Path:
    return Path(str(model_path) + TERMINOLOGY_SUFFIX)


@dataclass
class ModelEntry:
    name: str
    path: Path
    metadata: dict = field(default_factory=dict)
    error: Optional[str] = None

    @property
    def validation_dice(self) -> Optional[float]:
        return modelfile.validation_dice(self.metadata) if not self.error else None

    @property
    def check_warning(self) -> Optional[str]:
        """The training check's warning (a class never or barely predicted), or None."""
        return modelfile.check_warning(self.metadata) if not self.error else None

    @property
    def created(self) -> Optional[datetime.datetime]:
        if not self.error:
            t = modelfile.created(self.metadata)
            if t:
                return t
        try:
            return datetime.datetime.fromtimestamp(self.path.stat().st_mtime)
        except OSError:
            return None

    @property
    def class_names(self) -> Dict[int, str]:
        return modelfile.class_names(self.metadata) if not self.error else {}

    @property
    def terminology(self) -> Dict[str, str]:
        """class name -> terminology entry, for the classes whose training segments had one."""
        import json

        try:
            doc = json.loads(terminology_path(self.path).read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in doc.items()} if isinstance(doc, dict) else {}

    @property
    def summary(self) -> str:
        return self.error or modelfile.summary(self.metadata)


def safe_model_name(name: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_. " else "_" for c in name).strip(" .")
    return out[:100] or "model"


class ModelRegistry:
    """The ``.sfrmodel`` files of a folder the user chose. Listing reads only file headers (no
    library needed); unreadable files are listed with their error rather than hidden."""

    def __init__(self, folder):
        self.folder = Path(folder).expanduser()

    def list(self) -> List[ModelEntry]:
        if not self.folder.is_dir():
            return []
        out = []
        for p in sorted(self.folder.glob("*" + MODEL_SUFFIX)):
            try:
                out.append(ModelEntry(p.name[: -len(MODEL_SUFFIX)], p, modelfile.read_metadata(p)))
            except modelfile.ModelFileError as e:
                out.append(ModelEntry(p.name[: -len(MODEL_SUFFIX)], p, {}, str(e)))
        out.sort(key=lambda e: e.created or datetime.datetime.min, reverse=True)
        return out

    def path_for(self, name: str) -> Path:
        return self.folder / (safe_model_name(name) + MODEL_SUFFIX)

    def unique_name(self, base: str) -> str:
        base = safe_model_name(base)
        name, n = base, 2
        while self.path_for(name).exists():
            name, n = f"{base}-{n}", n + 1
        return name

    def default_name(self, model: Model) -> str:
        method = (model.metadata().get("training") or {}).get("method", "model")
        return self.unique_name(f"{method}-{datetime.datetime.now():%Y%m%d-%H%M%S}")

    def add(self, model: Model, name: Optional[str] = None, terminology: Optional[Dict[str, str]] = None) -> ModelEntry:
        """Saves a model into the folder under a new unique name (never overwrites), with its
        classes' terminology (class name -> entry) beside it when given."""
        import json

        self.folder.mkdir(parents=True, exist_ok=True)
        name = self.unique_name(name) if name else self.default_name(model)
        path = self.path_for(name)
        if terminology:
            terminology_path(path).write_text(json.dumps(terminology, indent=1))
        path = model.save(path)
        return ModelEntry(name, path, modelfile.read_metadata(path))

    def entry(self, name: str) -> ModelEntry:
        for e in self.list():
            if e.name == name:
                return e
        raise KeyError(f"no model named '{name}' in {self.folder}")

    def remove(self, name: str) -> None:
        """Deletes a model file of this folder (and its training work folder, if any)."""
        p = self.folder / (name + MODEL_SUFFIX)
        if any(sep in name for sep in ("/", "\\")) or name in ("", ".", "..") or not p.is_file():
            raise KeyError(f"no model named '{name}' in {self.folder}")
        p.unlink()
        if terminology_path(p).is_file():
            terminology_path(p).unlink()
        work = p.with_name(p.name + ".work")
        if work.is_dir():
            shutil.rmtree(work, ignore_errors=True)

    def load(self, name: str, logic) -> Model:
        """Loads a model of this folder through ``logic`` (an SFRLogic)."""
        return logic.load_model(self.entry(name).path)
