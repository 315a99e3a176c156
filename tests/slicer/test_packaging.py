"""The module as Slicer packages it (issue 33, item 4) and the Lib's import graph (issue 35,
item 9):

- CMakeLists.txt lists every Python file and resource of the module, and a copy of the module
  holding *only* the listed files imports: the Lib and each of its modules, and the panel file
  itself (with stand-ins for Qt/CTK, which are not MRML and not installed here);
- the Lib's modules import in one direction only: no cycle, counting imports inside functions
  too (a lazy import still makes a circle that breaks reloading and layering); each module
  imports on its own in a fresh interpreter;
- the extension's metadata and icon are what Slicer's Extensions Index expects."""
import ast
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

from conftest import MODULE_DIR, REPO

LIB = MODULE_DIR / "SFRSegmentationLib"
LIB_MODULES = sorted(p.stem for p in LIB.glob("*.py") if p.stem != "__init__")
# Modules that import slicer/vtk (run with slicer-core); the rest import with numpy alone.
NEEDS_SLICER = {"scene", "parameters"}


def listed(kind: str):
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    block = re.search(r"set\(" + kind + r"\s+(.*?)\)", text, re.S).group(1)
    return [line.strip().replace("${MODULE_NAME}", "SFRSegmentation") for line in block.splitlines() if line.strip()]


def test_cmakelists_lists_every_module_file():
    scripts = set(listed("MODULE_PYTHON_SCRIPTS"))
    on_disk = {str(p.relative_to(MODULE_DIR)) for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts}
    assert scripts == on_disk, f"not listed: {sorted(on_disk - scripts)}; listed but absent: {sorted(scripts - on_disk)}"
    resources = listed("MODULE_PYTHON_RESOURCES")
    for r in resources:
        assert (MODULE_DIR / r).is_file(), r
    on_disk = {str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()}
    assert set(resources) == on_disk, f"resources not listed: {sorted(on_disk - set(resources))}"


FAKE_QT = textwrap.dedent("""
    import sys, types
    # Stand-ins for Qt and CTK (a GUI toolkit, not MRML): only what importing the panel touches.
    qt = types.ModuleType("qt"); ctk = types.ModuleType("ctk")
    sys.modules["qt"], sys.modules["ctk"] = qt, ctk
    import slicer
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleTest"):
        setattr(slm, name, type(name, (), {}))
    sys.modules["slicer.ScriptedLoadableModule"] = slm
""")


def test_a_copy_with_only_the_listed_files_imports(tmp_path):
    pytest.importorskip("slicer", reason="slicer-core is not installed: run scripts/setup.sh")
    copy = tmp_path / "SFRSegmentation"
    for rel in listed("MODULE_PYTHON_SCRIPTS") + listed("MODULE_PYTHON_RESOURCES"):
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(MODULE_DIR / rel, copy / rel)
    code = FAKE_QT + textwrap.dedent(f"""
        sys.path.insert(0, {str(copy)!r})
        import importlib
        import SFRSegmentationLib
        assert SFRSegmentationLib.__file__.startswith({str(copy)!r}), SFRSegmentationLib.__file__
        for m in {LIB_MODULES!r}:
            importlib.import_module("SFRSegmentationLib." + m)
        import SFRSegmentation
        assert SFRSegmentation.__file__.startswith({str(copy)!r})
        print("imported")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0 and "imported" in out.stdout, out.stderr[-3000:]


def _lib_imports(path: Path):
    """Names of Lib modules that ``path`` imports, anywhere in the file (functions included)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("SFRSegmentationLib."):
            found.add(node.module.split(".")[1])
    return {m for m in found if m in LIB_MODULES}


def test_the_lib_has_no_import_cycle():
    graph = {m: _lib_imports(LIB / f"{m}.py") for m in LIB_MODULES}
    # Depth-first search for a back edge; the cycle is reported as a path.
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle in SFRSegmentationLib: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in LIB_MODULES:
        if m not in state:
            visit(m)
    # The layering the module's docs describe: jobs (and what runs them) below the logic.
    for low in ("jobs", "native", "worker", "inputs", "steps", "binding"):
        assert "logic" not in graph[low], f"{low} imports logic"


@pytest.mark.parametrize("module", LIB_MODULES)
def test_each_lib_module_imports_alone_in_a_fresh_interpreter(module):
    if module in NEEDS_SLICER:
        pytest.importorskip("slicer", reason="slicer-core is not installed: run scripts/setup.sh")
    code = f"import sys; sys.path.insert(0, {str(MODULE_DIR)!r}); import importlib; importlib.import_module('SFRSegmentationLib.{module}')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]


def _png_size(path: Path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    # Every chunk's CRC is right (a truncated or hand-edited file would not be).
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, f"{path}: bad CRC in chunk {kind}"
        pos += 12 + length
    return width, height


def test_extension_metadata_and_icon():
    assert _png_size(MODULE_DIR / "Resources" / "Icons" / "SFRSegmentation.png") == (128, 128)
    ext = (REPO / "slicer_module" / "CMakeLists.txt").read_text()
    meta = dict(re.findall(r'set\((EXTENSION_\w+)\s+"([^"]*)"\)', ext))
    assert meta["EXTENSION_CATEGORY"] == "Segmentation"
    assert meta["EXTENSION_DESCRIPTION"] and meta["EXTENSION_CONTRIBUTORS"]
    # Contributors as in Cargo.toml's authors.
    cargo = (REPO / "Cargo.toml").read_text()
    authors = re.search(r"authors\s*=\s*\[(.*?)\]", cargo, re.S)
    if authors:
        for a in re.findall(r'"([^"<]+?)\s*(?:<[^>]*>)?"', authors.group(1)):
            assert a.strip() in meta["EXTENSION_CONTRIBUTORS"], a
    # No invented URL: the project has no public home yet.
    assert "sfr-segmentation/sfr" not in ext
    assert "EXTENSION_LICENSE" not in meta or meta["EXTENSION_LICENSE"] == "Apache-2.0"
    assert (REPO / "LICENSE").is_file()
    assert "Apache" in ext and "LICENSE" in ext


def test_the_catalog_entry_follows_the_index_schema(tmp_path):
    import json
    import subprocess

    script = REPO / "slicer_module" / "make_catalog_entry.py"
    url = "https://example.org/sfr.git"
    out = subprocess.run([sys.executable, str(script), "--scm-url", url, "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    entry = json.loads((tmp_path / "SFRSegmentation.json").read_text())
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "build_subdirectory", "enabled", "tier"}
    assert set(entry) <= allowed and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["scm_url"] == url and entry["category"] == "Segmentation"
    assert (REPO / entry["build_subdirectory"] / "CMakeLists.txt").is_file()
    # An address that is not one is refused, and nothing is written.
    bad = subprocess.run([sys.executable, str(script), "--scm-url", "TODO", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--scm-url" in bad.stderr and not (tmp_path / "x").exists()
