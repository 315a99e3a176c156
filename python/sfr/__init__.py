"""SFR (Stitching, Fine-tuning, Re-training): the `sfr` command-line tool and the `libsfr` C
library, as installed by the wheel.

The wheel carries no Python API of the method itself: it carries the native tool and library and
tells where they are, for programs that call them (the 3D Slicer module, C/C++ builds):

    sfr.executable()   the `sfr` program (also on PATH as `sfr` after `pip install`)
    sfr.library()      libsfr's shared library (its C API: sfr.include_dir() / sfr.h)
    sfr.cmake_dir()    the folder to give CMake as SFR_DIR (find_package(SFR))
    sfr.pkgconfig_dir()  the folder to add to PKG_CONFIG_PATH (pkg-config sfr)

Both native files find libtorch through a RUNPATH relative to themselves
(`$ORIGIN/../../torch/lib`): the `torch` package installed beside this one, which the wheel
declares as its dependency. Nothing here reads LD_LIBRARY_PATH or an absolute build path.
"""
import os
import sys

__all__ = ["executable", "library", "include_dir", "cmake_dir", "pkgconfig_dir", "main"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def _existing(path, what):
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{what} is missing from the installed sfr package ({path}); reinstall the wheel")
    return path


def executable():
    """Path of the `sfr` program inside the package."""
    return _existing(os.path.join(_HERE, "bin", "sfr"), "the sfr program")


def library():
    """Path of libsfr (named by its SONAME, as programs record it)."""
    lib = os.path.join(_HERE, "lib")
    names = sorted(n for n in os.listdir(lib) if n.startswith("libsfr.so.")) if os.path.isdir(lib) else []
    if not names:
        raise FileNotFoundError(f"libsfr is missing from the installed sfr package ({lib}); reinstall the wheel")
    # The shortest versioned name is the SONAME (libsfr.so.0.1 before libsfr.so.0.1.0).
    return os.path.join(lib, min(names, key=len))


def include_dir():
    """Folder holding sfr.h."""
    return _existing(os.path.join(_HERE, "include"), "the include folder")


def cmake_dir():
    """Folder holding SFRConfig.cmake (pass as -DSFR_DIR=...)."""
    return _existing(os.path.join(_HERE, "lib", "cmake", "SFR"), "the CMake package")


def pkgconfig_dir():
    """Folder holding sfr.pc (add to PKG_CONFIG_PATH)."""
    return _existing(os.path.join(_HERE, "lib", "pkgconfig"), "the pkg-config file")


def main():
    """Console entry point: runs the packaged `sfr` program with this process's arguments."""
    exe = executable()
    argv = [exe] + sys.argv[1:]
    if os.name == "posix":
        os.execv(exe, argv)  # the program replaces this interpreter: signals and exit status are its own
    import subprocess
    sys.exit(subprocess.call(argv))
