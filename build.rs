//! Link settings that tch/torch-sys do not make, so that `libsfr.so` behaves like a system
//! library and the binaries run without LD_LIBRARY_PATH:
//! * RUNPATH to the libtorch folder torch-sys linked against (`links = "torch"` ->
//!   `DEP_TCH_LIBTORCH_LIB`; where that is absent we ask the Python that torch-sys used), after
//!   `$ORIGIN`. The CMake install rewrites it (cmake/install_library.cmake); the two entries give
//!   the in-place edit room for `$ORIGIN` plus a libtorch path of the same length;
//! * libtorch_cuda linked with `--no-as-needed` when the libtorch folder has it: nothing in tch
//!   references its symbols (CUDA registers itself from static constructors), so `--as-needed`
//!   would drop it and `Cuda::is_available()` would be false on a GPU machine (a known tch issue);
//! * for the cdylib: SONAME `libsfr.so.0.MINOR` (0.x: a minor version may break the ABI) or
//!   `libsfr.so.MAJOR`, and `--exclude-libs,ALL` so that only the crate's own `#[no_mangle]`
//!   functions (`sfr_*`) are exported, not those of the static archives of dependencies
//!   (`tch_*`/`atc_*` of torch-sys's C++ wrapper, `bz_internal_error`, ...).
//!
//! `SFR_LINK_CUDA=0` builds without libtorch_cuda even where the folder has it (a CPU-only
//! package); `SFR_LINK_CUDA=1` makes its absence an error.
use std::path::Path;
use std::process::Command;

fn libtorch_lib_dir() -> Option<String> {
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        return Some(dir);
    }
    if let Ok(root) = std::env::var("LIBTORCH") {
        return Some(format!("{root}/lib"));
    }
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python)
        .args(["-c", "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8(out.stdout).ok()?.trim().to_string())
}

/// The SONAME for the package version: pre-1.0, `libsfr.so.0.MINOR`; from 1.0, `libsfr.so.MAJOR`.
fn soname() -> String {
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap();
    let minor = std::env::var("CARGO_PKG_VERSION_MINOR").unwrap();
    if major == "0" {
        format!("libsfr.so.0.{minor}")
    } else {
        format!("libsfr.so.{major}")
    }
}

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    println!("cargo:rerun-if-env-changed=PYTHON_SYS_EXECUTABLE");
    println!("cargo:rerun-if-env-changed=SFR_LINK_CUDA");
    println!("cargo:rerun-if-changed=build.rs");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux");
    let dir = libtorch_lib_dir();
    match &dir {
        Some(dir) => {
            println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN:{dir}");
            println!("cargo:rustc-env=SFR_LIBTORCH_LIB={dir}");
            // The Python whose torch we link (`sfr bench` compares against it without the user
            // naming a venv): the one torch-sys was told to use, else the interpreter of the
            // environment that holds `<prefix>/lib/pythonX.Y/site-packages/torch/lib`.
            let python = std::env::var("PYTHON_SYS_EXECUTABLE").ok().or_else(|| {
                let prefix = Path::new(dir).ancestors().nth(5)?;
                let p = prefix.join("bin/python");
                p.exists().then(|| p.display().to_string())
            });
            if let Some(python) = python {
                println!("cargo:rustc-env=SFR_BUILD_PYTHON={python}");
            }
        }
        None => println!("cargo:warning=libtorch folder not found: binaries will need LD_LIBRARY_PATH"),
    }
    let has_cuda = dir.as_ref().is_some_and(|d| Path::new(d).join("libtorch_cuda.so").exists());
    let link_cuda = match std::env::var("SFR_LINK_CUDA").unwrap_or_default().as_str() {
        "" | "auto" => has_cuda,
        "0" => false,
        "1" if has_cuda => true,
        "1" => panic!("SFR_LINK_CUDA=1 but the libtorch folder {dir:?} has no libtorch_cuda.so (a CPU-only libtorch?)"),
        other => panic!("SFR_LINK_CUDA must be 0, 1 or auto, not {other:?}"),
    };
    if link_cuda && linux {
        // push/pop-state: only this one library is linked unconditionally.
        let dir = dir.as_deref().unwrap();
        println!("cargo:rustc-link-arg=-Wl,-L{dir},--push-state,--no-as-needed,-ltorch_cuda,--pop-state");
    }
    if linux {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,{}", soname());
        println!("cargo:rustc-cdylib-link-arg=-Wl,--exclude-libs,ALL");
    }
}
