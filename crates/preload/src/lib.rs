//! `libsamepage_preload.so`: the kernel's `madvise(MADV_MERGEABLE)` for a
//! program that does not know samepage (`samepage run -- CMD`, which
//! preloads this library).
//!
//! The library defines `madvise`, `munmap`, `mremap`, `mprotect` and `mmap`,
//! so the program's calls through the dynamic linker come here first:
//!
//! * `MADV_MERGEABLE` registers the private anonymous read-write parts of the
//!   range with an engine (created at the first call: a client of the daemon
//!   at `$SAMEPAGE_SOCKET`, or the default socket, when one answers; else an
//!   engine of the process's own with `$SAMEPAGE_TUNABLES`), with the
//!   kernel's errors: `EINVAL` for an unaligned start, `ENOMEM` when part of
//!   the range is unmapped. Other mappings (shared, file-backed, read-only)
//!   are left alone, and the call still succeeds, as the kernel's KSM skips
//!   VMAs it cannot merge.
//! * `MADV_UNMERGEABLE` makes the merged pages of the range private again.
//! * `MADV_DONTNEED`, `MADV_FREE` and `MADV_REMOVE` on registered memory go
//!   through `Engine::discard`, so merged pages read zeros afterwards as
//!   anonymous memory does.
//! * `munmap`, `mremap`, `mprotect` and `mmap(MAP_FIXED)` over registered
//!   memory first take it back from the engine (`unregister_range`: merged
//!   pages become private with their content), then run.
//!
//! Everything else goes straight to the system call. What an interposed
//! symbol cannot see: the C library's own internal calls (malloc arenas,
//! thread stacks) and raw `syscall(2)`s bypass it (see the README), which is
//! why only memory the program itself marks is registered. A forked child
//! does not inherit the engine (its threads stay in the parent): in a child
//! every call goes straight to the kernel, and its inherited merged pages
//! are ordinary copy-on-write memory.

#![deny(missing_docs)]

use samepage::{Discard, Domain, Engine, RegionId, Run, Tunables};
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_int, c_long, c_void};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Mutex, OnceLock, RwLock};

const PAGE: usize = 4096;

/// The live registered ranges: start -> (end, region). Read briefly by
/// every interposed call; written only under `OPS` and never held across a
/// call into the engine (whose own threads may come through here).
static LIVE: RwLock<BTreeMap<usize, (usize, RegionId)>> = RwLock::new(BTreeMap::new());
/// Whether `LIVE` holds anything (the fast path skips the lock).
static ANY: AtomicBool = AtomicBool::new(false);
/// Serializes the calls that change registrations.
static OPS: Mutex<()> = Mutex::new(());
/// The engine, made at the first `MADV_MERGEABLE`, and the process it
/// belongs to.
static ENGINE: OnceLock<Option<Engine>> = OnceLock::new();
static OWNER: AtomicI32 = AtomicI32::new(0);

thread_local! {
    /// Set while this thread is inside the library: its own calls go
    /// straight to the kernel.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

fn set_errno(errno: c_int) {
    // SAFETY: returns this thread's errno slot, valid for its whole life.
    let slot = unsafe { libc::__errno_location() };
    // SAFETY: the slot is valid for writes (above).
    unsafe { *slot = errno };
}

/// Whether this process owns the engine (not a forked child) and this
/// thread is not already inside the library.
fn managed() -> bool {
    ANY.load(Ordering::Acquire)
        && OWNER.load(Ordering::Relaxed) == std::process::id() as i32
        && !INSIDE.with(|i| i.get())
}

/// Runs `f` marked as inside the library; turns its errno into -1.
fn inside(f: impl FnOnce() -> Result<(), c_int>) -> c_int {
    INSIDE.with(|i| i.set(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(Err(libc::EIO));
    INSIDE.with(|i| i.set(false));
    match r {
        Ok(()) => 0,
        Err(e) => {
            set_errno(e);
            -1
        }
    }
}

/// The registered intervals meeting `[a, b)`, clipped to it.
fn overlapping(a: usize, b: usize) -> Vec<(usize, usize, RegionId)> {
    let live = LIVE.read().unwrap_or_else(|e| e.into_inner());
    let mut out = Vec::new();
    let first = live.range(..a).next_back().filter(|(_, (e, _))| *e > a).map(|(s, _)| *s);
    for (&s, &(e, id)) in live.range(first.unwrap_or(a)..b) {
        if e > a {
            out.push((s.max(a), e.min(b), id));
        }
    }
    out
}

fn tunables_from_env() -> Result<Tunables, c_int> {
    // `samepage run` merges as a running ksmd would.
    let mut t = Tunables { run: Run::Merge, ..Tunables::default() };
    if let Ok(spec) = std::env::var("SAMEPAGE_TUNABLES") {
        for kv in spec.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or(libc::EINVAL)?;
            t.set(k, v).map_err(|e| e.errno())?;
        }
    }
    Ok(t)
}

/// The engine: a daemon's client when one answers, else one of this
/// process's own. `None` if neither could start (every `MADV_MERGEABLE`
/// then fails with `EAGAIN`, as the kernel's does without memory).
fn engine() -> Option<&'static Engine> {
    ENGINE
        .get_or_init(|| {
            let t = tunables_from_env().ok()?;
            let socket = std::env::var_os("SAMEPAGE_SOCKET")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(samepage_daemon::default_socket);
            let domain = std::env::var("SAMEPAGE_DOMAIN").ok().and_then(|d| d.parse().ok()).unwrap_or(0);
            let own = std::env::var("SAMEPAGE_MODE").is_ok_and(|m| m == "process");
            let e = if own { None } else { Engine::connect(&socket, Domain(domain), t.clone()).ok() };
            let e = e.or_else(|| Engine::new(t).ok());
            OWNER.store(std::process::id() as i32, Ordering::Relaxed);
            e
        })
        .as_ref()
}

/// The private anonymous read-write parts of `[a, b)` and whether all of
/// it is mapped (`/proc/self/maps`).
fn mergeable_parts(a: usize, b: usize) -> (Vec<(usize, usize)>, bool) {
    let (mut parts, mut pos) = (Vec::new(), a);
    let mut covered = true;
    for m in samepage::maps_in(a, b).unwrap_or_default() {
        if m.start > pos {
            covered = false;
        }
        pos = pos.max(m.end);
        let anon = m.inode == 0 && (m.path.is_empty() || m.path.starts_with("[anon:") || m.path == "[heap]");
        if anon && m.perms.starts_with("rw") && m.perms.ends_with('p') {
            parts.push((m.start.max(a), m.end.min(b)));
        }
    }
    (parts, covered && pos >= b)
}

fn register(a: usize, b: usize) -> Result<(), c_int> {
    let e = engine().ok_or(libc::EAGAIN)?;
    let _ops = OPS.lock().unwrap_or_else(|e| e.into_inner());
    let (parts, covered) = mergeable_parts(a, b);
    for (s, e2) in parts {
        // The gaps of [s, e2) not registered yet.
        let mut pos = s;
        let mut gaps = Vec::new();
        for (os, oe, _) in overlapping(s, e2) {
            if os > pos {
                gaps.push((pos, os));
            }
            pos = pos.max(oe);
        }
        if pos < e2 {
            gaps.push((pos, e2));
        }
        for (gs, ge) in gaps {
            // SAFETY: the program asked for this memory to be merged; the
            // library takes it back before any munmap, mremap, mprotect or
            // mmap(MAP_FIXED) over it comes through (the register contract).
            let id =
                unsafe { e.register(gs as *mut u8, ge - gs) }.map_err(|err| err.errno().unwrap_or(libc::EAGAIN))?;
            LIVE.write().unwrap_or_else(|e| e.into_inner()).insert(gs, (ge, id));
            ANY.store(true, Ordering::Release);
        }
    }
    if covered {
        Ok(())
    } else {
        Err(libc::ENOMEM)
    }
}

/// Takes `[a, b)` back from the engine (its merged pages become private,
/// content intact) and forgets it.
fn take_back(a: usize, b: usize) -> Result<(), c_int> {
    let Some(e) = engine() else { return Ok(()) };
    let _ops = OPS.lock().unwrap_or_else(|e| e.into_inner());
    let parts = overlapping(a, b);
    if parts.is_empty() {
        return Ok(());
    }
    let mut left: HashMap<RegionId, usize> = HashMap::new();
    for (os, oe, id) in parts {
        e.unregister_range(os as *mut u8, oe - os).map_err(|err| err.errno().unwrap_or(libc::EAGAIN))?;
        let mut live = LIVE.write().unwrap_or_else(|e| e.into_inner());
        let start = live.range(..=os).next_back().map(|(s, _)| *s).expect("overlapping came from it");
        let (end, _) = live.remove(&start).expect("present");
        if start < os {
            live.insert(start, (os, id));
        }
        if oe < end {
            live.insert(oe, (end, id));
        }
        left.insert(id, live.values().filter(|(_, r)| *r == id).count());
        ANY.store(!live.is_empty(), Ordering::Release);
    }
    // A region with nothing live left is unregistered (its id freed).
    for (id, n) in left {
        if n == 0 {
            let _ = e.unregister(id);
        }
    }
    Ok(())
}

fn raw(nr: c_long, args: [usize; 6]) -> c_long {
    // SAFETY: a plain system call with the program's own arguments, as the
    // C library's wrapper would make it; errno is set on failure.
    unsafe { libc::syscall(nr, args[0], args[1], args[2], args[3], args[4], args[5]) }
}

/// `madvise(2)`, with `MADV_MERGEABLE`/`MADV_UNMERGEABLE` served by samepage.
///
/// # Safety
/// As `madvise(2)`.
#[no_mangle]
pub unsafe extern "C" fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int {
    let (a, l) = (addr as usize, len);
    let b = a.saturating_add(l.div_ceil(PAGE) * PAGE);
    let own = OWNER.load(Ordering::Relaxed) == 0 || OWNER.load(Ordering::Relaxed) == std::process::id() as i32;
    let outside = INSIDE.with(|i| !i.get());
    match advice {
        libc::MADV_MERGEABLE | libc::MADV_UNMERGEABLE if own && outside => {
            if !a.is_multiple_of(PAGE) || a.checked_add(l).is_none() {
                set_errno(libc::EINVAL);
                return -1;
            }
            if l == 0 {
                return 0;
            }
            if advice == libc::MADV_MERGEABLE {
                inside(|| register(a, b))
            } else {
                inside(|| take_back(a, b))
            }
        }
        libc::MADV_DONTNEED | libc::MADV_FREE | libc::MADV_REMOVE if managed() => {
            let parts = overlapping(a, b);
            if parts.is_empty() {
                return raw(libc::SYS_madvise, [a, l, advice as usize, 0, 0, 0]) as c_int;
            }
            if !a.is_multiple_of(PAGE) {
                set_errno(libc::EINVAL);
                return -1;
            }
            inside(|| discard(a, b, advice, &parts))
        }
        _ => raw(libc::SYS_madvise, [a, l, advice as usize, 0, 0, 0]) as c_int,
    }
}

/// `MADV_DONTNEED`, `MADV_FREE` or `MADV_REMOVE` (`advice`) over `[a, b)`:
/// through the engine on the registered `parts` (so merged pages read zeros
/// afterwards), straight to the kernel between them.
fn discard(a: usize, b: usize, advice: c_int, parts: &[(usize, usize, RegionId)]) -> Result<(), c_int> {
    let how = match advice {
        libc::MADV_DONTNEED => Discard::DontNeed,
        libc::MADV_FREE => Discard::Free,
        _ => Discard::Remove,
    };
    let plain = |from: usize, to: usize| {
        if from < to && raw(libc::SYS_madvise, [from, to - from, advice as usize, 0, 0, 0]) != 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL));
        }
        Ok(())
    };
    let e = engine().ok_or(libc::EAGAIN)?;
    let mut pos = a;
    for &(os, oe, _) in parts {
        plain(pos, os)?;
        e.discard(os as *mut u8, oe - os, how).map_err(|err| err.errno().unwrap_or(libc::EINVAL))?;
        pos = oe;
    }
    plain(pos, b)
}

/// Takes registered memory in `[a, a + len)` back before a call that would
/// unmap or change it; -1 with errno when that fails (nothing changed).
fn before_change(a: usize, len: usize) -> c_int {
    if !managed() || !a.is_multiple_of(PAGE) {
        return 0;
    }
    let b = a.saturating_add(len.div_ceil(PAGE) * PAGE);
    if overlapping(a, b).is_empty() {
        return 0;
    }
    inside(|| take_back(a, b))
}

/// `munmap(2)`, taking registered memory back first.
///
/// # Safety
/// As `munmap(2)`.
#[no_mangle]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: usize) -> c_int {
    if before_change(addr as usize, len) != 0 {
        return -1;
    }
    raw(libc::SYS_munmap, [addr as usize, len, 0, 0, 0, 0]) as c_int
}

/// `mprotect(2)`, taking registered memory back first.
///
/// # Safety
/// As `mprotect(2)`.
#[no_mangle]
pub unsafe extern "C" fn mprotect(addr: *mut c_void, len: usize, prot: c_int) -> c_int {
    if before_change(addr as usize, len) != 0 {
        return -1;
    }
    raw(libc::SYS_mprotect, [addr as usize, len, prot as usize, 0, 0, 0]) as c_int
}

/// `mremap(2)`, taking registered memory back first. The C prototype is
/// variadic (`new_address` only with `MREMAP_FIXED`); on x86-64 the fifth
/// argument arrives in the same register either way, and is read only when
/// the flags say it was passed.
///
/// # Safety
/// As `mremap(2)`.
#[no_mangle]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: usize,
    new_len: usize,
    flags: c_int,
    new_addr: *mut c_void,
) -> *mut c_void {
    if before_change(old as usize, old_len) != 0 {
        return libc::MAP_FAILED;
    }
    let fixed = flags & libc::MREMAP_FIXED != 0;
    if fixed && before_change(new_addr as usize, new_len) != 0 {
        return libc::MAP_FAILED;
    }
    let to = if fixed { new_addr as usize } else { 0 };
    raw(libc::SYS_mremap, [old as usize, old_len, new_len, flags as usize, to, 0]) as *mut c_void
}

/// `mmap(2)`, taking registered memory back first when `MAP_FIXED`
/// replaces it.
///
/// # Safety
/// As `mmap(2)`.
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: libc::off_t,
) -> *mut c_void {
    if flags & libc::MAP_FIXED != 0 && before_change(addr as usize, len) != 0 {
        return libc::MAP_FAILED;
    }
    raw(libc::SYS_mmap, [addr as usize, len, prot as usize, flags as usize, fd as usize, offset as usize])
        as *mut c_void
}
