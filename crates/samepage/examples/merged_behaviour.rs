//! Does a merged page behave like the page it replaced?
//!
//! A program written the way a user of the library writes one: its own
//! `mmap`ed memory, its own `madvise`, `mlock`, `fork`, io_uring and
//! `O_DIRECT`, and only samepage's public API (`Engine::register`,
//! `Engine::counters`, `Engine::unregister`). Each row of the table is run
//! twice on the same content: once with the kernel's KSM (`MADV_MERGEABLE`,
//! ksmd driven through `/sys/kernel/mm/ksm` and put back as it was), once
//! with samepage. Run as root:
//!
//! ```text
//! cargo run --release -p samepage --example merged_behaviour [-- --o-direct-seconds 20]
//! ```
//!
//! The output is a Markdown table: what the program did, what the kernel's
//! KSM gave it, what samepage gave it, and how many pages each had merged
//! in the region when the program looked.

use io_uring::{opcode, types, IoUring};
use samepage::{Engine, RegionId, Run, Tunables};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

const PAGE: usize = 4096;
const PAGES: usize = 256;

/// Who merges the program's memory.
trait Merger {
    fn name(&self) -> &'static str;
    /// Marks `[addr, addr + len)` mergeable.
    fn add(&mut self, addr: *mut u8, len: usize);
    /// Waits until merging has settled; returns the pages merged in the region.
    fn settle(&mut self) -> u64;
    /// The pages merged in the region right now.
    fn merged_now(&mut self) -> u64;
    /// Unmerges and forgets the region.
    fn remove(&mut self);
}

/// The kernel's KSM: `MADV_MERGEABLE`, ksmd at a fast pace.
struct Kernel {
    saved: Vec<(&'static str, String)>,
    region: Option<(*mut u8, usize)>,
}

const KSM: &str = "/sys/kernel/mm/ksm";

fn ksm_read(name: &str) -> String {
    std::fs::read_to_string(format!("{KSM}/{name}")).map(|s| s.trim().to_string()).unwrap_or_default()
}

fn ksm_write(name: &str, value: &str) {
    if let Err(e) = std::fs::write(format!("{KSM}/{name}"), value) {
        eprintln!("warning: {KSM}/{name} <- {value}: {e}");
    }
}

impl Kernel {
    fn new() -> Kernel {
        let saved = ["pages_to_scan", "sleep_millisecs", "run"].map(|n| (n, ksm_read(n))).to_vec();
        ksm_write("pages_to_scan", "10000");
        ksm_write("sleep_millisecs", "10");
        ksm_write("run", "1");
        Kernel { saved, region: None }
    }

    /// `/proc/self/ksm_merging_pages`: this process's pages mapping a KSM page.
    fn merging_pages() -> u64 {
        std::fs::read_to_string("/proc/self/ksm_merging_pages").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        // Unmerge what ksmd merged for anyone, then the tunables as they were.
        ksm_write("run", "2");
        for (name, value) in self.saved.iter().rev() {
            ksm_write(name, value);
        }
    }
}

impl Merger for Kernel {
    fn name(&self) -> &'static str {
        "kernel KSM"
    }
    fn add(&mut self, addr: *mut u8, len: usize) {
        // SAFETY: advice on the program's own mapping; MADV_MERGEABLE changes no content.
        let r = unsafe { libc::madvise(addr.cast(), len, libc::MADV_MERGEABLE) };
        assert_eq!(r, 0, "madvise(MADV_MERGEABLE): {}", std::io::Error::last_os_error());
        self.region = Some((addr, len));
    }
    fn settle(&mut self) -> u64 {
        // Two full scans without a change in this process's merged pages.
        let scans = || ksm_read("full_scans").parse::<u64>().unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut last, mut since) = (Kernel::merging_pages(), scans());
        // A page merges at the earliest in ksmd's third pass over it
        // (checksum, unstable tree, merge): let it make four.
        let first = since + 4;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            let now = Kernel::merging_pages();
            if now != last {
                (last, since) = (now, scans());
            } else if scans() >= (since + 2).max(first) {
                break;
            }
        }
        last
    }
    fn merged_now(&mut self) -> u64 {
        Kernel::merging_pages()
    }
    fn remove(&mut self) {
        if let Some((addr, len)) = self.region.take() {
            // SAFETY: as in `add`; MADV_UNMERGEABLE gives every page a private copy.
            unsafe { libc::madvise(addr.cast(), len, libc::MADV_UNMERGEABLE) };
        }
    }
}

/// samepage: the engine at full speed.
struct Samepage {
    engine: Engine,
    region: Option<RegionId>,
}

impl Samepage {
    fn new() -> Samepage {
        let tunables = Tunables { run: Run::Merge, pages_to_scan: 4096, sleep_millisecs: 0, ..Tunables::default() };
        Samepage { engine: Engine::new(tunables).expect("samepage engine"), region: None }
    }
}

impl Merger for Samepage {
    fn name(&self) -> &'static str {
        "samepage"
    }
    fn add(&mut self, addr: *mut u8, len: usize) {
        // SAFETY: the mapping stays mapped until `remove` unregisters it.
        self.region = Some(unsafe { self.engine.register(addr, len) }.expect("register"));
    }
    fn settle(&mut self) -> u64 {
        let id = self.region.expect("a region");
        let merged = |e: &Engine| e.region_counters(id).map(|c| c.ksm_merging_pages).unwrap_or(0);
        let scans = |e: &Engine| e.counters().map(|c| c.full_scans).unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut last, mut since) = (merged(&self.engine), scans(&self.engine));
        let first = since + 4;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
            let now = merged(&self.engine);
            if now != last {
                (last, since) = (now, scans(&self.engine));
            } else if scans(&self.engine) >= (since + 2).max(first) {
                break;
            }
        }
        last
    }
    fn merged_now(&mut self) -> u64 {
        self.region.and_then(|id| self.engine.region_counters(id).ok()).map_or(0, |c| c.ksm_merging_pages)
    }
    fn remove(&mut self) {
        if let Some(id) = self.region.take() {
            self.engine.unregister(id).expect("unregister");
        }
    }
}

/// The program's own anonymous memory.
struct Memory {
    ptr: *mut u8,
    len: usize,
}

impl Memory {
    fn new(pages: usize) -> Memory {
        let len = pages * PAGE;
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        Memory { ptr: ptr.cast(), len }
    }
    fn page(&self, i: usize) -> *mut u8 {
        self.ptr.wrapping_add(i * PAGE)
    }
    fn write(&self, i: usize, data: &[u8; PAGE]) {
        // SAFETY: page `i` of our mapping; the memory may be remapped under us
        // by the merger, so it is written through a raw pointer, never a reference.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.page(i), PAGE) };
    }
    fn read(&self, i: usize) -> [u8; PAGE] {
        let mut out = [0u8; PAGE];
        // SAFETY: as in `write`.
        unsafe { std::ptr::copy_nonoverlapping(self.page(i), out.as_mut_ptr(), PAGE) };
        out
    }
    fn fill(&self) {
        for i in 0..self.len / PAGE {
            self.write(i, &content(i as u64 % 4));
        }
    }
    fn madvise(&self, advice: libc::c_int) {
        // SAFETY: advice on our own mapping.
        let r = unsafe { libc::madvise(self.ptr.cast(), self.len, advice) };
        assert_eq!(r, 0, "madvise({advice}): {}", std::io::Error::last_os_error());
    }
    /// VmFlags of every VMA overlapping the mapping (merged memory may be several).
    fn vm_flags(&self) -> Vec<String> {
        smaps_vmas(self.ptr as usize, self.ptr as usize + self.len)
            .into_iter()
            .filter_map(|lines| lines.iter().find_map(|l| l.strip_prefix("VmFlags:").map(|f| f.trim().to_string())))
            .collect()
    }
    fn rss_kb(&self) -> u64 {
        smaps_vmas(self.ptr as usize, self.ptr as usize + self.len)
            .iter()
            .flat_map(|lines| lines.iter().filter_map(|l| l.strip_prefix("Rss:")))
            .filter_map(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .sum()
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: our mapping, no longer used.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The smaps lines of each VMA overlapping `[start, end)`.
fn smaps_vmas(start: usize, end: usize) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let mut out: Vec<Vec<String>> = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        let range = line.split_whitespace().next().and_then(|r| r.split_once('-'));
        if let Some((a, b)) =
            range.and_then(|(a, b)| Some((usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?)))
        {
            inside = a < end && b > start;
            if inside {
                out.push(Vec::new());
            }
        } else if inside {
            out.last_mut().expect("a VMA").push(line.to_string());
        }
    }
    out
}

/// Page content number `id`.
fn content(id: u64) -> [u8; PAGE] {
    let mut p = [0u8; PAGE];
    let mut x = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in p.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    p
}

/// A file of `pages` distinct pages (numbered from `first`) for the devices to read.
fn data_file(pages: usize, first: u64) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("merged-behaviour-{}-{first}", std::process::id()));
    let data: Vec<u8> = (0..pages as u64).flat_map(|i| content(first + i)).collect();
    std::fs::write(&path, data).expect("data file");
    path
}

/// Forks a child that runs `check` (raw reads, no allocation) and reports its answer.
fn in_child(check: impl FnOnce() -> bool) -> bool {
    // SAFETY: the child only runs `check`, then leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let ok = check();
        // SAFETY: leaves the child without the parent's destructors.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
}

/// One row: what the program saw, and the pages merged in its region when it looked.
struct Outcome {
    saw: String,
    merged: u64,
}

fn fixed_buffer(m: &mut dyn Merger) -> Outcome {
    let mem = Memory::new(PAGES);
    mem.fill();
    let ring = IoUring::new(4).expect("io_uring");
    let iov = libc::iovec { iov_base: mem.ptr.cast(), iov_len: 16 * PAGE };
    // SAFETY: the buffer stays mapped until the ring is dropped (before `mem`).
    unsafe { ring.submitter().register_buffers(&[iov]) }.expect("IORING_REGISTER_BUFFERS");
    let mut ring = ring;
    m.add(mem.ptr, mem.len);
    let merged = m.settle();
    let path = data_file(16, 1000);
    let file = std::fs::File::open(&path).expect("data file");
    let sqe = opcode::ReadFixed::new(types::Fd(file.as_raw_fd()), mem.ptr, (16 * PAGE) as u32, 0).offset(0).build();
    // SAFETY: the destination is fixed buffer 0, mapped.
    unsafe { ring.submission().push(&sqe) }.expect("sqe");
    ring.submit_and_wait(1).expect("io_uring_enter");
    let res = ring.completion().next().map(|c| c.result()).unwrap_or(-1);
    let landed = (0..16).filter(|&i| mem.read(i) == content(1000 + i as u64)).count();
    let old = (0..16).filter(|&i| mem.read(i) == content(i as u64 % 4)).count();
    drop(ring);
    m.remove();
    let _ = std::fs::remove_file(path);
    let saw = if res != (16 * PAGE) as i32 {
        format!("READ_FIXED returned {res}")
    } else if landed == 16 {
        "the data read (16 of 16 pages)".into()
    } else {
        format!("{landed} of 16 pages hold the data read, {old} the old content")
    };
    Outcome { saw, merged }
}

fn o_direct(m: &mut dyn Merger, seconds: u64) -> Outcome {
    let mem = Memory::new(PAGES);
    mem.fill();
    m.add(mem.ptr, mem.len);
    let mut merged = m.settle();
    let path = data_file(PAGES, 5000);
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&path).expect("O_DIRECT");
    let (mut reads, mut lost, mut seed) = (0u64, 0u64, 7u64);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let p = (seed >> 33) as usize % PAGES;
        // Content that merges at the merger's next visit, then the device writes the page.
        mem.write(p, &content(p as u64 % 4));
        if seed & 1 == 0 {
            std::thread::sleep(Duration::from_micros((seed >> 40) % 300));
        }
        // SAFETY: page `p` of our mapping; no reference to it exists.
        let n = unsafe { libc::pread(file.as_raw_fd(), mem.page(p).cast(), PAGE, (p * PAGE) as i64) };
        assert_eq!(n, PAGE as isize, "pread(O_DIRECT): {}", std::io::Error::last_os_error());
        reads += 1;
        if mem.read(p) != content(5000 + p as u64) {
            lost += 1;
        }
        if reads.is_multiple_of(64) {
            merged = merged.max(m.merged_now());
        }
    }
    m.remove();
    let _ = std::fs::remove_file(path);
    Outcome { saw: format!("{lost} of {reads} reads lost ({seconds} s; merged: most seen while reading)"), merged }
}

fn dontfork(m: &mut dyn Merger) -> Outcome {
    let mem = Memory::new(PAGES);
    mem.madvise(libc::MADV_DONTFORK);
    mem.fill();
    m.add(mem.ptr, mem.len);
    let merged = m.settle();
    let (start, len) = (mem.ptr as usize, mem.len);
    let unmapped = in_child(|| {
        let mut v = [0u8; PAGES];
        // SAFETY: mincore only reports on the range; ENOMEM means unmapped.
        unsafe { libc::mincore(start as *mut libc::c_void, len, v.as_mut_ptr()) != 0 }
    });
    m.remove();
    Outcome { saw: if unmapped { "child: no such mapping".into() } else { "child reads the bytes".into() }, merged }
}

fn wipeonfork(m: &mut dyn Merger) -> Outcome {
    let mem = Memory::new(PAGES);
    mem.madvise(libc::MADV_WIPEONFORK);
    mem.fill();
    m.add(mem.ptr, mem.len);
    let merged = m.settle();
    let start = mem.ptr as usize;
    let zeros = in_child(|| {
        (0..PAGES * PAGE).step_by(64).all(|o| {
            // SAFETY: the child's copy of the mapping.
            unsafe { ((start + o) as *const u8).read_volatile() == 0 }
        })
    });
    let parent_ok = (0..PAGES).all(|i| mem.read(i) == content(i as u64 % 4));
    m.remove();
    let saw = match (zeros, parent_ok) {
        (true, true) => "child reads zeros, parent its bytes".to_string(),
        (false, _) => "child reads the parent's bytes".into(),
        (true, false) => "child reads zeros, parent lost its bytes".into(),
    };
    Outcome { saw, merged }
}

fn mlocked(m: &mut dyn Merger) -> Outcome {
    let mem = Memory::new(PAGES);
    mem.fill();
    // SAFETY: locking our own mapping.
    assert_eq!(unsafe { libc::mlock(mem.ptr.cast(), mem.len) }, 0, "mlock: {}", std::io::Error::last_os_error());
    m.add(mem.ptr, mem.len);
    let merged = m.settle();
    let flags = mem.vm_flags();
    let locked = flags.iter().all(|f| f.split(' ').any(|x| x == "lo"));
    let rss = mem.rss_kb();
    m.remove();
    let saw = format!(
        "{} ({} VMA{}), {rss} of {} kB resident",
        if locked { "stays locked" } else { "lock gone" },
        flags.len(),
        if flags.len() == 1 { "" } else { "s" },
        mem.len / 1024
    );
    Outcome { saw, merged }
}

fn dontdump(m: &mut dyn Merger) -> Outcome {
    let mem = Memory::new(PAGES);
    mem.madvise(libc::MADV_DONTDUMP);
    mem.fill();
    m.add(mem.ptr, mem.len);
    let merged = m.settle();
    let flags = mem.vm_flags();
    let kept = flags.iter().all(|f| f.split(' ').any(|x| x == "dd"));
    m.remove();
    let saw = format!(
        "{} ({} VMA{})",
        if kept { "excluded from core dumps (dd)" } else { "flag gone" },
        flags.len(),
        if flags.len() == 1 { "" } else { "s" }
    );
    Outcome { saw, merged }
}

fn dontneed(m: &mut dyn Merger) -> Outcome {
    let mem = Memory::new(PAGES);
    mem.fill();
    m.add(mem.ptr, mem.len);
    let merged = m.settle();
    // The program's own madvise, as allocators and balloons do it.
    // SAFETY: discarding 64 pages of our own mapping.
    let r = unsafe { libc::madvise(mem.page(32).cast(), 64 * PAGE, libc::MADV_DONTNEED) };
    assert_eq!(r, 0, "madvise(MADV_DONTNEED): {}", std::io::Error::last_os_error());
    let zeros = (32..96).filter(|&i| mem.read(i) == [0u8; PAGE]).count();
    let kept = (0..PAGES).filter(|&i| !(32..96).contains(&i)).all(|i| mem.read(i) == content(i as u64 % 4));
    m.remove();
    let saw = if zeros == 64 && kept {
        "reads zeros (64 of 64 pages)".to_string()
    } else {
        format!("{zeros} of 64 pages read zeros, others kept: {kept}")
    };
    Outcome { saw, merged }
}

fn main() {
    let mut o_direct_seconds = 5u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--o-direct-seconds" => {
                o_direct_seconds = args.next().and_then(|v| v.parse().ok()).expect("--o-direct-seconds N")
            }
            _ => {
                eprintln!("usage: merged_behaviour [--o-direct-seconds N]");
                std::process::exit(2);
            }
        }
    }
    type Row = (&'static str, Box<dyn Fn(&mut dyn Merger) -> Outcome>);
    let rows: Vec<Row> = vec![
        (
            "registered an io_uring fixed buffer (16 pages), let it merge, then `READ_FIXED` into it",
            Box::new(fixed_buffer),
        ),
        (
            "`pread(O_DIRECT)` into pages being merged",
            Box::new(move |m: &mut dyn Merger| o_direct(m, o_direct_seconds)),
        ),
        ("`MADV_DONTFORK` region, merged, then `fork()`; child reads it", Box::new(dontfork)),
        ("`MADV_WIPEONFORK` region, merged, then `fork()`", Box::new(wipeonfork)),
        ("`mlock`ed region, merged", Box::new(mlocked)),
        ("`MADV_DONTDUMP` region, merged", Box::new(dontdump)),
        ("`madvise(MADV_DONTNEED)` on 64 merged pages", Box::new(dontneed)),
    ];
    let mut results = Vec::new();
    {
        let mut kernel = Kernel::new();
        for (what, row) in &rows {
            eprintln!("kernel KSM: {what}");
            results.push(row(&mut kernel));
        }
    }
    let mut samepage = Samepage::new();
    let mut out = Vec::new();
    for ((what, row), k) in rows.iter().zip(results) {
        eprintln!("{}: {what}", samepage.name());
        let s = row(&mut samepage);
        out.push((what, k, s));
    }
    println!("| what the program did ({PAGES} pages, 4 contents) | kernel KSM | samepage |");
    println!("|---|---|---|");
    for (what, k, s) in out {
        println!("| {what} | {} ({} merged) | {} ({} merged) |", k.saw, k.merged, s.saw, s.merged);
    }
}
