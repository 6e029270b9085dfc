//! Registering existing memory: what is refused, and unregister's promise.

mod common;
use common::*;
use samepage::{Engine, Error, Run, Tunables};

fn anon(len: usize, flags: libc::c_int) -> *mut u8 {
    // SAFETY: a fresh mapping at an address the kernel picks.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
    assert_ne!(p, libc::MAP_FAILED);
    p.cast()
}

#[test]
fn bad_ranges_are_refused_with_typed_errors() {
    let engine = Engine::new(Tunables::default()).unwrap();
    let len = 16 * PAGE;
    let p = anon(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS);
    // SAFETY: the ranges stay mapped for the whole test and are
    // unregistered before they are unmapped (the hole below is never
    // registered).
    let register = |addr: *mut u8, len: usize| unsafe { engine.register(addr, len) };
    assert!(matches!(register(p.wrapping_add(1), PAGE), Err(Error::Unaligned { .. })));
    assert!(matches!(register(p, PAGE + 1), Err(Error::Unaligned { .. })));
    assert!(matches!(register(p, 0), Err(Error::Unaligned { .. })));
    let id = register(p, 8 * PAGE).unwrap();
    let e = register(p.wrapping_add(4 * PAGE), 8 * PAGE).unwrap_err();
    assert!(matches!(e, Error::Overlap { .. }), "{e}");
    let shared = anon(len, libc::MAP_SHARED | libc::MAP_ANONYMOUS);
    let e = register(shared, len).unwrap_err();
    assert!(matches!(e, Error::NotAnonymous { .. }) && e.to_string().contains("shared"), "{e}");
    let f = std::fs::File::open("/proc/self/exe").unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: a fresh read-only mapping of a file at an address the kernel picks.
    let file = unsafe { libc::mmap(std::ptr::null_mut(), PAGE, libc::PROT_READ, libc::MAP_PRIVATE, f.as_raw_fd(), 0) };
    let e = register(file.cast(), PAGE).unwrap_err();
    assert!(matches!(e, Error::NotAnonymous { .. }), "{e}");
    // A hole in the middle.
    // SAFETY: a page of our own mapping that nothing uses.
    unsafe { libc::munmap(p.wrapping_add(12 * PAGE).cast(), PAGE) };
    let e = register(p.wrapping_add(10 * PAGE), 4 * PAGE).unwrap_err();
    assert!(e.to_string().contains("not mapped"), "{e}");
    engine.unregister(id).unwrap();
    assert!(matches!(engine.unregister(id), Err(Error::UnknownRegion(_))));
    let t = Tunables { max_page_sharing: 1, ..Tunables::default() };
    let e = engine.set_tunables(t).unwrap_err();
    assert!(e.to_string().contains("max_page_sharing = 1") && e.to_string().contains("2 to"), "{e}");
}

#[test]
fn unregister_makes_every_page_private_with_content_intact() {
    let _g = serial();
    let engine = Engine::new(fast(8, true)).unwrap();
    let pages = 1024;
    let p = anon(pages * PAGE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS);
    let want: Vec<[u8; PAGE]> =
        (0..pages).map(|i| if i % 2 == 0 { [0; PAGE] } else { content(i as u64 % 4) }).collect();
    for (i, w) in want.iter().enumerate() {
        // SAFETY: inside our mapping.
        unsafe { std::ptr::copy_nonoverlapping(w.as_ptr(), p.wrapping_add(i * PAGE), PAGE) };
    }
    let anon_before = rollup("Anonymous");
    // SAFETY: the mapping stays for the whole test; unregistered before unmap.
    let id = unsafe { engine.register(p, pages * PAGE) }.unwrap();
    let c = converge(&engine, 1);
    assert_eq!(c.ksm_zero_pages, 512, "{c:?}");
    assert!(c.stable_node_dups > 0, "max_page_sharing 8 makes chains: {c:?}");
    let rc = engine.region_counters(id).unwrap();
    assert_eq!((rc.ksm_zero_pages, rc.ksm_merging_pages), (512, 512), "{rc:?}");
    assert!(rollup("Anonymous") + 900 * PAGE as u64 <= anon_before);
    engine.unregister(id).unwrap();
    let c = engine.counters().unwrap();
    assert_eq!((c.pages_shared, c.pages_sharing, c.ksm_zero_pages, c.rmap_items), (0, 0, 0, 0), "{c:?}");
    assert_eq!(pool_mappings_in(p as usize, p as usize + pages * PAGE), 0, "no pool mapping left");
    // Private again: the zero pages and merged pages are anonymous memory of their own.
    assert!(rollup("Anonymous") + 16 * PAGE as u64 >= anon_before, "pages are private again");
    for (i, w) in want.iter().enumerate() {
        // SAFETY: inside our mapping, which nothing writes any more.
        let got = unsafe { std::slice::from_raw_parts(p.wrapping_add(i * PAGE), PAGE) };
        assert!(got == w, "page {i} changed");
    }
    // And it stays ordinary memory: writes and MADV_DONTNEED behave as anonymous memory.
    // SAFETY: our mapping, nothing else uses it.
    unsafe { libc::madvise(p.cast(), pages * PAGE, libc::MADV_DONTNEED) };
    // SAFETY: as above.
    assert!(unsafe { std::slice::from_raw_parts(p, pages * PAGE) }.iter().all(|&b| b == 0));
    // SAFETY: as above; not used afterwards.
    unsafe { libc::munmap(p.cast(), pages * PAGE) };
    engine.set_run(Run::Stop).unwrap();
}
