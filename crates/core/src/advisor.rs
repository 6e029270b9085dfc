//! The scan-time advisor (Linux 6.8, `advisor_mode=scan-time`): after every
//! full scan it retunes `pages_to_scan` so a full scan takes about
//! `advisor_target_scan_time` seconds, within `advisor_max_cpu` percent of a
//! CPU and `advisor_max_pages_to_scan`. The arithmetic is the kernel's
//! `scan_time_advisor()`, integer for integer.

use crate::tunables::{AdvisorMode, Tunables};

/// The kernel's `KSM_ADVISOR_MIN_CPU`.
const MIN_CPU: u64 = 10;
/// The kernel's `EWMA_WEIGHT`.
const EWMA_WEIGHT: u64 = 30;

/// The advisor's memory between full scans (the kernel's `advisor_ctx`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdvisorCtx {
    /// When the current full scan started (ms).
    pub start_scan_ms: u64,
    /// CPU time at the end of the previous full scan (ns).
    pub cpu_ns: u64,
    /// Length of the previous full scan (s).
    pub scan_time: u64,
    /// Smoothed change of the scan time (percent).
    pub change: u64,
}

fn ewma(prev: u64, curr: u64) -> u64 {
    ((100 - EWMA_WEIGHT) * prev + EWMA_WEIGHT * curr) / 100
}

/// The new `pages_to_scan` at the end of a full scan, updating `ctx`; `None`
/// when the advisor is off.
pub fn scan_time_advisor(ctx: &mut AdvisorCtx, t: &Tunables, now_ms: u64, cpu_ns: u64) -> Option<u32> {
    if t.advisor_mode != AdvisorMode::ScanTime {
        return None;
    }
    let scan_time = (now_ms.saturating_sub(ctx.start_scan_ms) / 1000).max(1);
    let cpu_time_diff_ms = cpu_ns.saturating_sub(ctx.cpu_ns) / 1_000_000;
    let cpu_percent = (cpu_time_diff_ms * 100 / (scan_time * 1000)).max(1);
    let last_scan_time = if ctx.scan_time != 0 { ctx.scan_time } else { scan_time };
    let factor = (t.advisor_target_scan_time * 100 / scan_time).max(1);
    let change = ewma(ctx.change, (scan_time * 100 / last_scan_time).max(1));
    let pages_to_scan = t.pages_to_scan as u64;
    let mut pages = pages_to_scan * 100 / factor;
    pages = pages * change / 100;
    let per_page_cost = (pages_to_scan / cpu_percent).max(1);
    pages = pages.min(per_page_cost * t.advisor_max_cpu as u64);
    pages = pages.max(per_page_cost * MIN_CPU);
    pages = pages.min(t.advisor_max_pages_to_scan as u64);
    ctx.change = change;
    ctx.scan_time = scan_time;
    ctx.cpu_ns = cpu_ns;
    Some(pages.min(u32::MAX as u64) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on() -> Tunables {
        Tunables { advisor_mode: AdvisorMode::ScanTime, pages_to_scan: 500, ..Tunables::default() }
    }

    #[test]
    fn off_means_no_advice() {
        assert_eq!(scan_time_advisor(&mut AdvisorCtx::default(), &Tunables::default(), 5000, 0), None);
    }

    #[test]
    fn a_slow_scan_is_sped_up_toward_the_target_and_capped() {
        // A full scan of 400 s against a target of 200 s, at 5% CPU.
        let t = on();
        let mut ctx = AdvisorCtx::default();
        let p = scan_time_advisor(&mut ctx, &t, 400_000, 20_000_000_000).unwrap();
        // factor 50 -> pages 1000, change ewma(0, 100) = 30 -> 300; per-page cost
        // 500/5 = 100 -> at least 10% (1000), at most 70% (7000).
        assert_eq!(p, 1000);
        assert_eq!((ctx.scan_time, ctx.change), (400, 30));
    }

    #[test]
    fn a_fast_scan_is_slowed_and_the_max_pages_cap_holds() {
        let mut t = on();
        t.pages_to_scan = 30_000;
        let mut ctx = AdvisorCtx { scan_time: 10, change: 100, ..AdvisorCtx::default() };
        // 10 s scans at 90% CPU against 200 s: factor 2000 -> 1500 pages,
        // change stays 100; CPU cap: 30000/90 = 333 per percent -> 70% = 23310.
        let p = scan_time_advisor(&mut ctx, &t, 10_000, 9_000_000_000).unwrap();
        assert_eq!(p, 3330, "the 10% CPU floor (333 * 10) wins over 1500");
        t.advisor_max_pages_to_scan = 2000;
        let p = scan_time_advisor(&mut ctx, &t, 10_000, 9_000_000_000).unwrap();
        assert!(p <= 2000);
    }
}
