//! glibc's allocator told to keep freed memory in the process, for the `sfr` tool.
//!
//! Why: a V-Net forward on one 112×112×80 window allocates and frees tensors of 64–260 MB.
//! glibc serves every block above its mmap threshold (at most 32 MB) with a fresh `mmap` and
//! gives it back with `munmap` when freed, so each forward page-faults hundreds of megabytes
//! into existence again, zeroed by the kernel: on the project's 2-core CPU a batch-4 eval
//! forward in PyTorch took 5.7 s with glibc's defaults and 3.2 s with mmap off (the same
//! process, `MALLOC_MMAP_MAX_=0`); the time went to the kernel. With mmap off and a high trim
//! threshold, freed blocks stay in the heap and the next forward reuses them.
//!
//! One arena: threads other than the main one allocate from glibc's per-thread arenas, heaps
//! that glibc mmaps itself in pieces of at most 64 MB. A block that does not fit one (LiteMedSAM's
//! stage-0 activations at 256×256 are 64 MB) is mmapped whatever `M_MMAP_MAX` says, and freed
//! heaps are unmapped, so the page faults came back for work that runs off the main thread:
//! `sfr train` runs its job on a worker thread, where LiteMedSAM's encoder took 1.8 s a canvas
//! against 0.9 s in `sfr bench` (main thread), and the kernel's page clearing and unmapping
//! were the top of `perf`'s profile. With `M_ARENA_MAX` 1 every thread allocates from the main
//! heap (brk, mmap off): 1.1 s a canvas; SFR's whole SAM stage in the demo's setting went
//! from 261 s to 158 s. Tensors are allocated per operation, so one arena's lock is not
//! contended.
//!
//! The cost: memory freed during a run is not returned to the system until the process ends
//! (the peak stays resident). That suits a command-line run; the library does not do this
//! to a host program by itself ([`keep_freed_memory`] is for programs that own their process).
//! An allocator setting the user already made (`GLIBC_TUNABLES`, `MALLOC_MMAP_MAX_`,
//! `MALLOC_TRIM_THRESHOLD_`, `MALLOC_ARENA_MAX`) wins, and `SFR_MALLOC=system` keeps glibc's
//! defaults.

/// Turns glibc's mmap allocations off, its heap trimming nearly off and its arenas down to the
/// main one, unless the environment chose otherwise (see the module documentation). Call
/// first thing in `main`, before threads start. Returns whether the setting was made (false
/// off glibc).
pub fn keep_freed_memory() -> bool {
    if environment_decides(|name| std::env::var_os(name)) {
        return false;
    }
    set()
}

/// Whether the environment (read through `var`) keeps the allocator's settings from us: one
/// of glibc's own allocator variables is set, or `SFR_MALLOC=system`.
fn environment_decides(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> bool {
    let glibc_chose = ["GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX"].iter().any(|v| var(v).is_some());
    glibc_chose || var("SFR_MALLOC").is_some_and(|v| v == "system")
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set() -> bool {
    // SAFETY: mallopt only changes the allocator's parameters; called before other threads
    // exist, as glibc recommends. Returns 1 on success.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1 && libc::mallopt(libc::M_ARENA_MAX, 1) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::environment_decides;
    use std::ffi::OsString;

    /// An environment holding exactly `vars`.
    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| OsString::from(v))
    }

    #[test]
    fn the_users_allocator_settings_win() {
        assert!(!environment_decides(env(&[])), "nothing set: SFR makes its setting");
        assert!(!environment_decides(env(&[("SFR_MALLOC", "arena"), ("PATH", "/bin")])), "only SFR_MALLOC=system opts out");
        assert!(environment_decides(env(&[("SFR_MALLOC", "system")])));
        for glibc in ["GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX"] {
            assert!(environment_decides(env(&[(glibc, "")])), "{glibc} set, even empty, is the user's choice");
        }
    }
}
