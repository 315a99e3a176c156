"""Reading a ``.sfrmodel`` file's metadata without libsfr.

A model file is a safetensors file: 8 bytes (little-endian header length), a JSON header whose
``__metadata__["sfr"]`` is the model's metadata JSON, then the weights. Listing the models of a
folder therefore needs neither libtorch nor the library, which keeps the model list working
even when the library cannot be loaded, and costs one small read per file.
"""
from __future__ import annotations

import datetime
import json
import struct
from pathlib import Path
from typing import Dict, List, Optional

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


class ModelFileError(ValueError):
    pass


def read_metadata(path) -> dict:
    """The ``sfr`` metadata of a model file, as a dict."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFileError(f"{path}: not an SFR model (file too short)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER:
                raise ModelFileError(f"{path}: not an SFR model (not a safetensors file)")
            header = f.read(n)
    except OSError as e:
        raise ModelFileError(f"{path}: {e.strerror or e}") from e
    try:
        doc = json.loads(header.decode("utf-8"))
        text = doc["__metadata__"]["sfr"]
        meta = json.loads(text)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ModelFileError(f"{path}: not an SFR model (no readable 'sfr' metadata: {e})") from e
    if not isinstance(meta, dict) or meta.get("format") != "sfrmodel":
        raise ModelFileError(f"{path}: not an SFR model (metadata format {meta.get('format') if isinstance(meta, dict) else None!r})")
    return meta


def class_names(meta: dict) -> Dict[int, str]:
    """Class index -> name, background (0) included, sorted by index."""
    classes = meta.get("classes") or {}
    return {int(k): str(v) for k, v in sorted(classes.items(), key=lambda kv: int(kv[0]))}


def validation_dice(meta: dict) -> Optional[float]:
    """Mean validation Dice, or None when training had no validation split."""
    v = meta.get("validation")
    if isinstance(v, dict) and isinstance(v.get("mean_dice"), (int, float)):
        return float(v["mean_dice"])
    return None


def failed_classes(meta: dict) -> List[str]:
    """Names of the classes that failed the library's training check (``training.class_check``:
    never predicted, or far below the others, on the validation or labelled cases); empty when
    every class passed or the model predates the check."""
    check = (meta.get("training") or {}).get("class_check")
    if not isinstance(check, dict):
        return []
    return [
        str(c.get("name", c.get("class")))
        for c in check.get("classes") or []
        if isinstance(c, dict) and c.get("verdict") in ("never_predicted", "far_below")
    ]


def check_warning(meta: dict) -> Optional[str]:
    """The training check's warning for people, or None when every class passed."""
    failed = failed_classes(meta)
    if not failed:
        return None
    check = meta["training"]["class_check"]
    on = "validation cases" if check.get("judged_on") == "validation" else "its own labelled cases"
    return (
        f"Training failed: {', '.join(repr(n) for n in failed)} never or barely predicted on {on}. "
        "Do not use this model: train again with another seed, more iterations or more labelled cases."
    )


def created(meta: dict) -> Optional[datetime.datetime]:
    t = meta.get("created_unix")
    if isinstance(t, (int, float)) and t > 0:
        return datetime.datetime.fromtimestamp(t)
    return None


def summary(meta: dict) -> str:
    """One line for people: method, classes, Dice, date."""
    training = meta.get("training") or {}
    names = [n for c, n in class_names(meta).items() if c != 0]
    dice = validation_dice(meta)
    when = created(meta)
    parts = [
        f"{training.get('method', '?')}{' + SFR' if training.get('sfr') else ''}",
        ", ".join(names) or "no classes",
        f"validation Dice {dice:.3f}" if dice is not None else "no validation",
    ]
    failed = failed_classes(meta)
    if failed:
        parts.insert(0, "FAILED: " + ", ".join(failed) + " not learnt")
    if when:
        parts.append(when.strftime("%Y-%m-%d %H:%M"))
    return " | ".join(parts)
