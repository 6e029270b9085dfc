//! The daemon's figures as the kernel names them system-wide
//! (`/sys/kernel/mm/ksm/*`): what `samepage sysfs` shows and what
//! `samepage daemon --metrics` exports, from [`PartitionStatus`] alone.

use crate::protocol::{PartitionStatus, ProcessStatus};
use samepage_core::{Counters, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

/// Bytes of metadata a process's `ksm_process_profit` charges it: its
/// merged and zero pages' worth less its profit (never negative).
fn process_metadata_bytes(r: &ProcessStatus) -> u64 {
    let gross = i128::from(r.ksm_merging_pages + r.ksm_zero_pages) * i128::from(PAGE);
    u64::try_from((gross - i128::from(r.ksm_process_profit)).max(0)).unwrap_or(u64::MAX)
}

/// One partition's counters with the kernel's names and meanings.
///
/// * `pages_shared`, `pages_sharing`, `stable_node_chains`,
///   `stable_node_dups`: the partition's stable tree;
/// * `pages_unshared`: its unstable tree; `pages_volatile`: rmap items in
///   neither tree (`ksm_rmap_items - pages_shared - pages_sharing -
///   pages_unshared`, as the kernel derives it);
/// * `ksm_zero_pages`, `rmap_items`: the sums of the processes' reports;
///   `full_scans`: the busiest process's (each engine scans its own memory);
/// * `metadata_bytes`: the daemon's (trees, pool index) and every
///   process's own (what its `ksm_process_profit` charges);
///   `general_profit`: `(pages_sharing + ksm_zero_pages) * page size -
///   metadata_bytes`, as the kernel's;
/// * `pages_scanned`, `pages_skipped`, `cow_faults`, `merges`, `unmerges`:
///   sums of the engines' own counters, for the engines that send them
///   ([`ProcessStatus::counters`]; 0 otherwise), those of engines gone
///   included ([`PartitionStatus::gone`]): like the kernel's, they never go
///   back; so does `full_scans`, the most any engine has reached.
pub fn partition_counters(p: &PartitionStatus) -> Counters {
    let mut c = Counters { pages_unshared: p.unshared, metadata_bytes: p.metadata_bytes, ..Counters::default() };
    add_cumulative(&mut c, &p.gone);
    for r in &p.processes {
        c.rmap_items += r.ksm_rmap_items;
        c.ksm_zero_pages += r.ksm_zero_pages;
        c.full_scans = c.full_scans.max(r.full_scans);
        c.metadata_bytes += process_metadata_bytes(r);
        if let Some(e) = &r.counters {
            add_cumulative(&mut c, e);
        }
    }
    c.derive_from_stable(&p.stable);
    c
}

/// Adds the counters of an engine that only ever grow (`pages_scanned`,
/// `pages_skipped`, `cow_faults`, `merges`, `unmerges`) to `to`, and keeps
/// the larger `full_scans`.
fn add_cumulative(to: &mut Counters, e: &Counters) {
    to.pages_scanned += e.pages_scanned;
    to.pages_skipped += e.pages_skipped;
    to.cow_faults += e.cow_faults;
    to.merges += e.merges;
    to.unmerges += e.unmerges;
    to.full_scans = to.full_scans.max(e.full_scans);
}

/// Keeps in `gone` ([`PartitionStatus::gone`]) what the engine of report
/// `r`, which left, had counted.
pub fn retire(gone: &mut Counters, r: &ProcessStatus) {
    let mut e = r.counters.as_deref().cloned().unwrap_or_default();
    e.full_scans = r.full_scans;
    add_cumulative(gone, &e);
}

/// The system's counters: every partition's added up, `full_scans` the
/// busiest partition's.
pub fn system_counters(parts: &[PartitionStatus]) -> Counters {
    Counters::sum(&parts.iter().map(partition_counters).collect::<Vec<_>>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use samepage_core::shared::ClientId;
    use samepage_core::stable::StableStats;

    #[test]
    fn counters_follow_the_kernels_definitions() {
        let proc = |client, merging, zero, rmap, profit, scans| ProcessStatus {
            client: ClientId(client),
            pid: client as i32,
            ksm_rmap_items: rmap,
            ksm_zero_pages: zero,
            ksm_merging_pages: merging,
            ksm_process_profit: profit,
            full_scans: scans,
            ..ProcessStatus::default()
        };
        let p = PartitionStatus {
            uid: 0,
            domain: 0,
            stable: StableStats { nodes: 4, mappings: 64, chains: 0, dups: 0 },
            slots_in_use: 4,
            orphans: 0,
            pool_bytes: 4 * PAGE,
            requests: 9,
            // 32 merged pages each, one of them 8 zero pages too; 100 and
            // 200 bytes of metadata.
            processes: vec![proc(1, 32, 0, 40, 32 * 4096 - 100, 7), proc(2, 32, 8, 50, 40 * 4096 - 200, 3)],
            clients: vec![],
            unshared: 10,
            metadata_bytes: 1000,
            gone: Counters::default(),
        };
        let c = partition_counters(&p);
        assert_eq!((c.pages_shared, c.pages_sharing, c.pages_unshared), (4, 60, 10));
        assert_eq!(c.pages_volatile, 90 - 64 - 10);
        assert_eq!((c.ksm_zero_pages, c.full_scans, c.metadata_bytes), (8, 7, 1300));
        assert_eq!(c.general_profit, (60 + 8) * 4096 - 1300);
        let two = system_counters(&[p.clone(), p]);
        assert_eq!((two.pages_sharing, two.full_scans, two.general_profit), (120, 7, 2 * ((60 + 8) * 4096 - 1300)));
        assert_eq!(system_counters(&[]), Counters::default());
    }
}
