//! The kernel's own KSM, driven through `/sys/kernel/mm/ksm` (root only), for
//! side-by-side comparisons on the same content.
//!
//! [`KernelKsm::take`] saves every tunable it may change; dropping it stops
//! ksmd, unmerges (`run` 2 then 0) and puts the saved values back. If a
//! signal ends the process, [`restore_after_signal`] does the same.

use std::fs;
use std::io;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

/// What to put back if the process is interrupted while it holds ksmd.
static SAVED_FOR_SIGNAL: Mutex<Vec<(&'static str, String)>> = Mutex::new(Vec::new());
/// Set once a signal handler restored the settings: later writes are dropped.
static SIGNALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The kernel's KSM directory.
pub(crate) const DIR: &str = "/sys/kernel/mm/ksm";
/// The counters of `/sys/kernel/mm/ksm` this kernel has: samepage's
/// counter names (which are the kernel's, in sysfs order, plus samepage's
/// own) that exist as files there.
fn sysfs_counters() -> Vec<&'static str> {
    samepage::Counters::default().named().into_iter().map(|(n, _)| n).filter(|n| Path::new(&path(n)).exists()).collect()
}
const SAVED: [&str; 5] = ["pages_to_scan", "sleep_millisecs", "max_page_sharing", "use_zero_pages", "run"];

/// Errors driving the kernel's KSM.
#[derive(Debug, thiserror::Error)]
pub enum KernelKsmError {
    /// `/sys/kernel/mm/ksm` is missing (kernel built without KSM) or not writable (not root).
    #[error("kernel KSM is not available here ({0}): needs CONFIG_KSM and root")]
    Unavailable(String),
    /// A sysfs file could not be read or written.
    #[error("{file}: {err}")]
    Io {
        /// The file.
        file: String,
        /// The error.
        err: io::Error,
    },
}

/// The kernel's KSM, borrowed for a measurement.
#[derive(Debug)]
pub struct KernelKsm {
    saved: Vec<(&'static str, String)>,
    ksmd: Option<u32>,
    /// The counters this kernel has.
    counters: Vec<&'static str>,
    /// Cumulative counters at `take`.
    base: Vec<(&'static str, i64)>,
}

fn path(name: &str) -> String {
    format!("{DIR}/{name}")
}

impl KernelKsm {
    /// Takes control of ksmd: saves the tunables, stops and unmerges.
    pub fn take() -> Result<KernelKsm, KernelKsmError> {
        if !Path::new(DIR).exists() {
            return Err(KernelKsmError::Unavailable(format!("{DIR} does not exist")));
        }
        let mut saved = Vec::new();
        for name in SAVED {
            saved.push((name, read(name)?));
        }
        *SAVED_FOR_SIGNAL.lock().unwrap_or_else(|e| e.into_inner()) = saved.clone();
        let mut k = KernelKsm { saved, ksmd: find_ksmd(), counters: sysfs_counters(), base: Vec::new() };
        k.set("run", "2").map_err(|e| KernelKsmError::Unavailable(e.to_string()))?;
        k.set("run", "0")?;
        for n in ["pages_scanned", "full_scans", "pages_skipped"] {
            let v = k.get(n)?;
            k.base.push((n, v));
        }
        Ok(k)
    }

    /// Writes a tunable.
    pub fn set(&self, name: &str, value: &str) -> Result<(), KernelKsmError> {
        // Serialised with `restore_after_signal`, which wins for good.
        let _g = SAVED_FOR_SIGNAL.lock().unwrap_or_else(|e| e.into_inner());
        if SIGNALLED.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        fs::write(path(name), value).map_err(|err| KernelKsmError::Io { file: path(name), err })
    }

    /// Reads a counter or tunable as a number.
    pub fn get(&self, name: &str) -> Result<i64, KernelKsmError> {
        let s = read(name)?;
        s.trim().parse().map_err(|_| KernelKsmError::Io {
            file: path(name),
            err: io::Error::new(io::ErrorKind::InvalidData, format!("not a number: {s:?}")),
        })
    }

    /// Every counter in `/sys/kernel/mm/ksm`, as `(name, value)` pairs; the
    /// cumulative ones (`pages_scanned`, `full_scans`, `pages_skipped`) count
    /// from when this [`KernelKsm`] was taken.
    pub fn counters(&self) -> Result<Vec<(&'static str, i64)>, KernelKsmError> {
        self.counters
            .iter()
            .map(|&n| {
                let base = self.base.iter().find(|(b, _)| *b == n).map_or(0, |(_, v)| *v);
                Ok((n, self.get(n)? - base))
            })
            .collect()
    }

    /// ksmd's CPU time (utime + stime from `/proc/PID/stat`).
    pub fn ksmd_cpu(&self) -> Duration {
        self.ksmd.map_or(Duration::ZERO, crate::procfs::cpu_time)
    }
}

impl Drop for KernelKsm {
    fn drop(&mut self) {
        let mut g = SAVED_FOR_SIGNAL.lock().unwrap_or_else(|e| e.into_inner());
        if !SIGNALLED.load(std::sync::atomic::Ordering::SeqCst) {
            restore(&self.saved);
        }
        g.clear();
    }
}

fn restore(saved: &[(&'static str, String)]) {
    let set = |n: &str, v: &str| fs::write(path(n), v);
    let _ = set("run", "2");
    let _ = set("run", "0");
    for (name, value) in saved {
        if *name != "run" {
            let _ = set(name, value.trim());
        }
    }
    if let Some((_, run)) = saved.iter().find(|(n, _)| *n == "run") {
        let _ = set("run", run.trim());
    }
}

/// Puts ksmd's settings back if a [`KernelKsm`] is alive: for a signal
/// handler that is about to exit the process without running destructors.
pub fn restore_after_signal() {
    let mut g = SAVED_FOR_SIGNAL.lock().unwrap_or_else(|e| e.into_inner());
    SIGNALLED.store(true, std::sync::atomic::Ordering::SeqCst);
    let saved = std::mem::take(&mut *g);
    if !saved.is_empty() {
        restore(&saved);
    }
}

/// One file of [`DIR`], as the kernel formats it.
pub(crate) fn read(name: &str) -> Result<String, KernelKsmError> {
    fs::read_to_string(path(name)).map_err(|err| KernelKsmError::Io { file: path(name), err })
}

fn find_ksmd() -> Option<u32> {
    for e in fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if crate::procfs::comm(pid).is_some_and(|c| c == "ksmd") {
            return Some(pid);
        }
    }
    None
}
