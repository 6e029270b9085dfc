//! The kernel's own KSM, driven through `/sys/kernel/mm/ksm` (root only), for
//! side-by-side comparisons on the same content.
//!
//! [`KernelKsm::take`] saves every tunable it may change; dropping it stops
//! ksmd, unmerges (`run` 2 then 0) and puts the saved values back.

use std::fs;
use std::io;
use std::path::Path;
use std::time::Duration;

const DIR: &str = "/sys/kernel/mm/ksm";
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
        let k = KernelKsm { saved, ksmd: find_ksmd() };
        k.set("run", "2").map_err(|e| KernelKsmError::Unavailable(e.to_string()))?;
        k.set("run", "0")?;
        Ok(k)
    }

    /// Writes a tunable.
    pub fn set(&self, name: &str, value: &str) -> Result<(), KernelKsmError> {
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

    /// ksmd's CPU time (utime + stime from `/proc/PID/stat`).
    pub fn ksmd_cpu(&self) -> Duration {
        let Some(pid) = self.ksmd else {
            return Duration::ZERO;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return Duration::ZERO;
        };
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        // Fields 14 and 15 of stat, counted after the comm field (field 2): indexes 11 and 12.
        let ticks: u64 =
            f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0) + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        let hz = rustix::param::clock_ticks_per_second();
        Duration::from_nanos(ticks * 1_000_000_000 / hz.max(1))
    }
}

impl Drop for KernelKsm {
    fn drop(&mut self) {
        let _ = self.set("run", "2");
        let _ = self.set("run", "0");
        for (name, value) in &self.saved {
            if *name != "run" {
                let _ = self.set(name, value.trim());
            }
        }
        if let Some((_, run)) = self.saved.iter().find(|(n, _)| *n == "run") {
            let _ = self.set("run", run.trim());
        }
    }
}

fn read(name: &str) -> Result<String, KernelKsmError> {
    fs::read_to_string(path(name)).map_err(|err| KernelKsmError::Io { file: path(name), err })
}

fn find_ksmd() -> Option<u32> {
    for e in fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "ksmd") {
            return Some(pid);
        }
    }
    None
}
