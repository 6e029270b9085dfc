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

/// Polls until the counters hold still for two full scans (and at least four
/// full scans have ended since the first poll); returns the time
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
        // Two quiet scans, and four since the first poll: a scan was in
        // progress at that poll, and a page needs two more over its content
        // (checksum, unstable tree) before anything can merge.
        if scans >= scans_at_change + 2 && scans >= first.full_scans + 4 {
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

/// Memory at one moment, before or after merging: system-wide, and this
/// process's own.
///
/// The system-wide figures move whenever another process allocates or frees,
/// so on a busy machine they can say anything. The workload lives in this
/// process, and so does everything either side merges, so this process's
/// own accounting holds: `/proc/self/smaps_rollup`'s `Pss_Anon + Pss_Shmem`.
/// Why those fields:
///
/// * The kernel's KSM pages are anonymous pages mapped many times
///   (`Anonymous`, and `Rss`, count every mapping in full and barely move
///   when ksmd merges: 257.4 -> 257.4 MiB for `demo --size 256M --kernel`).
///   `Pss` divides each page by its mapcount, so all the mappings of one KSM
///   page add up to one page. Zero pages (`use_zero_pages`, either side) are
///   not counted at all.
/// * samepage's merged pages are pages of its pool, a memfd mapped
///   `MAP_PRIVATE` (and once more by the engine's own view): they are shmem
///   pages, counted in `Pss_Shmem`, divided by mapcount the same way, so the
///   pool counts once. Measured equal to the memfd's allocated size
///   (`st_blocks`) after convergence; it would fall short of it only for
///   pool pages nothing maps that are not freed yet (`pool_slots_pending`).
/// * `Pss_Anon` also holds samepage's own metadata (rmap items, trees), so
///   samepage's figure is net of it; the kernel's metadata is kernel memory
///   (slab), outside the process.
///
/// Both assume no other process maps these pages (a forked child would take
/// its share of the `Pss`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    /// System-wide `AnonPages` (/proc/meminfo), bytes.
    pub anon: u64,
    /// System-wide `Shmem` (/proc/meminfo; samepage's pool is a memfd), bytes.
    pub shmem: u64,
    /// This process: `Pss_Anon + Pss_Shmem` (/proc/self/smaps_rollup), bytes.
    pub process: u64,
    /// System-wide kernel memory merging costs: `SUnreclaim` (the
    /// `vm_area_struct`s and maple-tree nodes of samepage's mappings; the
    /// kernel KSM's rmap items and stable nodes) plus `PageTables`, bytes.
    pub kernel: u64,
}

impl Memory {
    /// Memory now.
    pub fn now() -> Memory {
        let rollup = procfs::smaps_rollup(&["Pss_Anon", "Pss_Shmem"]);
        let [anon, shmem, slab, tables] = procfs::meminfo(&["AnonPages", "Shmem", "SUnreclaim", "PageTables"]);
        Memory {
            anon: anon.unwrap_or(0),
            shmem: shmem.unwrap_or(0),
            process: rollup.iter().map(|v| v.unwrap_or(0)).sum(),
            kernel: slab.unwrap_or(0) + tables.unwrap_or(0),
        }
    }

    /// [`Memory::freed_system`] net of the kernel memory that grew meanwhile
    /// (`SUnreclaim + PageTables`): what merging really gave back, with
    /// what each side costs the kernel (ksmd's rmap items and stable nodes,
    /// samepage's mappings) counted against it. Moves when anything else
    /// allocates kernel memory.
    pub fn freed_with_kernel(&self, after: &Memory) -> i64 {
        self.freed_system(after) - (after.kernel as i64 - self.kernel as i64)
    }

    /// Bytes freed system-wide from `self` to `after`: the drop of anonymous
    /// memory net of the growth of shared memory (samepage's pool). Moves
    /// when other processes allocate or free.
    pub fn freed_system(&self, after: &Memory) -> i64 {
        self.anon as i64 - after.anon as i64 - (after.shmem as i64 - self.shmem as i64)
    }

    /// Bytes this process freed from `self` to `after`, pool and samepage's
    /// metadata included.
    pub fn freed_process(&self, after: &Memory) -> i64 {
        self.process as i64 - after.process as i64
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
