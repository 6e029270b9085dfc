//! The samepage engine behind a C ABI (`include/samepage.h`,
//! `libsamepage_c.so`): what a C program, or anything with a C FFI, needs to
//! merge its memory with samepage: an engine of its own or a daemon's
//! client, register and unregister (the kernel's `MADV_MERGEABLE` and
//! `MADV_UNMERGEABLE`), take part of a region back, discard, merge now,
//! tunables by their kernel names, and the counters.
//!
//! Errors are negative errnos, as the kernel's calls give them, with a
//! message per thread ([`samepage_last_error`]); no call panics across the
//! boundary (a panic inside is caught and answered `-EIO`).

#![deny(missing_docs)]

use samepage::{Discard, Domain, Engine, Error, RegionId, Tunables};
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

/// An engine, as C holds it (opaque: `samepage_engine *`).
pub struct SamepageEngine(Engine);

/// The counters of `/sys/kernel/mm/ksm` (`samepage_counters`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct SamepageCounters {
    /// `pages_shared`.
    pub pages_shared: u64,
    /// `pages_sharing`.
    pub pages_sharing: u64,
    /// `pages_unshared`.
    pub pages_unshared: u64,
    /// `pages_volatile`.
    pub pages_volatile: u64,
    /// `pages_scanned`.
    pub pages_scanned: u64,
    /// `pages_skipped`.
    pub pages_skipped: u64,
    /// `full_scans`.
    pub full_scans: u64,
    /// `stable_node_chains`.
    pub stable_node_chains: u64,
    /// `stable_node_dups`.
    pub stable_node_dups: u64,
    /// `ksm_zero_pages`.
    pub ksm_zero_pages: u64,
    /// `general_profit`.
    pub general_profit: i64,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: String) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs `f`, turning its error (or a panic) into a negative errno and the
/// thread's message.
fn call(f: impl FnOnce() -> Result<(), (c_int, String)>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_error(String::new());
            0
        }
        Ok(Err((errno, msg))) => {
            set_error(msg);
            -errno
        }
        Err(_) => {
            set_error("samepage: internal panic".into());
            -libc::EIO
        }
    }
}

fn engine_error(e: Error) -> (c_int, String) {
    (e.errno().unwrap_or(libc::EIO), e.to_string())
}

fn invalid(what: &str) -> (c_int, String) {
    (libc::EINVAL, what.to_string())
}

/// The engine behind a handle, or `EINVAL` for NULL.
///
/// # Safety
/// `engine` is NULL or a handle from `samepage_new`/`samepage_connect` not
/// yet freed.
unsafe fn engine<'a>(engine: *mut SamepageEngine) -> Result<&'a Engine, (c_int, String)> {
    // SAFETY: guaranteed by the caller: NULL or a live handle.
    unsafe { engine.as_ref() }.map(|e| &e.0).ok_or_else(|| invalid("engine is NULL"))
}

/// A C string argument, or `EINVAL`.
///
/// # Safety
/// `s` is NULL or a NUL-terminated string.
unsafe fn text<'a>(s: *const c_char, what: &str) -> Result<&'a str, (c_int, String)> {
    if s.is_null() {
        return Err(invalid(&format!("{what} is NULL")));
    }
    // SAFETY: guaranteed by the caller: a NUL-terminated string.
    unsafe { CStr::from_ptr(s) }.to_str().map_err(|_| invalid(&format!("{what} is not UTF-8")))
}

/// Sets the calling thread's `errno`.
fn set_errno(errno: c_int) {
    // SAFETY: returns this thread's errno slot, valid for its whole life.
    let slot = unsafe { libc::__errno_location() };
    // SAFETY: the slot is valid for writes (above).
    unsafe { *slot = errno };
}

fn boxed(r: Result<Engine, Error>) -> *mut SamepageEngine {
    match r {
        Ok(e) => {
            set_error(String::new());
            Box::into_raw(Box::new(SamepageEngine(e)))
        }
        Err(e) => {
            let errno = e.errno().unwrap_or(libc::EIO);
            set_error(e.to_string());
            set_errno(errno);
            std::ptr::null_mut()
        }
    }
}

/// `samepage_new`: an engine of this process's own, default tunables.
#[no_mangle]
pub extern "C" fn samepage_new() -> *mut SamepageEngine {
    catch_unwind(|| boxed(Engine::new(Tunables::default()))).unwrap_or(std::ptr::null_mut())
}

/// `samepage_connect`: an engine that is a client of the daemon at `socket`
/// (NULL: the default socket) in trust domain `domain`.
///
/// # Safety
/// `socket` is NULL or a NUL-terminated path.
#[no_mangle]
pub unsafe extern "C" fn samepage_connect(socket: *const c_char, domain: u32) -> *mut SamepageEngine {
    let path = if socket.is_null() {
        samepage_daemon::default_socket()
    } else {
        // SAFETY: guaranteed by the caller.
        match unsafe { text(socket, "socket") } {
            Ok(p) => PathBuf::from(p),
            Err((errno, msg)) => {
                set_error(msg);
                set_errno(errno);
                return std::ptr::null_mut();
            }
        }
    };
    catch_unwind(|| boxed(Engine::connect(&path, Domain(domain), Tunables::default()))).unwrap_or(std::ptr::null_mut())
}

/// `samepage_free`: stops the engine (NULL is ignored).
///
/// # Safety
/// `engine` is NULL or a handle not yet freed; it is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn samepage_free(engine: *mut SamepageEngine) {
    if !engine.is_null() {
        // SAFETY: a handle from Box::into_raw, freed once (the caller's word).
        let e = unsafe { Box::from_raw(engine) };
        let _ = catch_unwind(AssertUnwindSafe(move || drop(e)));
    }
}

/// `samepage_register`: `madvise(MADV_MERGEABLE)` of `[addr, addr + len)`.
///
/// # Safety
/// `engine` a live handle; `region` NULL or writable; the memory stays
/// mapped, and is not munmap'ed, mremap'ed or mprotect'ed, until
/// unregistered (the contract of `Engine::register`).
#[no_mangle]
pub unsafe extern "C" fn samepage_register(
    engine: *mut SamepageEngine,
    addr: *mut c_void,
    len: usize,
    region: *mut u32,
) -> c_int {
    call(|| {
        // SAFETY: guaranteed by the caller.
        let e = unsafe { self::engine(engine) }?;
        // SAFETY: the caller keeps the register contract.
        let id = unsafe { e.register(addr.cast(), len) }.map_err(engine_error)?;
        if !region.is_null() {
            // SAFETY: the caller's pointer, writable (its word).
            unsafe { region.write(id.0) };
        }
        Ok(())
    })
}

/// `samepage_unregister`: a region's pages become private again.
///
/// # Safety
/// `engine` a live handle.
#[no_mangle]
pub unsafe extern "C" fn samepage_unregister(engine: *mut SamepageEngine, region: u32) -> c_int {
    // SAFETY: guaranteed by the caller.
    call(|| unsafe { self::engine(engine) }?.unregister(RegionId(region)).map_err(engine_error))
}

/// `samepage_unregister_range`: takes part of a region back.
///
/// # Safety
/// `engine` a live handle.
#[no_mangle]
pub unsafe extern "C" fn samepage_unregister_range(
    engine: *mut SamepageEngine,
    addr: *mut c_void,
    len: usize,
) -> c_int {
    // SAFETY: guaranteed by the caller.
    call(|| unsafe { self::engine(engine) }?.unregister_range(addr.cast(), len).map_err(engine_error))
}

/// `samepage_discard`: `MADV_DONTNEED`, `MADV_FREE` or `MADV_REMOVE` with the
/// kernel's semantics on registered memory.
///
/// # Safety
/// `engine` a live handle.
#[no_mangle]
pub unsafe extern "C" fn samepage_discard(
    engine: *mut SamepageEngine,
    addr: *mut c_void,
    len: usize,
    advice: c_int,
) -> c_int {
    call(|| {
        let how = match advice {
            libc::MADV_DONTNEED => Discard::DontNeed,
            libc::MADV_FREE => Discard::Free,
            libc::MADV_REMOVE => Discard::Remove,
            other => {
                return Err(invalid(&format!(
                    "advice {other} is not MADV_DONTNEED ({}), MADV_FREE ({}) or MADV_REMOVE ({})",
                    libc::MADV_DONTNEED,
                    libc::MADV_FREE,
                    libc::MADV_REMOVE
                )))
            }
        };
        // SAFETY: guaranteed by the caller.
        unsafe { self::engine(engine) }?.discard(addr.cast(), len, how).map_err(engine_error)
    })
}

/// `samepage_merge_now`: merges a range now; reports pages and bytes saved.
///
/// # Safety
/// `engine` a live handle; `pages` and `saved_bytes` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn samepage_merge_now(
    engine: *mut SamepageEngine,
    addr: *mut c_void,
    len: usize,
    pages: *mut u64,
    saved_bytes: *mut u64,
) -> c_int {
    call(|| {
        // SAFETY: guaranteed by the caller.
        let m = unsafe { self::engine(engine) }?.merge_now(addr.cast(), len).map_err(engine_error)?;
        if !pages.is_null() {
            // SAFETY: the caller's pointer, writable.
            unsafe { pages.write(m.pages) };
        }
        if !saved_bytes.is_null() {
            // SAFETY: the caller's pointer, writable.
            unsafe { saved_bytes.write(m.saved_bytes) };
        }
        Ok(())
    })
}

/// `samepage_set`: writes a tunable by its `/sys/kernel/mm/ksm` name.
///
/// # Safety
/// `engine` a live handle; `name` and `value` NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn samepage_set(engine: *mut SamepageEngine, name: *const c_char, value: *const c_char) -> c_int {
    call(|| {
        // SAFETY: guaranteed by the caller.
        let e = unsafe { self::engine(engine) }?;
        // SAFETY: guaranteed by the caller.
        let name = unsafe { text(name, "name") }?;
        // SAFETY: guaranteed by the caller.
        let value = unsafe { text(value, "value") }?;
        let mut t = e.tunables().map_err(engine_error)?;
        t.set(name, value).map_err(|err| (err.errno(), err.to_string()))?;
        e.set_tunables(t).map_err(engine_error)
    })
}

/// `samepage_get`: reads a tunable as its sysfs file shows it.
///
/// # Safety
/// `engine` a live handle; `name` a NUL-terminated string; `buf` `len`
/// writable bytes.
#[no_mangle]
pub unsafe extern "C" fn samepage_get(
    engine: *mut SamepageEngine,
    name: *const c_char,
    buf: *mut c_char,
    len: usize,
) -> c_int {
    call(|| {
        // SAFETY: guaranteed by the caller.
        let e = unsafe { self::engine(engine) }?;
        // SAFETY: guaranteed by the caller.
        let name = unsafe { text(name, "name") }?;
        let t = e.tunables().map_err(engine_error)?;
        let value = t
            .named()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .ok_or_else(|| (libc::ENOENT, format!("no tunable named {name:?}")))?;
        if buf.is_null() || value.len() >= len {
            return Err((
                libc::ERANGE,
                format!("{name} is {} bytes with its NUL; the buffer has {len}", value.len() + 1),
            ));
        }
        let mut bytes = value.into_bytes();
        bytes.push(0);
        // SAFETY: `buf` has `len` writable bytes (the caller's word), and
        // bytes.len() = value.len() + 1 <= len.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), bytes.len()) };
        Ok(())
    })
}

/// `samepage_counters_get`: the counters now.
///
/// # Safety
/// `engine` a live handle; `out` writable.
#[no_mangle]
pub unsafe extern "C" fn samepage_counters_get(engine: *mut SamepageEngine, out: *mut SamepageCounters) -> c_int {
    call(|| {
        // SAFETY: guaranteed by the caller.
        let c = unsafe { self::engine(engine) }?.counters().map_err(engine_error)?;
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let v = SamepageCounters {
            pages_shared: c.pages_shared,
            pages_sharing: c.pages_sharing,
            pages_unshared: c.pages_unshared,
            pages_volatile: c.pages_volatile,
            pages_scanned: c.pages_scanned,
            pages_skipped: c.pages_skipped,
            full_scans: c.full_scans,
            stable_node_chains: c.stable_node_chains,
            stable_node_dups: c.stable_node_dups,
            ksm_zero_pages: c.ksm_zero_pages,
            general_profit: c.general_profit,
        };
        // SAFETY: the caller's pointer, writable.
        unsafe { out.write(v) };
        Ok(())
    })
}

/// `samepage_last_error`: the calling thread's last failure, or "".
#[no_mangle]
pub extern "C" fn samepage_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}
