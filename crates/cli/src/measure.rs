//! Measurements shared by `demo` and `bench`.

use crate::procfs;
use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use std::time::{Duration, Instant};

/// What a poll of the merging side reports.
pub struct Progress {
    /// `(pages_shared, pages_sharing, ksm_zero_pages)`: what merging has
    /// reached. (`pages_unshared` is left out: with smart_scan, unique pages
    /// written at different times go in and out of the unstable tree on
    /// their own schedules, so it need never hold still.)
    pub key: (u64, u64, u64),
    /// `pages_unshared`, shown only.
    pub unshared: u64,
    /// Full scans so far.
    pub full_scans: u64,
    /// CPU the merging side has used.
    pub cpu: Duration,
}

/// Polls until the counters hold still for two full scans; returns the time
/// and CPU at the last change.
pub fn converge(
    timeout: Duration,
    json: bool,
    mut poll: impl FnMut() -> Result<Progress>,
) -> Result<(Duration, Duration)> {
    let bar = if json { ProgressBar::hidden() } else { ProgressBar::new_spinner() };
    bar.set_style(ProgressStyle::with_template("{spinner} {elapsed} {msg}").expect("template"));
    bar.enable_steady_tick(Duration::from_millis(100));
    let start = Instant::now();
    let first = poll()?;
    let (mut last, mut scans_at_change) = (first.key, first.full_scans);
    let (mut t_change, mut cpu_change) = (Duration::ZERO, Duration::ZERO);
    loop {
        std::thread::sleep(Duration::from_millis(10));
        let Progress { key, unshared, full_scans: scans, cpu } = poll()?;
        if key != last {
            last = key;
            scans_at_change = scans;
            t_change = start.elapsed();
            cpu_change = cpu;
        }
        bar.set_message(format!(
            "full_scans {scans}  pages_shared {}  pages_sharing {}  ksm_zero_pages {}  pages_unshared {}",
            key.0, key.1, key.2, unshared
        ));
        if scans >= scans_at_change + 2 && scans >= 3 {
            break;
        }
        if start.elapsed() > timeout {
            bar.finish_and_clear();
            anyhow::bail!(
                "no convergence after {timeout:?}: counters still changing (full_scans {scans}, pages_shared {}, \
                 pages_sharing {}, ksm_zero_pages {}, pages_unshared {})",
                key.0,
                key.1,
                key.2,
                unshared
            );
        }
    }
    bar.finish_and_clear();
    Ok((t_change, cpu_change))
}

/// Memory at one moment, before or after merging.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    /// System-wide `AnonPages` (/proc/meminfo), bytes.
    pub anon: u64,
    /// System-wide `Shmem` (/proc/meminfo; samepage's pool is a memfd), bytes.
    pub shmem: u64,
}

impl Memory {
    /// Memory now.
    pub fn now() -> Memory {
        Memory { anon: procfs::meminfo("AnonPages").unwrap_or(0), shmem: procfs::meminfo("Shmem").unwrap_or(0) }
    }

    /// Bytes freed system-wide from `self` to `after`: the drop of anonymous
    /// memory net of the growth of shared memory (samepage's pool). Moves
    /// when other processes allocate or free.
    pub fn freed_system(&self, after: &Memory) -> i64 {
        self.anon as i64 - after.anon as i64 - (after.shmem as i64 - self.shmem as i64)
    }
}

/// Bytes of `vm_area_struct` slab in use (/proc/slabinfo, root only; 0 if unreadable).
pub fn vma_slab_bytes() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/slabinfo") else { return 0 };
    text.lines()
        .find(|l| l.starts_with("vm_area_struct "))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(f.get(1)?.parse::<u64>().ok()? * f.get(3)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}
