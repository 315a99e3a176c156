//! tch links libtorch but emits no rpath, so binaries would need LD_LIBRARY_PATH.
//! torch-sys exports the libtorch folder it linked against (`links = "torch"` ->
//! `DEP_TCH_LIBTORCH_LIB`); where that is absent we ask the Python that torch-sys used.
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

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    println!("cargo:rerun-if-env-changed=PYTHON_SYS_EXECUTABLE");
    println!("cargo:rerun-if-changed=build.rs");
    match libtorch_lib_dir() {
        Some(dir) => {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
            println!("cargo:rustc-env=SFR_LIBTORCH_LIB={dir}");
        }
        None => println!("cargo:warning=libtorch folder not found: binaries will need LD_LIBRARY_PATH"),
    }
}
