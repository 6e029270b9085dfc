//! `samepage torture`: the engine at full speed over memory full of
//! duplicates while threads, the kernel and forked children write into it,
//! regions come and go and `run` moves between 0, 1 and 2. A shadow copy of
//! every write is kept; every byte is compared at checkpoints and at the end.

use anyhow::{bail, Result};
use clap::Args;
use samepage::testing::{self, AnonMapping};
use samepage::{Counters, Engine, RegionId, Run, Tunables};
use serde_json::json;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::workload::PAGE;

#[derive(Args, Debug)]
pub struct TortureArgs {
    /// How long to run.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    seconds: u64,
    /// Registered regions.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    regions: u64,
    /// Pages per region.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(16..=1_048_576))]
    pages: u64,
    /// Writer threads (plain writes, read(2) and recv(2) into pages, forks).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=64))]
    writers: u64,
    /// max_page_sharing (small, so chains churn).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(2..=i32::MAX as i64))]
    max_page_sharing: u32,
    /// Back the regions with transparent huge pages (`MADV_HUGEPAGE`), so
    /// huge pages are split (copied into small pages) and kept whole under
    /// the writes.
    #[arg(long)]
    thp: bool,
    /// thp_split_min_subpages (with --thp).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=512))]
    thp_split_min_subpages: u32,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Merge across this many client processes of a daemon instead, killing
    /// clients (SIGKILL) and killing and restarting the daemon every third
    /// of the run (`--pages` per process; 0: one process, the threads above).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=64))]
    processes: u64,
}

/// A few contents every page starts from and returns to, so pages merge and re-merge.
fn common(k: u64, out: &mut [u8; PAGE]) {
    if k == 0 {
        out.fill(0);
    } else {
        crate::workload::gen_page(0xC0FFEE + k, out);
    }
}

#[derive(Default)]
struct Tally {
    writes: AtomicU64,
    kernel_writes: AtomicU64,
    forks: AtomicU64,
    child_failures: AtomicU64,
    corrupted_bytes: AtomicU64,
    lost_writes: AtomicU64,
    checkpoints: AtomicU64,
    reregisters: AtomicU64,
    run_changes: AtomicU64,
    unmaps: AtomicU64,
    remaps: AtomicU64,
    protects: AtomicU64,
    errors: Mutex<Vec<String>>,
}

struct Region {
    mem: AnonMapping,
    id: Mutex<Option<RegionId>>,
}

/// Compares this thread's pages with its shadow; returns (pages, bytes) that differ.
fn verify(regions: &[Region], mine: &[(usize, usize)], shadow: &[[u8; PAGE]]) -> (u64, u64) {
    differing(mine.iter().zip(shadow), |&(r, p), buf| regions[r].mem.read(p * PAGE, buf).expect("inside"))
}

/// Pages that differ from their shadow and the bytes that differ: `read`
/// copies the page a key names.
fn differing<'a, K: 'a>(
    pages: impl Iterator<Item = (K, &'a [u8; PAGE])>,
    mut read: impl FnMut(K, &mut [u8; PAGE]),
) -> (u64, u64) {
    let mut buf = [0u8; PAGE];
    let (mut n, mut bytes) = (0, 0);
    for (key, want) in pages {
        read(key, &mut buf);
        let bad = buf.iter().zip(want).filter(|(a, b)| a != b).count() as u64;
        n += u64::from(bad > 0);
        bytes += bad;
    }
    (n, bytes)
}

fn writer(t: u64, a: &TortureArgs, regions: &[Region], stop: &AtomicBool, tally: &Tally) {
    let nthreads = a.writers as usize;
    let mine: Vec<(usize, usize)> = (0..regions.len())
        .flat_map(|r| (0..a.pages as usize).map(move |p| (r, p)))
        .filter(|(r, p)| (r * 7 + p) % nthreads == t as usize)
        .collect();
    let mut shadow: Vec<[u8; PAGE]> = Vec::with_capacity(mine.len());
    let mut buf = [0u8; PAGE];
    for &(r, p) in &mine {
        regions[r].mem.read(p * PAGE, &mut buf).expect("inside");
        shadow.push(buf);
    }
    let mut rng = fastrand::Rng::with_seed(a.seed * 1000 + t);
    let (pr, pw) = rustix::pipe::pipe().expect("pipe");
    let (sa, sb) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::DGRAM,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .expect("socketpair");
    let mut last_check = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let k = rng.usize(..mine.len());
        let (r, p) = mine[k];
        let base = regions[r].mem.as_ptr();
        let op = rng.u8(..);
        if op < 60 {
            // Back to a common content: it merges again.
            common(rng.u64(..6), &mut buf);
            regions[r].mem.write(p * PAGE, &buf).expect("inside");
            shadow[k] = buf;
        } else if op < 200 {
            let off = rng.usize(..PAGE - 16);
            let len = rng.usize(1..16);
            let mut data = [0u8; 16];
            rng.fill(&mut data[..len]);
            regions[r].mem.write(p * PAGE + off, &data[..len]).expect("inside");
            shadow[k][off..off + len].copy_from_slice(&data[..len]);
        } else if op < 250 {
            // The kernel writes for us: read(2) from a pipe, recv(2) from a socket.
            let off = rng.usize(..PAGE - 64);
            let len = rng.usize(1..64);
            let mut data = [0u8; 64];
            rng.fill(&mut data[..len]);
            // A raw destination inside the page this thread owns, handed to
            // the kernel; no Rust reference to shared memory is made.
            let dst = base as usize + p * PAGE + off;
            let res = if op & 1 == 0 {
                rustix::io::write(&pw, &data[..len]).map_err(std::io::Error::from).and_then(|_| {
                    // SAFETY: `dst..dst+len` lies in a page only this thread writes.
                    unsafe { testing::read_into(&pr, dst, len) }
                })
            } else {
                rustix::net::send(&sa, &data[..len], rustix::net::SendFlags::empty())
                    .map_err(std::io::Error::from)
                    .and_then(|_| {
                        // SAFETY: as above.
                        unsafe { testing::recv_into(&sb, dst, len) }
                    })
            };
            match res {
                Ok(got) if got == len => {
                    shadow[k][off..off + len].copy_from_slice(&data[..len]);
                    tally.kernel_writes.fetch_add(1, Ordering::Relaxed);
                }
                Ok(got) => tally.errors.lock().unwrap().push(format!("short kernel write: {got} of {len}")),
                Err(e) => tally.errors.lock().unwrap().push(format!("kernel write into a page failed: {e}")),
            }
        } else if op == 250 && t == 0 && rng.u8(..) < 8 {
            fork_and_check(regions, &mine, &shadow, tally);
        }
        n += 1;
        if n.is_multiple_of(256) {
            tally.writes.fetch_add(256, Ordering::Relaxed);
        }
        if last_check.elapsed() > Duration::from_secs(2) {
            let (pages, bytes) = verify(regions, &mine, &shadow);
            tally.lost_writes.fetch_add(pages, Ordering::Relaxed);
            tally.corrupted_bytes.fetch_add(bytes, Ordering::Relaxed);
            tally.checkpoints.fetch_add(1, Ordering::Relaxed);
            if pages > 0 {
                // Resynchronise so one loss is not counted again at every checkpoint.
                for (k, &(r, p)) in mine.iter().enumerate() {
                    regions[r].mem.read(p * PAGE, &mut shadow[k]).expect("inside");
                }
            }
            last_check = Instant::now();
        }
    }
    tally.writes.fetch_add(n % 256, Ordering::Relaxed);
    let (pages, bytes) = verify(regions, &mine, &shadow);
    tally.lost_writes.fetch_add(pages, Ordering::Relaxed);
    tally.corrupted_bytes.fetch_add(bytes, Ordering::Relaxed);
}

/// Pages of the area the program unmaps, moves and protects.
const REMAP_PAGES: usize = 1024;

fn page_ptr(base: usize, i: usize) -> usize {
    base + i * PAGE
}

/// Copies page `i` of the area out with volatile reads (the engine maps pages under us).
fn read_page(base: usize, i: usize, out: &mut [u8; PAGE]) {
    for (k, b) in out.iter_mut().enumerate() {
        // SAFETY: the caller names a mapped, readable page of the area.
        *b = unsafe { std::ptr::read_volatile((page_ptr(base, i) + k) as *const u8) };
    }
}

fn write_page(base: usize, i: usize, data: &[u8; PAGE]) {
    for (k, b) in data.iter().enumerate() {
        // SAFETY: the caller names a mapped, writable page of the area.
        unsafe { std::ptr::write_volatile((page_ptr(base, i) + k) as *mut u8, *b) };
    }
}

/// Pages `range` at `base` that differ from `shadow`, and their differing bytes.
fn compare(base: usize, range: std::ops::Range<usize>, shadow: &[[u8; PAGE]]) -> (u64, u64) {
    differing(range.clone().zip(&shadow[range]), |i, buf| read_page(base, i, buf))
}

/// The program's side of `munmap`, `mremap` and `mprotect` on registered
/// memory: it takes a part back with `Engine::unregister_range`, unmaps,
/// moves or protects it, checks it, puts it back and registers it again,
/// while the engine keeps merging the rest of the area.
fn remapper(engine: &Engine, seed: u64, stop: &AtomicBool, tally: &Tally) -> Result<()> {
    use samepage::testing as mem;
    let len = REMAP_PAGES * PAGE;
    let base = mem::map_anon(len)?;
    let mut shadow = vec![[0u8; PAGE]; REMAP_PAGES];
    for (i, s) in shadow.iter_mut().enumerate() {
        common(i as u64 % 6, s);
        write_page(base, i, s);
    }
    // SAFETY: the area stays mapped while registered; parts are released
    // with unregister_range before they are unmapped, moved or protected.
    let whole = unsafe { engine.register(base as *mut u8, len) }?;
    // Live pieces: (region, first page, end page).
    let mut pieces: Vec<(RegionId, usize, usize)> = vec![(whole, 0, REMAP_PAGES)];
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut buf = [0u8; PAGE];
    // `at`: where page 0 of the area would be (pages move with a moved part).
    let check = |range: std::ops::Range<usize>, at: usize, shadow: &[[u8; PAGE]]| {
        let (pages, bytes) = compare(at, range, shadow);
        tally.lost_writes.fetch_add(pages, Ordering::Relaxed);
        tally.corrupted_bytes.fetch_add(bytes, Ordering::Relaxed);
    };
    while !stop.load(Ordering::Relaxed) {
        // Writes, some back to common contents so they merge again.
        for _ in 0..32 {
            let i = rng.usize(..REMAP_PAGES);
            if rng.bool() {
                common(rng.u64(..6), &mut buf);
            } else {
                buf = shadow[i];
                let off = rng.usize(..PAGE);
                buf[off] = rng.u8(..);
            }
            write_page(base, i, &buf);
            shadow[i] = buf;
        }
        // A part of one live piece goes back to the program.
        let (id, s, e) = pieces.remove(rng.usize(..pieces.len()));
        let k = rng.usize(1..=64.min(e - s));
        let a = s + rng.usize(..=(e - s - k));
        engine.unregister_range(page_ptr(base, a) as *mut u8, k * PAGE)?;
        pieces.extend([(id, s, a), (id, a + k, e)].into_iter().filter(|p| p.1 < p.2));
        let (addr, bytes) = (page_ptr(base, a), k * PAGE);
        match rng.u8(..3) {
            0 => {
                // SAFETY: released above; only this thread uses the area.
                unsafe { mem::unmap(addr, bytes) }?;
                // SAFETY: the hole this thread just made.
                unsafe { mem::map_anon_fixed(addr, bytes) }?;
                for (i, page) in shadow.iter_mut().enumerate().skip(a).take(k) {
                    common(rng.u64(..6), page);
                    write_page(base, i, page);
                }
                tally.unmaps.fetch_add(1, Ordering::Relaxed);
            }
            1 => {
                // SAFETY: released above; only this thread uses the area.
                let moved = unsafe { mem::remap_anywhere(addr, bytes) }?;
                check(a..a + k, moved - a * PAGE, &shadow);
                let i = a + rng.usize(..k);
                shadow[i][rng.usize(..PAGE)] ^= 0x5a;
                write_page(moved - a * PAGE, i, &shadow[i]);
                // SAFETY: `moved` is this thread's; `addr` the hole it left.
                unsafe { mem::move_mapping(moved, bytes, addr) }?;
                tally.remaps.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                // SAFETY: released above; only this thread uses the area, and
                // it only reads it while read-only and leaves it alone while
                // inaccessible.
                unsafe { mem::protect(addr, bytes, true, false) }?;
                check(a..a + k, base, &shadow);
                // SAFETY: as above.
                unsafe { mem::protect(addr, bytes, false, false) }?;
                std::thread::sleep(Duration::from_micros(200));
                // SAFETY: as above.
                unsafe { mem::protect(addr, bytes, true, true) }?;
                tally.protects.fetch_add(1, Ordering::Relaxed);
            }
        }
        check(a..a + k, base, &shadow);
        // SAFETY: as at the first registration.
        let again = unsafe { engine.register(addr as *mut u8, bytes) }?;
        pieces.push((again, a, a + k));
        if pieces.len() > 48 {
            // Consolidate: every region of the area leaves, the whole area comes back as one.
            unregister_all(engine, &mut pieces)?;
            check(0..REMAP_PAGES, base, &shadow);
            // SAFETY: as at the first registration.
            let whole = unsafe { engine.register(base as *mut u8, len) }?;
            pieces.push((whole, 0, REMAP_PAGES));
            tally.reregisters.fetch_add(1, Ordering::Relaxed);
        }
    }
    unregister_all(engine, &mut pieces)?;
    check(0..REMAP_PAGES, base, &shadow);
    // SAFETY: unregistered; this function's own mapping.
    unsafe { mem::unmap(base, len) }?;
    Ok(())
}

/// Unregisters every region of the area's live pieces.
fn unregister_all(engine: &Engine, pieces: &mut Vec<(RegionId, usize, usize)>) -> Result<()> {
    let mut ids: Vec<RegionId> = pieces.drain(..).map(|p| p.0).collect();
    ids.sort();
    ids.dedup();
    for id in ids {
        engine.unregister(id)?;
    }
    Ok(())
}

/// Forks: the child checks this thread's pages against the shadow, writes
/// to them and checks again; the parent's memory must not change.
fn fork_and_check(regions: &[Region], mine: &[(usize, usize)], shadow: &[[u8; PAGE]], tally: &Tally) {
    let targets: Vec<(usize, usize)> = mine.iter().map(|&(r, p)| (regions[r].mem.as_ptr() as usize, p)).collect();
    match testing::fork_check(&targets, shadow) {
        Ok(true) => {}
        Ok(false) => {
            tally.child_failures.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => tally.errors.lock().unwrap().push(format!("fork: {e}")),
    }
    tally.forks.fetch_add(1, Ordering::Relaxed);
}

pub fn run(a: TortureArgs) -> Result<ExitCode> {
    if a.processes > 0 {
        return crate::torture_procs::run(&crate::torture_procs::Options {
            processes: a.processes,
            seconds: a.seconds,
            pages: a.pages,
            max_page_sharing: a.max_page_sharing,
            seed: a.seed,
            json: a.json,
        });
    }
    let tunables = Tunables {
        run: Run::Merge,
        pages_to_scan: 8192,
        sleep_millisecs: 0,
        max_page_sharing: a.max_page_sharing,
        use_zero_pages: true,
        stable_node_chains_prune_millisecs: 200,
        thp_split_min_subpages: if a.thp { a.thp_split_min_subpages } else { 1 },
        ..Tunables::default()
    };
    let engine = Engine::new(tunables)?;
    let mut regions = Vec::new();
    let mut buf = [0u8; PAGE];
    for r in 0..a.regions {
        let bytes = a.pages as usize * PAGE;
        let mem = if a.thp { AnonMapping::new_huge(bytes)? } else { AnonMapping::new(bytes)? };
        for p in 0..a.pages as usize {
            common((r + p as u64) % 6, &mut buf);
            mem.write(p * PAGE, &buf).expect("inside");
        }
        // SAFETY: the mapping lives until the end of this function and is
        // unregistered before it is unmapped.
        let id = unsafe { engine.register(mem.as_ptr(), mem.len()) }?;
        regions.push(Region { mem, id: Mutex::new(Some(id)) });
    }
    let stop = AtomicBool::new(false);
    let tally = Tally::default();
    let io = crate::torture_io::IoTally::default();
    let mut peak = Counters::default();
    let start = Instant::now();
    let mut rng = fastrand::Rng::with_seed(a.seed);
    std::thread::scope(|s| -> Result<()> {
        for t in 0..a.writers {
            let (a, regions, stop, tally) = (&a, &regions, &stop, &tally);
            s.spawn(move || writer(t, a, regions, stop, tally));
        }
        let remap = {
            let (engine, stop, tally, seed) = (&engine, &stop, &tally, a.seed);
            s.spawn(move || remapper(engine, seed, stop, tally))
        };
        use crate::torture_io as tio;
        type Activity = fn(&Engine, u64, &AtomicBool, &tio::IoTally) -> Result<()>;
        let activities: [(&str, Activity); 5] = [
            ("O_DIRECT reads", tio::direct_io),
            ("io_uring fixed buffers", tio::fixed_buffers),
            ("vmsplice", tio::splicer),
            ("attributes", tio::attributes),
            ("discards", tio::discarder),
        ];
        let handles: Vec<_> = activities
            .into_iter()
            .enumerate()
            .map(|(k, (name, f))| {
                let (engine, stop, io, seed) = (&engine, &stop, &io, a.seed * 100 + k as u64);
                (name, s.spawn(move || f(engine, seed, stop, io)))
            })
            .collect();
        let mut next_event = Instant::now();
        while start.elapsed() < Duration::from_secs(a.seconds) {
            std::thread::sleep(Duration::from_millis(20));
            let c = engine.counters()?;
            if c.pages_sharing + c.ksm_zero_pages > peak.pages_sharing + peak.ksm_zero_pages {
                peak = c;
            }
            if Instant::now() < next_event {
                continue;
            }
            next_event = Instant::now() + Duration::from_millis(300);
            match rng.u8(..4) {
                0 => {
                    // A region leaves and comes back, while its pages are written.
                    let r = &regions[rng.usize(..regions.len())];
                    let mut id = r.id.lock().unwrap();
                    if let Some(old) = id.take() {
                        engine.unregister(old)?;
                        // SAFETY: as at registration.
                        *id = Some(unsafe { engine.register(r.mem.as_ptr(), r.mem.len()) }?);
                        tally.reregisters.fetch_add(1, Ordering::Relaxed);
                    }
                }
                1 => {
                    engine.set_run(Run::Stop)?;
                    std::thread::sleep(Duration::from_millis(20));
                    engine.set_run(Run::Merge)?;
                    tally.run_changes.fetch_add(2, Ordering::Relaxed);
                }
                2 => {
                    engine.set_run(Run::Unmerge)?;
                    engine.set_run(Run::Merge)?;
                    tally.run_changes.fetch_add(2, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        stop.store(true, Ordering::Relaxed);
        for (name, h) in handles {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tally.errors.lock().unwrap().push(format!("{name}: {e:#}")),
                Err(_) => tally.errors.lock().unwrap().push(format!("{name}: the thread panicked")),
            }
        }
        match remap.join() {
            Ok(r) => r,
            Err(_) => bail!("the remapping thread panicked"),
        }
    })?;
    let end = engine.counters()?;
    let stats = engine.space_stats();
    for r in &regions {
        if let Some(id) = r.id.lock().unwrap().take() {
            engine.unregister(id)?;
        }
    }
    let after = engine.counters()?;
    let errors = tally.errors.lock().unwrap().clone();
    let lost = tally.lost_writes.load(Ordering::Relaxed);
    let corrupted = tally.corrupted_bytes.load(Ordering::Relaxed);
    let child_failures = tally.child_failures.load(Ordering::Relaxed);
    let counters: serde_json::Map<String, serde_json::Value> =
        end.named().into_iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    let out = json!({
        "seconds": start.elapsed().as_secs_f64(),
        "thp": a.thp,
        "thp_split": end.thp_split,
        "uffd_moves": stats.moves,
        "uffd_mode": format!("{:?}", engine.info().uffd_mode),
        "writes": tally.writes.load(Ordering::Relaxed),
        "kernel_writes": tally.kernel_writes.load(Ordering::Relaxed),
        "lost_writes": lost,
        "corrupted_bytes": corrupted,
        "merges": end.merges,
        "unmerges": end.unmerges,
        "cow_faults": end.cow_faults,
        "cow_breaks": stats.cow_breaks,
        "cow_fallbacks": stats.cow_fallbacks,
        "pages_pool_copies": end.pages_pool_copies,
        "pages_pinned": end.pages_pinned,
        "direct_reads": io.direct_reads.load(Ordering::Relaxed),
        "fixed_reads": io.fixed_reads.load(Ordering::Relaxed),
        "fixed_registrations": io.fixed_registrations.load(Ordering::Relaxed),
        "splices": io.splices.load(Ordering::Relaxed),
        "reads_lost": io.reads_lost.load(Ordering::Relaxed),
        "attribute_forks": io.attribute_forks.load(Ordering::Relaxed),
        "attribute_violations": io.attribute_violations.load(Ordering::Relaxed),
        "attribute_detail": *io.attribute_detail.lock().unwrap(),
        "discards": io.discards.load(Ordering::Relaxed),
        "plain_dontneeds": io.plain_dontneeds.load(Ordering::Relaxed),
        "discard_violations": io.discard_violations.load(Ordering::Relaxed),
        "plain_dontneed_misses": io.plain_dontneed_misses.load(Ordering::Relaxed),
        "plain_dontneeds_noticed": stats.plain_discards,
        "forks": tally.forks.load(Ordering::Relaxed),
        "child_failures": child_failures,
        "reregisters": tally.reregisters.load(Ordering::Relaxed),
        "unmaps": tally.unmaps.load(Ordering::Relaxed),
        "remaps": tally.remaps.load(Ordering::Relaxed),
        "protects": tally.protects.load(Ordering::Relaxed),
        "run_changes": tally.run_changes.load(Ordering::Relaxed),
        "checkpoints": tally.checkpoints.load(Ordering::Relaxed),
        "peak_pages_saved": peak.pages_sharing + peak.ksm_zero_pages,
        "pool_maps": stats.pool_maps,
        "counters": counters,
        "pool_pages_after_unregister": after.pages_shared,
        "errors": errors,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "samepage torture: {:.0} s, {} writes ({} by the kernel: read(2), recv(2)), {} merges, {} unmerges, \
             {} copy-on-write faults seen, {} forks, {} re-registrations, {} munmap, {} mremap, {} mprotect of \
             registered parts, {} run changes, {} checkpoints",
            out["seconds"].as_f64().unwrap_or(0.0),
            out["writes"],
            out["kernel_writes"],
            out["merges"],
            out["unmerges"],
            out["cow_faults"],
            out["forks"],
            out["reregisters"],
            out["unmaps"],
            out["remaps"],
            out["protects"],
            out["run_changes"],
            out["checkpoints"]
        );
        println!(
            "devices and attributes: {} O_DIRECT reads, {} io_uring READ_FIXED ({} buffer registrations), {} vmsplice, \
             {} forks checking DONTFORK/WIPEONFORK/DONTDUMP/mlock memory, {} discards and {} plain MADV_DONTNEED of merged pages",
            out["direct_reads"],
            out["fixed_reads"],
            out["fixed_registrations"],
            out["splices"],
            out["attribute_forks"],
            out["discards"],
            out["plain_dontneeds"]
        );
        println!(
            "lost writes: {lost}; corrupted bytes: {corrupted}; children that saw wrong memory: {child_failures}; \
             device reads lost: {}; attribute violations: {}; discarded pages not reading zeros: {}; \
             plain MADV_DONTNEED missed: {}; pool pages left after unregistering: {}",
            out["reads_lost"],
            out["attribute_violations"],
            out["discard_violations"],
            out["plain_dontneed_misses"],
            out["pool_pages_after_unregister"]
        );
    }
    let (reads_lost, attr, disc) = (
        io.reads_lost.load(Ordering::Relaxed),
        io.attribute_violations.load(Ordering::Relaxed),
        io.discard_violations.load(Ordering::Relaxed),
    );
    if lost > 0 || corrupted > 0 || child_failures > 0 || reads_lost > 0 || attr > 0 || disc > 0 || !errors.is_empty() {
        bail!(
            "torture found {lost} lost writes, {corrupted} corrupted bytes, {child_failures} failed children, \
             {reads_lost} lost device reads, {attr} attribute violations {:?}, {disc} discard violations, {} errors: {errors:?}",
            io.attribute_detail.lock().unwrap(),
            errors.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
