//! The two merging sides `demo` and `bench` measure on the same content: the
//! kernel's ksmd ([`KernelSide`]) and samepage's engine ([`SamepageSide`]),
//! behind one [`Side`] trait.
//!
//! A run goes: write the workload into [`Side::mem`], [`Side::ready`] (take
//! the merging side in hand, not merging yet), [`Side::memory`] before,
//! [`Side::start`], [`Side::poll`] until the counters hold still,
//! [`Side::stop`], [`Side::memory`] after and [`Side::counters`]. Dropping a
//! side puts everything back (ksmd's settings, `vm.max_map_count`).

use crate::kernel::KernelKsm;
use crate::measure::Progress;
use crate::procfs;
use crate::sysctl::{self, MapCountGuard};
use crate::workload::{Mem, PAGE};
use anyhow::{Context, Result};
use samepage::testing::AnonMapping;
use samepage::{Engine, Region, RegionId, Run, Tunables};
use std::time::Duration;

/// The tunables both sides are given, by their sysfs names.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// `pages_to_scan`.
    pub pages_to_scan: u32,
    /// `sleep_millisecs`.
    pub sleep_millisecs: u32,
    /// `max_page_sharing`.
    pub max_page_sharing: u32,
    /// `use_zero_pages`.
    pub use_zero_pages: bool,
}

/// Something that merges the pages of a workload: the kernel's ksmd or samepage.
pub trait Side {
    /// How reports name it ("kernel ksmd", "samepage").
    fn label(&self) -> &'static str;
    /// The memory the workload is written into.
    fn mem(&self) -> &dyn Mem;
    /// That memory as a plain mapping, where the program owns it (the
    /// kernel's side; samepage with huge pages).
    fn mapping(&self) -> Option<&AnonMapping>;
    /// Takes the merging side in hand once the workload is written, without
    /// merging yet: ksmd's tunables saved and set; memory the program owns
    /// registered with samepage.
    fn ready(&mut self) -> Result<()>;
    /// Starts merging.
    fn start(&mut self) -> Result<()>;
    /// The counters merging has reached, and the full scans and CPU since [`Side::start`].
    fn poll(&self) -> Result<Progress>;
    /// Every counter by its kernel name (the cumulative ones count from [`Side::ready`]).
    fn counters(&self) -> Result<Vec<(&'static str, i64)>>;
    /// Stops merging; merged pages stay merged.
    fn stop(&mut self) -> Result<()>;
    /// Whether merging adds mappings to the process (samepage maps each run
    /// of merged pages; their `vm_area_struct`s are part of its metadata).
    fn adds_mappings(&self) -> bool;
}

/// The metadata merging costs, from the counters: the kernel's own accounting,
/// `general_profit = (pages_sharing + ksm_zero_pages) * page size - metadata`
/// (samepage's `general_profit` charges its `metadata_bytes` the same way).
pub fn metadata_bytes(counters: &[(&'static str, i64)]) -> i64 {
    let get = |n: &str| counters.iter().find(|(k, _)| *k == n).map_or(0, |(_, v)| *v);
    ((get("pages_sharing") + get("ksm_zero_pages")) * PAGE as i64 - get("general_profit")).max(0)
}

/// The kernel's ksmd merging a mapping of this process (`MADV_MERGEABLE`).
pub struct KernelSide {
    /// Dropped first: ksmd stops and unmerges before the mapping goes.
    ksm: Option<KernelKsm>,
    m: AnonMapping,
    settings: Settings,
    /// ksmd's CPU time and full scans at [`Side::start`].
    cpu0: Duration,
    scans0: u64,
}

impl KernelSide {
    /// `len` bytes of fresh anonymous memory (in transparent huge pages with `thp`).
    pub fn new(len: usize, thp: bool, settings: Settings) -> Result<KernelSide> {
        let m = if thp { AnonMapping::new_huge(len)? } else { AnonMapping::new(len)? };
        Ok(KernelSide { ksm: None, m, settings, cpu0: Duration::ZERO, scans0: 0 })
    }

    fn ksm(&self) -> Result<&KernelKsm> {
        self.ksm.as_ref().context("kernel KSM not taken: Side::ready first")
    }

    fn get(&self, name: &str) -> Result<u64> {
        Ok(self.ksm()?.get(name)? as u64)
    }
}

impl Side for KernelSide {
    fn label(&self) -> &'static str {
        "kernel ksmd"
    }

    fn mem(&self) -> &dyn Mem {
        &self.m
    }

    fn mapping(&self) -> Option<&AnonMapping> {
        Some(&self.m)
    }

    fn ready(&mut self) -> Result<()> {
        let k = KernelKsm::take()?;
        let s = self.settings;
        for (name, v) in [
            ("pages_to_scan", s.pages_to_scan.to_string()),
            ("sleep_millisecs", s.sleep_millisecs.to_string()),
            ("max_page_sharing", s.max_page_sharing.to_string()),
            ("use_zero_pages", u8::from(s.use_zero_pages).to_string()),
        ] {
            k.set(name, &v)?;
        }
        self.ksm = Some(k);
        Ok(())
    }

    fn start(&mut self) -> Result<()> {
        self.cpu0 = self.ksm()?.ksmd_cpu();
        self.scans0 = self.get("full_scans")?;
        self.m.advise_kernel_mergeable()?;
        self.ksm()?.set("run", "1")?;
        Ok(())
    }

    fn poll(&self) -> Result<Progress> {
        Ok(Progress {
            key: (self.get("pages_shared")?, self.get("pages_sharing")?, self.get("ksm_zero_pages")?),
            unshared: self.get("pages_unshared")?,
            full_scans: self.get("full_scans")? - self.scans0,
            cpu: self.ksm()?.ksmd_cpu().saturating_sub(self.cpu0),
        })
    }

    fn counters(&self) -> Result<Vec<(&'static str, i64)>> {
        Ok(self.ksm()?.counters()?)
    }

    fn stop(&mut self) -> Result<()> {
        Ok(self.ksm()?.set("run", "0")?)
    }

    fn adds_mappings(&self) -> bool {
        false
    }
}

/// How to set up samepage's side.
#[derive(Clone, Debug)]
pub struct SamepageOptions {
    /// The engine's tunables (`run` is set by [`Side::start`] and [`Side::stop`]).
    pub tunables: Tunables,
    /// Share of the `vm.max_map_count` headroom the engine may use.
    pub vma_share: f64,
    /// Bytes of memory for the workload.
    pub len: usize,
    /// Transparent huge pages the program maps and registers, instead of a
    /// region the engine allocates.
    pub thp: bool,
    /// Raise `vm.max_map_count` (as root) so this many merged pages, each
    /// taking up to two mappings, fit in the engine's share.
    pub raise_map_count_for: Option<u64>,
}

/// samepage's engine merging memory of this process.
pub struct SamepageSide {
    /// The huge-page mapping's registration, undone on drop.
    registered: Option<RegionId>,
    region: Option<Region>,
    huge: Option<AnonMapping>,
    engine: Engine,
    /// `vm.max_map_count` before and after it was raised for this side.
    pub raised: Option<(u64, u64)>,
    /// Dropped last: the limit comes back once the engine's mappings are gone.
    _map_count: Option<MapCountGuard>,
}

impl SamepageSide {
    /// An engine (stopped) and the memory for the workload.
    pub fn new(o: SamepageOptions) -> Result<SamepageSide> {
        let mut raised = None;
        let mut guard = None;
        if let Some(pages) = o.raise_map_count_for {
            // Isolated merges take up to two mappings each.
            let want = procfs::mappings() + ((pages * 2 + 10_000) as f64 / o.vma_share.max(0.01)) as u64;
            if let Some((g, old)) = sysctl::raise(want) {
                raised = Some((old, want));
                guard = Some(g);
            }
        }
        let engine = Engine::with_vma_budget(Tunables { run: Run::Stop, ..o.tunables }, o.vma_share)?;
        let (region, huge) =
            if o.thp { (None, Some(AnonMapping::new_huge(o.len)?)) } else { (Some(engine.alloc_region(o.len)?), None) };
        Ok(SamepageSide { registered: None, region, huge, engine, raised, _map_count: guard })
    }

    /// The engine, for what only samepage has (stable pages needed, system call counts, ...).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

impl Drop for SamepageSide {
    fn drop(&mut self) {
        if let Some(id) = self.registered.take() {
            let _ = self.engine.unregister(id);
        }
    }
}

impl Side for SamepageSide {
    fn label(&self) -> &'static str {
        "samepage"
    }

    fn mem(&self) -> &dyn Mem {
        match (&self.region, &self.huge) {
            (Some(r), _) => r,
            (None, Some(m)) => m,
            (None, None) => unreachable!("a region or a mapping, from new"),
        }
    }

    fn mapping(&self) -> Option<&AnonMapping> {
        self.huge.as_ref()
    }

    fn ready(&mut self) -> Result<()> {
        if let (Some(m), None) = (&self.huge, self.registered) {
            // SAFETY: the mapping outlives its registration (undone on drop,
            // before the mapping is unmapped).
            self.registered = Some(unsafe { self.engine.register(m.as_ptr(), m.len()) }?);
        }
        Ok(())
    }

    fn start(&mut self) -> Result<()> {
        Ok(self.engine.set_run(Run::Merge)?)
    }

    fn poll(&self) -> Result<Progress> {
        let c = self.engine.counters()?;
        Ok(Progress {
            key: (c.pages_shared, c.pages_sharing, c.ksm_zero_pages),
            unshared: c.pages_unshared,
            full_scans: c.full_scans,
            cpu: self.engine.cpu_time(),
        })
    }

    fn counters(&self) -> Result<Vec<(&'static str, i64)>> {
        Ok(self.engine.counters()?.named())
    }

    fn stop(&mut self) -> Result<()> {
        Ok(self.engine.set_run(Run::Stop)?)
    }

    fn adds_mappings(&self) -> bool {
        true
    }
}
