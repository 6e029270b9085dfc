//! Forks and the pool.
//!
//! A forked child inherits the program's mappings of the pool. Those of its
//! pages it has not touched have no page-table entry (fork copies none for a
//! private file mapping without anonymous pages), so the pool page's mapcount
//! does not show them, yet the child reads the pool page on its first access.
//! Freeing (hole punching) such a page would make the child read zeros.
//!
//! So slots are freed only under [`hold`], which `pthread_atfork` makes every
//! `fork()` wait for, and only when no descendant process maps the pool
//! ([`descendants_map`], from `/proc`). A child that has `exec`ed or exited no
//! longer counts.
//!
//! Lock order. The engine's scanner takes [`hold`] under its state lock, so
//! a `fork()` must not wait for this guard while it holds a lock that some
//! thread takes before the engine's state. The preload library's prepare
//! handler takes its operations lock (a merge-any sweep registers regions,
//! taking the engine's state, under it): it calls [`ForkHold::in_own_handlers`]
//! at load and takes a [`ForkHold`] itself, after its operations lock and
//! before the engine's mappings and its heap. Otherwise `pthread_atfork`'s
//! order (prepare handlers run last registered first) would take this guard
//! first, the order in which a fork, a sweep and a scan deadlocked.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

static LOCK: AtomicBool = AtomicBool::new(false);

/// Whether the caller's own `pthread_atfork` handlers take the guard
/// ([`ForkHold::in_own_handlers`]): then this module's handlers stand aside.
static CALLERS: AtomicBool = AtomicBool::new(false);

fn acquire() {
    while LOCK.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        std::thread::yield_now();
    }
}

fn release() {
    LOCK.store(false, Ordering::Release);
}

extern "C" fn prepare() {
    if !CALLERS.load(Ordering::Acquire) {
        acquire();
    }
}

extern "C" fn after() {
    if !CALLERS.load(Ordering::Acquire) {
        release();
    }
}

/// Installs the `pthread_atfork` handlers (once per process).
pub fn install() {
    // The caller's handlers take the guard (their handlers would do
    // nothing), and `pthread_atfork` must not be called here then: engines
    // are made under a lock the caller's prepare handler takes, and before
    // glibc 2.36 `pthread_atfork` waits for the lock `fork()` holds while
    // the prepare handlers run.
    if CALLERS.load(Ordering::Acquire) {
        return;
    }
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: the handlers are plain functions that only touch an atomic;
        // they stay valid for the life of the process.
        unsafe { libc::pthread_atfork(Some(prepare), Some(after), Some(after)) };
    });
}

/// Holds off `fork()` while alive.
pub struct Hold(());

/// Holds off `fork()` until the returned guard drops.
pub fn hold() -> Hold {
    acquire();
    Hold(())
}

impl Drop for Hold {
    fn drop(&mut self) {
        release();
    }
}

/// The guard, held across a `fork()` by the caller's own `pthread_atfork`
/// handlers, in the caller's lock order (see the module's documentation).
#[derive(Debug)]
pub struct ForkHold(());

impl ForkHold {
    /// Declares that the calling library's `pthread_atfork` prepare handler
    /// takes a [`ForkHold`] and both its after handlers drop it: this
    /// module's own handlers then do nothing. Call it before the first
    /// engine starts (at load), never after a prepare handler ran.
    pub fn in_own_handlers() {
        CALLERS.store(true, Ordering::Release);
    }

    /// Takes the guard: the engine moves no page out and frees no pool slot
    /// until it drops (in the parent after the fork, and in the child).
    pub fn take() -> ForkHold {
        acquire();
        ForkHold(())
    }
}

impl Drop for ForkHold {
    fn drop(&mut self) {
        release();
    }
}

/// Whether any descendant of this process maps a file whose
/// `/proc/PID/maps` lines contain `identity` (see `MemfdPool::identity`).
/// When a descendant's maps cannot be read, it is assumed to map it.
pub fn descendants_map(identity: &str) -> bool {
    let mut todo: Vec<u32> = children_of(std::process::id());
    let mut seen = 0;
    while let Some(pid) = todo.pop() {
        seen += 1;
        if seen > 100_000 {
            return true;
        }
        match std::fs::read_to_string(format!("/proc/{pid}/maps")) {
            Ok(maps) => {
                if maps.lines().any(|l| l.contains(identity) && l.contains("samepage-pool")) {
                    return true;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(_) => return true,
        }
        todo.extend(children_of(pid));
    }
    false
}

fn children_of(pid: u32) -> Vec<u32> {
    // Without the C library's malloc (`numbered_entries`): this runs under
    // the fork guard.
    let mut out = Vec::new();
    for tid in samepage_daemon::procmaps::numbered_entries(&format!("/proc/{pid}/task")).unwrap_or_default() {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/children")) {
            out.extend(s.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        }
    }
    out
}
