//! `samepage estimate --pid PID...`: what the kernel's KSM would save by
//! merging those processes' memory, read from outside; nothing is merged.
//!
//! Which memory: what ksmd would scan if each process had asked for
//! `prctl(PR_SET_MEMORY_MERGE)`: the private anonymous writable VMAs
//! (`rw-p`, inode 0 in `/proc/PID/smaps`: heap, stack, `[anon:...]`, plain
//! anonymous mappings), minus those the kernel's `vma_ksm_compatible`
//! refuses (`VmFlags` `sh ms pf io de ht mm ss`); with `--mergeable-only`,
//! only the VMAs marked by `madvise(MADV_MERGEABLE)` (`VmFlags` `mg`).
//!
//! Which pages: the present ones (`/proc/PID/pagemap` bit 63), as ksmd
//! only looks at pages mapped in memory: untouched pages are not counted,
//! and swapped-out pages (bit 62) are counted apart and not read (reading
//! them would swap them in). Pages that map the kernel's shared zero page
//! (read but never written) are not anonymous pages ksmd scans either: they
//! are left out too. As root they are told by `/proc/kpageflags`
//! (`KPF_ZERO_PAGE`); without the page frame numbers, a present page of
//! zeros that is not exclusively mapped (pagemap bit 56) is taken for one.
//!
//! Frames, not mappings: after a fork, parent and children map the same
//! frames until one writes. As root the page frame numbers tell them: a
//! page not exclusively mapped whose frame was counted already (in an
//! earlier process, or in an earlier process of the same partition for the
//! partitions breakdown) is not read again but counted as that frame mapped
//! again ([`Census::add_frame_mapped_again`]): ksmd scans it (an rmap item,
//! `pages_volatile` if the frame is its content's only one), and merging
//! it frees nothing. So `saved_bytes` is memory really freed. Without the
//! frame numbers each mapping counts as a copy, and the table says so.
//!
//! How: pages are copied into this process's own buffer with
//! `process_vm_readv` (4 MiB and up to 1024 runs of present pages per call),
//! or with `pread` of `/proc/PID/mem` where that fails, hashed with xxh3
//! ([`samepage::core::page_hash`]) and counted in a
//! [`samepage::core::estimate::Census`], which applies the kernel's rule.

use anyhow::{bail, Context, Result};
use clap::Args;
use samepage::core::estimate::{Census, Estimate, SharingRule, RMAP_ITEM_BYTES};
use samepage::core::{page_hash, zero_page_hash};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::process::ExitCode;
use std::time::Instant;

const PAGE: usize = samepage::PAGE_SIZE;
/// Bytes copied per `process_vm_readv` call.
const BATCH: usize = 4 << 20;
/// Remote runs per call (`IOV_MAX`).
const MAX_IOV: usize = 1024;

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAP: u64 = 1 << 62;
const PM_EXCLUSIVE: u64 = 1 << 56;
const PM_PFN: u64 = (1 << 55) - 1;
/// `KPF_ZERO_PAGE` in `/proc/kpageflags`.
const KPF_ZERO_PAGE: u64 = 1 << 24;

/// `samepage estimate`.
#[derive(Args, Debug)]
pub struct EstimateArgs {
    /// Processes to read (one or more).
    #[arg(long, num_args = 1.., required = true, value_name = "PID")]
    pid: Vec<u32>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// The kernel's `max_page_sharing` to count with (at least 2).
    #[arg(long, default_value_t = 256, value_name = "N")]
    max_page_sharing: u64,
    /// Count as the kernel's `use_zero_pages` 1: pages of zeros map the zero
    /// page (`ksm_zero_pages`) instead of merging with each other.
    #[arg(long)]
    use_zero_pages: bool,
    /// Only VMAs marked with madvise(MADV_MERGEABLE) (`mg` in
    /// /proc/PID/smaps), rather than every private anonymous writable VMA.
    #[arg(long)]
    mergeable_only: bool,
    /// The trust domain a process would join at the samepage daemon
    /// (`samepage run --domain`), as PID=DOMAIN (repeatable; others are in
    /// domain 0): the partitions breakdown counts each (user, domain) apart,
    /// as the daemon merges them.
    #[arg(long, value_name = "PID=DOMAIN", value_parser = parse_domain)]
    domain: Vec<(u32, u32)>,
    /// Also write an SVG of the savings: by process (what merging frees of
    /// each, and of each alone) and by partition (net, beside the kernel's
    /// one-for-all figure).
    #[arg(long, value_name = "PATH")]
    plot: Option<std::path::PathBuf>,
}

fn parse_domain(s: &str) -> std::result::Result<(u32, u32), String> {
    let (p, d) = s.split_once('=').ok_or_else(|| format!("{s:?} is not PID=DOMAIN"))?;
    let pid = p.parse().map_err(|_| format!("{p:?} in {s:?} is not a pid"))?;
    let domain = d.parse().map_err(|_| format!("{d:?} in {s:?} is not a domain (0 to {})", u32::MAX))?;
    Ok((pid, domain))
}

/// The effective user id of `pid` (the daemon partitions by its clients'
/// credentials, `SO_PEERCRED`).
fn euid(pid: u32) -> Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| proc_error(pid, "status", e))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .with_context(|| format!("no Uid line in /proc/{pid}/status"))
}

/// One partition of the daemon: its user and domain, the processes in it,
/// and what merging them alone would reach.
struct Partition {
    uid: u32,
    domain: u32,
    pids: Vec<u32>,
    census: Census,
}

/// A page frame seen not exclusively mapped (as root, by page frame number).
#[derive(Debug)]
enum Frame {
    /// The kernel's shared zero page (`KPF_ZERO_PAGE`).
    ZeroPage,
    /// Read in the process being read now; its content is not hashed yet.
    Pending,
    /// Counted, with this content, in these partitions (indices).
    Counted { hash: u64, parts: Vec<usize> },
}

/// The censuses a page is counted in: every process together (the
/// kernel's figure), and the process's partition.
struct Tally<'a> {
    all: &'a mut Census,
    part: &'a mut Census,
    /// The partition's index.
    part_index: usize,
    /// Frames seen not exclusively mapped, by page frame number (root only).
    frames: &'a mut std::collections::HashMap<u64, Frame>,
}

/// A VMA to read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Vma {
    start: u64,
    end: u64,
}

/// The VMAs of `smaps` text that KSM could scan.
fn eligible_vmas(smaps: &str, mergeable_only: bool) -> Vec<Vma> {
    // vma_ksm_compatible(): VM_SHARED, VM_MAYSHARE, VM_PFNMAP, VM_IO,
    // VM_DONTEXPAND, VM_HUGETLB, VM_MIXEDMAP, shadow stacks.
    const REFUSED: [&str; 8] = ["sh", "ms", "pf", "io", "de", "ht", "mm", "ss"];
    let mut out = Vec::new();
    let mut current: Option<Vma> = None;
    let mut finish = |vma: Option<Vma>, flags: &str| {
        if let Some(v) = vma {
            let f: Vec<&str> = flags.split_whitespace().collect();
            if !f.iter().any(|x| REFUSED.contains(x)) && (!mergeable_only || f.contains(&"mg")) {
                out.push(v);
            }
        }
    };
    for line in smaps.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            finish(current.take(), flags);
            continue;
        }
        let Some(m) = samepage::MapsLine::parse(line) else { continue };
        // A header line whose VMA had no VmFlags line (old kernels): decide
        // on the header alone.
        if let Some(prev) = current.take() {
            finish(Some(prev), "");
        }
        if m.perms == "rw-p" && m.inode == 0 {
            current = Some(Vma { start: m.start as u64, end: m.end as u64 });
        }
    }
    finish(current.take(), "");
    out
}

/// A run of present pages to read, all exclusive or all not.
#[derive(Debug, Clone, Copy)]
struct Run {
    addr: u64,
    pages: u64,
    exclusive: bool,
    /// For a run not exclusively mapped, as root: the index in the
    /// process's frame list of the first page's frame number.
    frame_at: Option<usize>,
}

/// What was found in one process.
#[derive(Debug, Default, Clone, serde::Serialize)]
struct ProcessReport {
    pid: u32,
    comm: String,
    vmas: u64,
    /// Pages counted (present, not a zero-page mapping): what ksmd scans.
    pages_scanned: u64,
    /// Of these, pages mapping a frame counted already in an earlier
    /// process (shared since a fork): not read again, freeing nothing.
    pages_mapped_again: u64,
    /// Pages copied out and hashed.
    pages_read: u64,
    /// Frames of this process merging frees (see `HolderEstimate::freed`).
    pages_freed: u64,
    /// Frames merging this process alone would free.
    pages_freed_alone: u64,
    /// Swapped-out pages: not read, not counted.
    pages_swapped: u64,
    /// Present pages that map the shared zero page: not counted.
    pages_zero_mapped: u64,
    /// Present pages that could not be read (unmapped meanwhile).
    pages_unreadable: u64,
}

fn comm(pid: u32) -> String {
    crate::procfs::comm(pid).unwrap_or_default()
}

/// Why a file of `/proc/PID` could not be read, in words that name the pid.
fn proc_error(pid: u32, file: &str, e: io::Error) -> anyhow::Error {
    match e.kind() {
        io::ErrorKind::NotFound => anyhow::anyhow!("pid {pid}: no such process"),
        io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "pid {pid}: cannot read /proc/{pid}/{file}: permission denied (reading another process needs ptrace access: root or \
             CAP_SYS_PTRACE, in the same or a parent user namespace)"
        ),
        _ if e.raw_os_error() == Some(libc::ESRCH) => anyhow::anyhow!("pid {pid}: the process exited"),
        _ => anyhow::anyhow!("pid {pid}: cannot read /proc/{pid}/{file}: {e}"),
    }
}

/// `process_vm_readv` of the remote ranges `remote` into `local`.
fn vm_readv(pid: u32, local: &mut [u8], remote: &[libc::iovec]) -> io::Result<usize> {
    let liov = libc::iovec { iov_base: local.as_mut_ptr().cast(), iov_len: local.len() };
    // SAFETY: `liov` describes `local`, which this function borrows mutably
    // for the call, so the kernel writes at most `local.len()` bytes into
    // memory nothing else uses; `remote` is a live slice of iovecs that
    // name addresses of the other process, which the kernel checks and this
    // process never dereferences.
    let n = unsafe {
        libc::process_vm_readv(pid as libc::pid_t, &liov, 1, remote.as_ptr(), remote.len() as libc::c_ulong, 0)
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Reads one process's memory and counts its pages in a census.
struct Reader {
    pid: u32,
    /// `/proc/PID/mem`, opened at its first use: pages not exclusively
    /// mapped, or `process_vm_readv` refused.
    mem: Option<File>,
    /// `process_vm_readv` is refused (EPERM, ENOSYS): use `/proc/PID/mem`.
    no_vm_readv: bool,
    pagemap: File,
    /// `/proc/kpageflags`, when page frame numbers are visible (root).
    kpageflags: Option<File>,
    buf: Vec<u8>,
    /// Pagemap entries being read (kept across VMAs: a process merged by
    /// samepage has tens of thousands).
    entries: Vec<u8>,
    /// Frame numbers of the pages to read that are not exclusively mapped
    /// (as root), indexed by [`Run::frame_at`].
    frame_numbers: Vec<u64>,
}

impl Reader {
    fn mem(&mut self) -> Result<&File> {
        match self.mem {
            Some(ref f) => Ok(f),
            None => {
                let pid = self.pid;
                let f = File::open(format!("/proc/{pid}/mem")).map_err(|e| proc_error(pid, "mem", e))?;
                Ok(self.mem.insert(f))
            }
        }
    }

    /// Runs of present pages of `vma` to read; counts the swapped ones in
    /// `r`. As root, a page not exclusively mapped is looked up by frame:
    /// the zero page is left out, a frame counted already is counted as
    /// mapped again (not read).
    fn runs(&mut self, vma: &Vma, holder: u32, t: &mut Tally, r: &mut ProcessReport, out: &mut Vec<Run>) -> Result<()> {
        const CHUNK: u64 = 65536;
        let mut entries = std::mem::take(&mut self.entries);
        entries.resize(CHUNK as usize * 8, 0);
        let (first, last) = (vma.start / PAGE as u64, vma.end / PAGE as u64);
        let mut page = first;
        while page < last {
            let n = (last - page).min(CHUNK);
            let bytes = &mut entries[..n as usize * 8];
            let got = self.pagemap.read_at(bytes, page * 8).map_err(|e| proc_error(self.pid, "pagemap", e))?;
            if got < 8 {
                // The VMA shrank meanwhile: nothing more to read here.
                break;
            }
            for (i, e) in bytes[..got / 8 * 8].chunks_exact(8).enumerate() {
                let e = u64::from_ne_bytes(e.try_into().expect("8 bytes"));
                let addr = (page + i as u64) * PAGE as u64;
                if e & PM_PRESENT == 0 {
                    r.pages_swapped += u64::from(e & PM_SWAP != 0);
                    continue;
                }
                let exclusive = e & PM_EXCLUSIVE != 0;
                let pfn = e & PM_PFN;
                let frame_at = if !exclusive && pfn != 0 && self.kpageflags.is_some() {
                    if !self.first_mapping(pfn, holder, t, r) {
                        continue;
                    }
                    self.frame_numbers.push(pfn);
                    Some(self.frame_numbers.len() - 1)
                } else {
                    None
                };
                match out.last_mut() {
                    Some(run)
                        if run.addr + run.pages * PAGE as u64 == addr
                            && run.exclusive == exclusive
                            && run.frame_at.is_some() == frame_at.is_some() =>
                    {
                        run.pages += 1
                    }
                    _ => out.push(Run { addr, pages: 1, exclusive, frame_at }),
                }
            }
            page += (got / 8) as u64;
        }
        self.entries = entries;
        Ok(())
    }

    /// A page not exclusively mapped, of frame `pfn`: whether it is to be
    /// read (its frame's first mapping). The zero page is counted in
    /// `pages_zero_mapped`; a frame counted already, as mapped again.
    fn first_mapping(&self, pfn: u64, holder: u32, t: &mut Tally, r: &mut ProcessReport) -> bool {
        use std::collections::hash_map::Entry;
        match t.frames.entry(pfn) {
            Entry::Vacant(v) => {
                let mut f = [0u8; 8];
                let flags = self.kpageflags.as_ref().expect("looked up as root only");
                if flags.read_exact_at(&mut f, pfn * 8).is_ok() && u64::from_ne_bytes(f) & KPF_ZERO_PAGE != 0 {
                    v.insert(Frame::ZeroPage);
                    r.pages_zero_mapped += 1;
                    return false;
                }
                v.insert(Frame::Pending);
                true
            }
            Entry::Occupied(mut o) => match o.get_mut() {
                Frame::ZeroPage => {
                    r.pages_zero_mapped += 1;
                    false
                }
                // Mapped twice in this process (not after a fork): read it
                // again, as a copy.
                Frame::Pending => true,
                Frame::Counted { hash, parts } => {
                    r.pages_scanned += 1;
                    r.pages_mapped_again += 1;
                    t.all.add_frame_mapped_again(holder, *hash);
                    if parts.contains(&t.part_index) {
                        t.part.add_frame_mapped_again(holder, *hash);
                    } else {
                        // The partition's first mapping of this frame.
                        t.part.add(holder, *hash, 1);
                        parts.push(t.part_index);
                    }
                    false
                }
            },
        }
    }

    /// Reads `runs` (their pages in order) and counts each page.
    fn count(&mut self, runs: &[Run], holder: u32, t: &mut Tally, r: &mut ProcessReport) -> Result<()> {
        let zero = zero_page_hash();
        // The runs (or parts of runs) of a batch, in order.
        let mut pieces: Vec<Run> = Vec::with_capacity(MAX_IOV);
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(MAX_IOV);
        let mut runs = runs.iter().copied();
        let mut pending: Option<Run> = None;
        loop {
            pieces.clear();
            let mut bytes = 0;
            while pieces.len() < MAX_IOV && bytes < BATCH {
                let Some(mut run) = pending.take().or_else(|| runs.next()) else { break };
                let room = ((BATCH - bytes) / PAGE) as u64;
                if run.pages > room {
                    pending = Some(Run {
                        addr: run.addr + room * PAGE as u64,
                        pages: run.pages - room,
                        frame_at: run.frame_at.map(|i| i + room as usize),
                        ..run
                    });
                    run.pages = room;
                }
                bytes += run.pages as usize * PAGE;
                pieces.push(run);
            }
            if pieces.is_empty() {
                return Ok(());
            }
            let ok = self.read_batch(&pieces, &mut iov, bytes)?;
            let mut off = 0;
            for (piece, readable) in pieces.iter().zip(ok) {
                for p in 0..piece.pages {
                    let at = off + p as usize * PAGE;
                    if !readable[p as usize] {
                        r.pages_unreadable += 1;
                        continue;
                    }
                    r.pages_read += 1;
                    let h = page_hash(&self.buf[at..at + PAGE]);
                    // Without frame numbers, a page of zeros not
                    // exclusively mapped is taken for the zero page (as
                    // root the zero page was left out by frame).
                    if h == zero && !piece.exclusive && self.kpageflags.is_none() {
                        r.pages_zero_mapped += 1;
                        continue;
                    }
                    if let Some(i) = piece.frame_at {
                        let pfn = self.frame_numbers[i + p as usize];
                        t.frames.insert(pfn, Frame::Counted { hash: h, parts: vec![t.part_index] });
                    }
                    r.pages_scanned += 1;
                    t.all.add(holder, h, 1);
                    t.part.add(holder, h, 1);
                }
                off += piece.pages as usize * PAGE;
            }
        }
    }

    /// Copies the pages of `pieces` (`bytes` in all) into `self.buf`, in
    /// order; per piece, per page, whether it could be read.
    ///
    /// Pages exclusively mapped are copied with `process_vm_readv`; the
    /// others through `/proc/PID/mem`. `process_vm_readv` pins the pages it
    /// copies (`pin_user_pages_remote`, `FOLL_PIN`), and since Linux 5.19 a
    /// read-only pin of an anonymous page that may be shared makes the
    /// kernel unshare it first ("mm/gup: trigger FAULT_FLAG_UNSHARE when
    /// R/O-pinning a possibly shared anonymous page"): a page still shared
    /// since a fork, or a KSM page, would be copied into the process being
    /// read, growing its memory and undoing merges. Measured here
    /// (`scripts/estimate/fork_frames.py`): a parent's 4 pages shared with
    /// its child were 8 frames after a `process_vm_readv` of them, and
    /// stayed 4 after a read of `/proc/PID/mem` (`FOLL_GET`, no pin).
    fn read_batch(&mut self, pieces: &[Run], iov: &mut Vec<libc::iovec>, bytes: usize) -> Result<Vec<Vec<bool>>> {
        let pid = self.pid;
        let mut ok: Vec<Vec<bool>> = pieces.iter().map(|p| vec![false; p.pages as usize]).collect();
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(BATCH.max(bytes), 0);
        let mut i = 0;
        let mut off = 0;
        let result = (|| -> Result<()> {
            while i < pieces.len() {
                // The exclusive pieces from here on, in one call.
                let run = pieces[i..].iter().take_while(|p| p.exclusive).count();
                if !self.no_vm_readv && run > 0 {
                    let group = &pieces[i..i + run];
                    let len: usize = group.iter().map(|p| p.pages as usize * PAGE).sum();
                    iov.clear();
                    iov.extend(group.iter().map(|p| libc::iovec {
                        iov_base: p.addr as usize as *mut libc::c_void,
                        iov_len: p.pages as usize * PAGE,
                    }));
                    match vm_readv(pid, &mut buf[off..off + len], iov) {
                        Ok(mut n) => {
                            // Whole pieces first, then whole pages of the
                            // piece where the copy stopped.
                            let end = i + run;
                            while i < end && n >= pieces[i].pages as usize * PAGE {
                                let len = pieces[i].pages as usize * PAGE;
                                ok[i].fill(true);
                                (n, off, i) = (n - len, off + len, i + 1);
                            }
                            if i == end {
                                continue;
                            }
                            let done = n / PAGE;
                            ok[i][..done].fill(true);
                            // The rest of this piece, page by page.
                            let p = pieces[i];
                            let len = p.pages as usize * PAGE;
                            let skip = done * PAGE;
                            let mem = self.mem()?;
                            read_pages(mem, &mut buf[off + skip..off + len], p.addr + skip as u64, &mut ok[i][done..]);
                            (off, i) = (off + len, i + 1);
                            continue;
                        }
                        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                            bail!("pid {pid}: the process exited while its memory was read")
                        }
                        // The first range is gone (unmapped meanwhile):
                        // read it page by page below.
                        Err(e) if e.raw_os_error() == Some(libc::EFAULT) => {}
                        Err(_) => self.no_vm_readv = true,
                    }
                }
                // /proc/PID/mem: the piece at once, else page by page.
                let p = pieces[i];
                let len = p.pages as usize * PAGE;
                let mem = self.mem()?;
                if mem.read_exact_at(&mut buf[off..off + len], p.addr).is_ok() {
                    ok[i].fill(true);
                } else {
                    read_pages(mem, &mut buf[off..off + len], p.addr, &mut ok[i]);
                }
                (off, i) = (off + len, i + 1);
            }
            Ok(())
        })();
        self.buf = buf;
        result.map(|()| ok)
    }
}

/// Reads the pages at `addr` into `buf` one by one from `/proc/PID/mem`;
/// `ok` says which could be read.
fn read_pages(mem: &File, buf: &mut [u8], addr: u64, ok: &mut [bool]) {
    for (page, (ok, chunk)) in ok.iter_mut().zip(buf.chunks_exact_mut(PAGE)).enumerate() {
        *ok = mem.read_exact_at(chunk, addr + (page * PAGE) as u64).is_ok();
    }
}

/// Reads process `pid` (holder `holder` of the censuses).
fn read_process(pid: u32, holder: u32, mergeable_only: bool, t: &mut Tally, kpageflags: bool) -> Result<ProcessReport> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).map_err(|e| proc_error(pid, "smaps", e))?;
    let vmas = eligible_vmas(&smaps, mergeable_only);
    let pagemap = File::open(format!("/proc/{pid}/pagemap")).map_err(|e| proc_error(pid, "pagemap", e))?;
    let kpageflags = if kpageflags { File::open("/proc/kpageflags").ok() } else { None };
    // For tests: the /proc/PID/mem path, as where process_vm_readv is refused.
    let no_vm_readv = std::env::var_os("SAMEPAGE_ESTIMATE_NO_VM_READV").is_some();
    let mut reader = Reader {
        pid,
        mem: None,
        no_vm_readv,
        pagemap,
        kpageflags,
        buf: Vec::new(),
        entries: Vec::new(),
        frame_numbers: Vec::new(),
    };
    let mut r = ProcessReport { pid, comm: comm(pid), vmas: vmas.len() as u64, ..ProcessReport::default() };
    t.all.add_holder(holder);
    t.part.add_holder(holder);
    let mut runs = Vec::new();
    for vma in &vmas {
        reader.runs(vma, holder, t, &mut r, &mut runs)?;
    }
    reader.count(&runs, holder, t, &mut r)?;
    // Frames of this process never read (unmapped meanwhile) stay uncounted.
    t.frames.retain(|_, f| !matches!(f, Frame::Pending));
    Ok(r)
}

/// Whether this process sees page frame numbers in pagemap (CAP_SYS_ADMIN)
/// and can read `/proc/kpageflags`.
fn sees_page_frames() -> bool {
    let Ok(flags) = File::open("/proc/kpageflags") else { return false };
    let mut f = [0u8; 8];
    if flags.read_exact_at(&mut f, 0).is_err() {
        return false;
    }
    // The PFN of a page of this process's own stack, which is present.
    let probe = [1u8; 64];
    let addr = std::hint::black_box(&probe).as_ptr() as u64;
    let Ok(pm) = File::open("/proc/self/pagemap") else { return false };
    let mut e = [0u8; 8];
    pm.read_exact_at(&mut e, addr / PAGE as u64 * 8).is_ok() && u64::from_ne_bytes(e) & PM_PFN != 0
}

/// `samepage estimate`.
pub fn run(a: EstimateArgs) -> Result<ExitCode> {
    let rule = SharingRule::new(a.max_page_sharing, a.use_zero_pages)
        .map_err(|e| crate::args::UsageError(format!("--max-page-sharing {}: {e}", a.max_page_sharing)))?;
    for (i, p) in a.pid.iter().enumerate() {
        if a.pid[..i].contains(p) {
            bail!(crate::args::UsageError(format!("--pid {p} is given twice (its pages would count twice)")));
        }
    }
    for (pid, _) in &a.domain {
        if !a.pid.contains(pid) {
            bail!(crate::args::UsageError(format!("--domain {pid}=...: {pid} is not one of the --pid")));
        }
    }
    let holders = u32::try_from(a.pid.len()).context("too many --pid")?;
    let kpageflags = sees_page_frames();
    let mut parts: Vec<Partition> = Vec::new();
    let mut census = Census::new();
    let mut frames = std::collections::HashMap::new();
    let t0 = Instant::now();
    let mut reports = Vec::new();
    for (holder, &pid) in (0..holders).zip(&a.pid) {
        let uid = euid(pid)?;
        let domain = a.domain.iter().rev().find(|(p, _)| *p == pid).map_or(0, |&(_, d)| d);
        let i = match parts.iter().position(|p| p.uid == uid && p.domain == domain) {
            Some(i) => i,
            None => {
                parts.push(Partition { uid, domain, pids: Vec::new(), census: Census::new() });
                parts.len() - 1
            }
        };
        parts[i].pids.push(pid);
        let mut t = Tally { all: &mut census, part: &mut parts[i].census, part_index: i, frames: &mut frames };
        reports.push(read_process(pid, holder, a.mergeable_only, &mut t, kpageflags)?);
    }
    let seconds = t0.elapsed().as_secs_f64();
    let e = census.estimate(rule);
    let by_part: Vec<(&Partition, Estimate)> = parts.iter().map(|p| (p, p.census.estimate(rule))).collect();
    for (r, h) in reports.iter_mut().zip(&e.holders) {
        r.pages_freed = h.freed;
        r.pages_freed_alone = h.freed_alone;
    }
    if let Some(path) = &a.plot {
        plot(path, &e, &reports, &by_part)?;
        if !a.json {
            eprintln!("plot written to {}", path.display());
        }
    }
    if a.json {
        let mut v = json(&a, &e, &reports, seconds, kpageflags);
        v["partitions"] = by_part
            .iter()
            .map(|(p, pe)| {
                let counters: serde_json::Map<String, serde_json::Value> =
                    pe.counters.named().iter().map(|&(n, v)| (n.to_string(), v.into())).collect();
                serde_json::json!({
                    "uid": p.uid,
                    "domain": p.domain,
                    "pids": p.pids,
                    "counters": counters,
                    "saved_bytes": pe.pages_freed() * PAGE as u64,
                    "net_saved_bytes": pe.net_saved_bytes(),
                })
            })
            .collect();
        v["partitioned_net_saved_bytes"] = by_part.iter().map(|(_, pe)| pe.net_saved_bytes()).sum::<i64>().into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", table(&a, &e, &reports, seconds, kpageflags));
        print!("{}", partitions_table(&by_part));
    }
    Ok(ExitCode::SUCCESS)
}

/// The report as JSON; `frames_visible`: page frame numbers were seen
/// (frames mapped again are told apart).
fn json(
    a: &EstimateArgs,
    e: &Estimate,
    reports: &[ProcessReport],
    seconds: f64,
    frames_visible: bool,
) -> serde_json::Value {
    let c = &e.counters;
    let counters: serde_json::Map<String, serde_json::Value> =
        c.named().iter().map(|&(n, v)| (n.to_string(), v.into())).collect();
    let scanned: u64 = reports.iter().map(|r| r.pages_scanned).sum();
    serde_json::json!({
        "max_page_sharing": a.max_page_sharing,
        "use_zero_pages": a.use_zero_pages,
        "mergeable_only": a.mergeable_only,
        "counters": counters,
        "rmap_items": c.rmap_items,
        "pages_scanned": scanned,
        "distinct_contents": e.contents,
        "frames_visible": frames_visible,
        "saved_bytes": e.pages_freed() * PAGE as u64,
        "metadata_bytes": c.rmap_items * RMAP_ITEM_BYTES,
        "net_saved_bytes": e.net_saved_bytes(),
        "pages_freed": {
            "zero_pages": e.freed_zero,
            "within_process": e.freed_within,
            "across_processes": e.freed_across,
        },
        "processes": reports,
        "bytes_read": reports.iter().map(|r| r.pages_read).sum::<u64>() * PAGE as u64,
        "read_seconds": seconds,
    })
}

/// The partitions breakdown: what the samepage daemon, which never merges
/// across users or trust domains, would save.
fn partitions_table(parts: &[(&Partition, Estimate)]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let net: i64 = parts.iter().map(|(_, e)| e.net_saved_bytes()).sum();
    let _ = writeln!(
        s,
        "by partition (the samepage daemon merges each user and domain apart): {} net in {} partition{}",
        mib(net as f64),
        parts.len(),
        if parts.len() == 1 { "" } else { "s" }
    );
    let _ = writeln!(
        s,
        "{:>8} {:>8}  {:>13} {:>13} {:>12}  PIDS",
        "UID", "DOMAIN", "PAGES_SHARED", "PAGES_SHARING", "NET SAVED"
    );
    for (p, e) in parts {
        let pids: Vec<String> = p.pids.iter().map(u32::to_string).collect();
        let _ = writeln!(
            s,
            "{:>8} {:>8}  {:>13} {:>13} {:>12}  {}",
            p.uid,
            p.domain,
            e.counters.pages_shared,
            e.counters.pages_sharing,
            mib(e.net_saved_bytes() as f64),
            pids.join(" ")
        );
    }
    s
}

/// The savings as an SVG: by process (top) and by partition (bottom).
fn plot(
    path: &std::path::Path,
    e: &Estimate,
    reports: &[ProcessReport],
    parts: &[(&Partition, Estimate)],
) -> Result<()> {
    use plotters::coord::Shift;
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    type Chart<'a, 'b> = ChartContext<
        'a,
        SVGBackend<'b>,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >;
    /// A bar chart of `bars` bars on `area`, `y` MiB, a label under each
    /// bar (at `label_y`).
    fn bars_chart<'a, 'b>(
        area: &'a DrawingArea<SVGBackend<'b>, Shift>,
        caption: &str,
        labels: &[String],
        y: std::ops::Range<f64>,
        label_y: f64,
    ) -> Result<Chart<'a, 'b>> {
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..labels.len().max(1) as f64, y)?;
        chart.configure_mesh().disable_x_mesh().x_labels(0).y_desc("MiB").draw()?;
        let below = ("sans-serif", 12).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Top));
        chart.draw_series(
            labels.iter().enumerate().map(|(i, l)| Text::new(l.clone(), (i as f64 + 0.5, label_y), below.clone())),
        )?;
        Ok(chart)
    }
    let in_mib = |bytes: f64| bytes / (1u64 << 20) as f64;
    let root = SVGBackend::new(path, (900, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(340);

    // By process: freed with the others, freed alone.
    let freed = |r: &ProcessReport, alone: bool| {
        in_mib(((if alone { r.pages_freed_alone } else { r.pages_freed }) * PAGE as u64) as f64)
    };
    let ymax = reports.iter().map(|r| freed(r, false).max(freed(r, true))).fold(0.1, f64::max);
    let names: Vec<String> = reports.iter().map(|r| format!("{} {}", r.pid, r.comm)).collect();
    let mut chart = bars_chart(
        &top,
        "samepage estimate: MiB merging frees, by process",
        &names,
        -ymax * 0.1..ymax * 1.15,
        -ymax * 0.02,
    )?;
    let light = RGBColor(150, 180, 230);
    for (alone, (from, to), color, label) in
        [(false, (0.1, 0.48), BLUE, "with the other processes"), (true, (0.52, 0.9), light, "alone")]
    {
        chart
            .draw_series(reports.iter().enumerate().map(|(i, r)| {
                let x = i as f64;
                Rectangle::new([(x + from, 0.0), (x + to, freed(r, alone))], color.filled())
            }))?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw()?;

    // By partition, net of metadata, and the kernel's figure (all together).
    let mut bars: Vec<(String, f64, RGBColor)> =
        vec![("kernel: all together".into(), in_mib(e.net_saved_bytes() as f64), RED)];
    for (p, pe) in parts {
        let pids: Vec<String> = p.pids.iter().map(u32::to_string).collect();
        bars.push((
            format!("uid {} domain {} ({})", p.uid, p.domain, pids.join(" ")),
            in_mib(pe.net_saved_bytes() as f64),
            BLUE,
        ));
    }
    let lo = bars.iter().map(|b| b.1).fold(0.0, f64::min);
    let hi = bars.iter().map(|b| b.1).fold(0.1, f64::max);
    let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    let mut chart = bars_chart(
        &bottom,
        "net MiB saved (frames freed less rmap items), by samepage partition",
        &labels,
        (lo * 1.15 - hi * 0.1)..(hi * 1.15),
        lo * 1.15 - hi * 0.02,
    )?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, v, c))| {
        let x = i as f64;
        Rectangle::new([(x + 0.2, 0.0), (x + 0.8, *v)], c.filled())
    }))?;
    root.present()?;
    Ok(())
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1u64 << 20) as f64)
}

/// The report as a table (`frames_visible` as for [`json`]).
fn table(a: &EstimateArgs, e: &Estimate, reports: &[ProcessReport], seconds: f64, frames_visible: bool) -> String {
    use std::fmt::Write;
    let c = &e.counters;
    let scanned: u64 = reports.iter().map(|r| r.pages_scanned).sum();
    let read = (reports.iter().map(|r| r.pages_read).sum::<u64>() * PAGE as u64) as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "samepage estimate: {} process{}, {} pages ({}) of {} memory, {} read in {:.2} s ({:.0} MiB/s); nothing merged",
        reports.len(),
        if reports.len() == 1 { "" } else { "es" },
        scanned,
        mib((scanned * PAGE as u64) as f64),
        if a.mergeable_only { "MADV_MERGEABLE" } else { "private anonymous" },
        mib(read),
        seconds,
        read / (1u64 << 20) as f64 / seconds.max(1e-9),
    );
    let _ = writeln!(
        s,
        "once merged, the kernel's KSM would show (max_page_sharing {}, use_zero_pages {}):",
        a.max_page_sharing,
        u8::from(a.use_zero_pages)
    );
    for (n, v) in c.named() {
        let _ = writeln!(s, "  {n:<20} {v}");
    }
    let _ = writeln!(
        s,
        "saved: {} of frames freed - {} of rmap items ({} bytes per page tracked) = {} net",
        mib((e.pages_freed() * PAGE as u64) as f64),
        mib((c.rmap_items * RMAP_ITEM_BYTES) as f64),
        RMAP_ITEM_BYTES,
        mib(e.net_saved_bytes() as f64),
    );
    let again: u64 = reports.iter().map(|r| r.pages_mapped_again).sum();
    if again > 0 {
        let _ = writeln!(
            s,
            "{again} pages map a frame counted already (shared since a fork): scanned, freeing nothing; the kernel's \
             general_profit counts mappings ({})",
            mib(c.general_profit as f64)
        );
    }
    if !frames_visible {
        let _ = writeln!(
            s,
            "page frame numbers are not visible (root sees them): each mapping counts as a copy, which overstates \
             the savings on processes sharing frames since a fork"
        );
    }
    let _ = writeln!(s, "frames freed ({} distinct contents):", e.contents);
    let _ = writeln!(s, "  {:<32} {}", "zero pages", e.freed_zero);
    let _ = writeln!(s, "  {:<32} {}", "duplicates within a process", e.freed_within);
    let _ = writeln!(s, "  {:<32} {}", "duplicates across processes", e.freed_across);
    let _ = writeln!(
        s,
        "{:>8}  {:<16} {:>10} {:>10} {:>10} {:>12} {:>9} {:>11}",
        "PID", "COMM", "SCANNED", "AGAIN", "FREED", "FREED ALONE", "SWAPPED", "ZERO-MAPPED"
    );
    for r in reports {
        let _ = writeln!(
            s,
            "{:>8}  {:<16} {:>10} {:>10} {:>10} {:>12} {:>9} {:>11}",
            r.pid,
            r.comm,
            r.pages_scanned,
            r.pages_mapped_again,
            r.pages_freed,
            r.pages_freed_alone,
            r.pages_swapped,
            r.pages_zero_mapped
        );
    }
    let unreadable: u64 = reports.iter().map(|r| r.pages_unreadable).sum();
    if unreadable > 0 {
        let _ = writeln!(s, "{unreadable} present pages could not be read (unmapped while being read): not counted");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eligible_vmas_are_private_anonymous_and_compatible() {
        let smaps = "\
55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
VmFlags: rd wr mr mw me ac sd
7f0000000000-7f0000001000 rw-p 00001000 08:01 1234                       /usr/lib/libc.so.6
VmFlags: rd wr mr mw me ac sd
7f0000100000-7f0000200000 rw-s 00000000 00:01 5                          /dev/zero (deleted)
VmFlags: rd wr sh mr mw me ms sd
7f0000200000-7f0000300000 rw-p 00000000 00:00 0 
VmFlags: rd wr mr mw me ac sd mg
7f0000300000-7f0000400000 rw-p 00000000 00:00 0                          [anon:x]
VmFlags: rd wr mr mw me ac sd io
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
VmFlags: rd wr mr mw me gd ac
";
        let all = eligible_vmas(smaps, false);
        assert_eq!(
            all,
            [
                Vma { start: 0x55d0c0000000, end: 0x55d0c0021000 },
                Vma { start: 0x7f0000200000, end: 0x7f0000300000 },
                Vma { start: 0x7ffd00000000, end: 0x7ffd00021000 },
            ]
        );
        assert_eq!(eligible_vmas(smaps, true), [Vma { start: 0x7f0000200000, end: 0x7f0000300000 }]);
    }
}
