//! libtorch's intra-op threads, sized to the cores that other work leaves free.
//!
//! Why: libtorch's CPU kernels (its own loops, oneDNN's convolutions, MKL) run in OpenMP
//! parallel regions of the libgomp bundled with the PyTorch wheel. Every region ends at a
//! barrier, and a V-Net step is thousands of small regions. With one thread per core and
//! another program busy on one of the cores, the thread that shares that core finishes its
//! share late at every barrier while the others spin there (libgomp spins ~300,000 rounds
//! before it sleeps), so the step slowed to 2.9× its quiet time on a 2-core machine, where
//! one thread (leaving the busy core alone) ran at 1.7×. (The numbers, and what else was
//! measured, are in README's "Benchmarks".) libgomp's wait policy is read from the
//! environment when the library loads, before any of our code runs, so a library cannot
//! change it for its host program; the thread count it can change at any time.
//!
//! So with `threads: 0` (auto, the default) the loops that run libtorch (V-Net training,
//! SAM fine-tuning and pseudo-labelling) call [`tick`] once per
//! iteration; at most every [`INTERVAL`] it reads how busy the cores this process may run on
//! were since the last reading (/proc/stat) minus this process's own CPU time
//! (/proc/self/stat), i.e. the cores that other work took, and sets the threads to the cores
//! left: `cores - others`, between 1 and libtorch's default. An explicit `threads > 0` is set
//! once and kept. Where /proc cannot be read (not Linux), auto stays at libtorch's default.
//! Segmentation does not follow the load: [`fixed_for_inference`] keeps its labels reproducible.
//!
//! The setting is process-wide, like libtorch's own (the C ABI documents this): the last
//! [`configure`] wins, and later segmentations in the process follow it. OpenMP keeps the
//! count per calling thread, so [`tick`] applies it on the thread that runs the loop.
//!
//! Results: the thread count changes only the order of floating-point reductions (random
//! draws do not depend on it; `tests/pipeline.rs` checks both), so runs that must be
//! bit-identical set a fixed `threads`.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How often auto mode re-reads the load: long enough to average over many scheduler time
/// slices (and 50+ clock ticks per core), short enough to follow a program that starts or
/// stops within a few iterations. A reading costs tens of microseconds.
pub const INTERVAL: Duration = Duration::from_millis(500);

/// Cumulative CPU time in clock ticks (USER_HZ, the unit of both /proc files), summed over
/// the cores this process may run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    /// Busy time of those cores: user, nice, system, irq, softirq and steal (a hypervisor
    /// that runs another guest on our core takes it just like a local program).
    pub busy: u64,
    /// Busy plus idle and iowait: the time that passed, times the cores.
    pub all: u64,
}

/// Sums the `cpuN` lines of /proc/stat for the cores in `cores` (the aggregate `cpu` line
/// would count cores outside this process's affinity, e.g. under `taskset`). None if no
/// wanted core has a well-formed line.
pub fn parse_proc_stat(text: &str, cores: &[usize]) -> Option<CpuTimes> {
    let mut sum = CpuTimes { busy: 0, all: 0 };
    let mut found = false;
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(n) = fields.next().and_then(|name| name.strip_prefix("cpu")).and_then(|n| n.parse::<usize>().ok()) else {
            continue;
        };
        if !cores.contains(&n) {
            continue;
        }
        // user nice system idle iowait irq softirq steal guest guest_nice; guest time is
        // already inside user and nice. Kernels before 2.6.33 have fewer columns (then 0).
        let v: Vec<u64> = match fields.take(8).map(str::parse).collect() {
            Ok(v) => v,
            Err(_) => return None,
        };
        if v.len() < 4 {
            return None;
        }
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
        sum.busy += busy;
        sum.all += busy + at(3) + at(4);
        found = true;
    }
    found.then_some(sum)
}

/// utime + stime (fields 14 and 15) of a /proc/<pid>/stat line: the CPU time of all the
/// process's threads, in clock ticks. The command name (field 2) is in parentheses and may
/// itself hold spaces and parentheses, so fields are counted from the last ')'.
pub fn parse_own_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11); // fields 3..=13
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// One reading: the cores' times and this process's CPU time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    pub cores: CpuTimes,
    pub own: u64,
}

/// Cores' worth of CPU that work other than this process took between two readings; None
/// when no time passed or the counters went backwards (a reading from another set of cores).
pub fn others_busy_cores(before: &Reading, after: &Reading, cores: usize) -> Option<f64> {
    let all = after.cores.all.checked_sub(before.cores.all)?;
    let busy = after.cores.busy.checked_sub(before.cores.busy)?;
    let own = after.own.checked_sub(before.own)?;
    if all == 0 {
        return None;
    }
    // Own time is counted per process and the cores' per tick, so own can exceed busy by a
    // tick or two: that is no work of others.
    Some(busy.saturating_sub(own) as f64 / all as f64 * cores as f64)
}

/// The threads for `cores` cores of which others took `others` (in cores): the cores left,
/// a core counted as taken once others use at least half of it, and between 1 and `max`.
pub fn threads_for(cores: usize, max: usize, others: f64) -> usize {
    let taken = if others.is_finite() { others.max(0.0).round() as usize } else { 0 };
    cores.saturating_sub(taken).min(max).max(1)
}

/// The cores this process may run on (its affinity mask), in /proc/stat's numbering.
#[cfg(target_os = "linux")]
fn allowed_cores() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set, and sched_getaffinity writes at most
    // its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

#[cfg(not(target_os = "linux"))]
fn allowed_cores() -> Vec<usize> {
    Vec::new()
}

fn read(cores: &[usize]) -> Option<Reading> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    Some(Reading { cores: parse_proc_stat(&stat, cores)?, own: parse_own_ticks(&own)? })
}

/// What auto mode knows between ticks (one per process: the load is the machine's).
struct Auto {
    cores: Vec<usize>,
    /// libtorch's default, at most the cores: the most auto ever sets.
    max: usize,
    last: Option<(Instant, Reading)>,
    /// The current choice, and the cores others took when it was made.
    threads: usize,
    others: f64,
}

/// 0: auto; n > 0: fixed at n.
static SETTING: AtomicUsize = AtomicUsize::new(0);
static AUTO: OnceLock<Mutex<Auto>> = OnceLock::new();

/// libtorch's default thread count, read once before this module changes it (it follows
/// OMP_NUM_THREADS / MKL_NUM_THREADS, else the machine's cores).
pub fn default_threads() -> usize {
    static DEFAULT: OnceLock<usize> = OnceLock::new();
    *DEFAULT.get_or_init(|| tch::get_num_threads().max(1) as usize)
}

fn auto() -> &'static Mutex<Auto> {
    AUTO.get_or_init(|| {
        let cores = allowed_cores();
        let n = if cores.is_empty() { default_threads() } else { cores.len() };
        let max = default_threads().min(n).max(1);
        Mutex::new(Auto { cores, max, last: None, threads: max, others: 0.0 })
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sets the policy: `threads` = 0 auto, n > 0 fixed at n (a config's `threads`). Applies it to
/// the calling thread at once and starts measuring the load for auto.
pub fn configure(threads: usize) {
    default_threads(); // before anything is set
    SETTING.store(threads, Ordering::Relaxed);
    tick();
}

/// Called by every loop that runs libtorch, once per iteration (cheap: a clock read between
/// readings): re-decides in auto mode when [`INTERVAL`] has passed, and applies the decision
/// to the calling thread. Returns the threads in use.
pub fn tick() -> usize {
    let setting = SETTING.load(Ordering::Relaxed);
    let want = if setting > 0 { setting } else { decide(Instant::now()) };
    if tch::get_num_threads() != want as i32 {
        tch::set_num_threads(want as i32);
    }
    want
}

fn decide(now: Instant) -> usize {
    let mut a = lock(auto());
    if a.last.is_some_and(|(t, _)| now.duration_since(t) < INTERVAL) {
        return a.threads;
    }
    let Some(reading) = read(&a.cores) else {
        return a.threads; // no /proc: libtorch's default
    };
    if let Some((_, before)) = a.last {
        if let Some(others) = others_busy_cores(&before, &reading, a.cores.len()) {
            let threads = threads_for(a.cores.len(), a.max, others);
            if threads != a.threads {
                log::debug!("libtorch threads {} -> {threads}: other work took {others:.2} of {} cores", a.threads, a.cores.len());
            }
            a.others = others;
            a.threads = threads;
        }
    }
    a.last = Some((now, reading));
    a.threads
}

/// Segmentation runs at a fixed count: the configured one, or libtorch's default in auto mode.
/// The count changes the order of floating-point sums, which can flip a voxel at a near tie,
/// and a scan segmented twice by one model must give the same labels whatever else the
/// machine was doing. Applied to the calling thread; returns the count.
pub fn fixed_for_inference() -> usize {
    let setting = SETTING.load(Ordering::Relaxed);
    let want = if setting > 0 { setting } else { default_threads() };
    if tch::get_num_threads() != want as i32 {
        tch::set_num_threads(want as i32);
    }
    want
}

/// The last auto decision: (threads, cores that other work took); for logs and the bench.
pub fn auto_state() -> (usize, f64) {
    let a = lock(auto());
    (a.threads, a.others)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  3363053 230475 294430 466255 5076 0 2184 17512 0 0
cpu0 1633586 120053 140611 285439 1122 0 105 8592 0 0
cpu1 1729466 110421 153819 180815 3953 0 2079 8920 0 0
intr 18450145 0 0 0
ctxt 27069660
btime 1700000000
processes 11268
";

    #[test]
    fn proc_stat_sums_the_wanted_cores_only() {
        let cpu0_busy = 1633586 + 120053 + 140611 + 105 + 8592;
        let cpu1_busy = 1729466 + 110421 + 153819 + 2079 + 8920;
        let both = parse_proc_stat(STAT, &[0, 1]).unwrap();
        assert_eq!(both.busy, cpu0_busy + cpu1_busy);
        assert_eq!(both.all, cpu0_busy + cpu1_busy + 285439 + 1122 + 180815 + 3953);
        let one = parse_proc_stat(STAT, &[1]).unwrap();
        assert_eq!(one, CpuTimes { busy: cpu1_busy, all: cpu1_busy + 180815 + 3953 });
        // The aggregate line is not a core; cores not listed are not counted.
        assert_eq!(parse_proc_stat(STAT, &[7]), None);
        assert_eq!(parse_proc_stat(STAT, &[]), None);
        // Old kernels: four columns (user nice system idle).
        assert_eq!(parse_proc_stat("cpu0 10 2 3 50\n", &[0]), Some(CpuTimes { busy: 15, all: 65 }));
        // Damaged lines are no reading rather than a wrong one.
        assert_eq!(parse_proc_stat("cpu0 10 x 3 50\n", &[0]), None);
        assert_eq!(parse_proc_stat("cpu0 10 2\n", &[0]), None);
    }

    #[test]
    fn own_ticks_survive_odd_command_names() {
        let line = |comm: &str| format!("4242 ({comm}) R 1 4242 4242 0 -1 4194304 9000 0 0 0 1234 567 0 0 20 0 3 0 100 0 0");
        assert_eq!(parse_own_ticks(&line("sfr")), Some(1234 + 567));
        assert_eq!(parse_own_ticks(&line("a b) R 9 9 (c")), Some(1234 + 567));
        assert_eq!(parse_own_ticks("4242 (sfr) R 1 2"), None);
        assert_eq!(parse_own_ticks("no parenthesis"), None);
    }

    fn reading(busy: u64, all: u64, own: u64) -> Reading {
        Reading { cores: CpuTimes { busy, all }, own }
    }

    #[test]
    fn others_are_the_busy_time_not_ours() {
        let before = reading(1000, 4000, 300);
        // 2 cores, 100 ticks each passed (all +200); busy +180 of which ours +80: others 100 = 1 core.
        assert_eq!(others_busy_cores(&before, &reading(1180, 4200, 380), 2), Some(1.0));
        // Ours a tick above the cores' busy time: nobody else.
        assert_eq!(others_busy_cores(&before, &reading(1100, 4200, 401), 2), Some(0.0));
        // No time passed, or counters from elsewhere: no estimate.
        assert_eq!(others_busy_cores(&before, &before, 2), None);
        assert_eq!(others_busy_cores(&before, &reading(900, 4200, 380), 2), None);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn this_machine_can_be_read() {
        let cores = allowed_cores();
        assert!(!cores.is_empty(), "no core in the affinity mask");
        let r = read(&cores).expect("/proc/stat and /proc/self/stat parse");
        assert!(r.cores.busy <= r.cores.all, "{r:?}");
    }

    #[test]
    fn threads_fill_the_free_cores() {
        // Quiet machine: libtorch's default (here the cores), never more.
        assert_eq!(threads_for(2, 2, 0.0), 2);
        assert_eq!(threads_for(16, 8, 0.0), 8);
        // One busy program on 2 cores (seen as 0.67 while our spinning threads share its core).
        assert_eq!(threads_for(2, 2, 1.0), 1);
        assert_eq!(threads_for(2, 2, 0.67), 1);
        // Light background work (under half a core) leaves the core to us.
        assert_eq!(threads_for(2, 2, 0.3), 2);
        // Everything busy: still one thread, never zero.
        assert_eq!(threads_for(2, 2, 3.5), 1);
        assert_eq!(threads_for(16, 16, 5.2), 11);
        // Nonsense in, the safe side out.
        assert_eq!(threads_for(4, 4, f64::NAN), 4);
        assert_eq!(threads_for(4, 4, -1.0), 4);
        assert_eq!(threads_for(0, 4, 0.0), 1);
    }
}
