"""Writes the extension's catalog entry for the Slicer Extensions Index (SFRSegmentation.json,
catalog-entry schema v1.0.1), from the extension's own CMakeLists.txt and the repository's
public address, which only the publisher knows (no address is made up here):

    python slicer_module/make_catalog_entry.py --scm-url https://github.com/OWNER/REPO [--revision main] [--out DIR]

The file goes into a fork of Slicer/ExtensionsIndex. The schema admits only these keys; the
homepage, icon, screenshots and contributors are read by the index from CMakeLists.txt.
"""
import argparse
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#"
ALLOWED_KEYS = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                "build_subdirectory", "enabled", "tier"}
REQUIRED_KEYS = {"$schema", "category", "scm_url"}


def cmake_setting(name):
    text = open(os.path.join(HERE, "CMakeLists.txt"), encoding="utf-8").read()
    m = re.search(r'set\(%s\s+"([^"]*)"\)' % re.escape(name), text)
    if not m:
        sys.exit(f"make_catalog_entry: {name} is not set in slicer_module/CMakeLists.txt")
    return m.group(1)


def entry(scm_url, revision):
    if not re.match(r"^(https://|git@)\S+$", scm_url):
        sys.exit(f"make_catalog_entry: --scm-url must be the repository's clone address, not {scm_url!r}")
    depends = cmake_setting("EXTENSION_DEPENDS")
    e = {
        "$schema": SCHEMA,
        "build_dependencies": [] if depends in ("", "NA") else depends.split(";"),
        # The extension's CMake project is the slicer_module folder of the repository.
        "build_subdirectory": "slicer_module",
        "category": cmake_setting("EXTENSION_CATEGORY"),
        "scm_revision": revision,
        "scm_type": "git",
        "scm_url": scm_url,
        "tier": 1,  # experimental: not yet built by the index's factory on every platform
    }
    assert set(e) <= ALLOWED_KEYS and REQUIRED_KEYS <= set(e)
    return e


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scm-url", required=True)
    ap.add_argument("--revision", default="main")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    e = entry(args.scm_url, args.revision)  # checked before anything is written
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "SFRSegmentation.json")
    with open(path + ".part", "w", encoding="utf-8") as f:
        json.dump(e, f, indent=2)
        f.write("\n")
    os.replace(path + ".part", path)
    print(path)


if __name__ == "__main__":
    main()
