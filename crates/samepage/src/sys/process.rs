//! fork, for tests and the torture command: a child checks and writes its
//! own copy of merged memory.

use super::SysError;
use samepage_core::PAGE_SIZE;

/// Forks. The child compares each page `(base, index)` with `want`, writes a
/// byte into each and reads it back, then exits; returns whether the child
/// found everything right. The child touches only raw memory and calls
/// `_exit`, so it is safe to fork from a multithreaded process.
pub fn fork_check(pages: &[(usize, usize)], want: &[[u8; PAGE_SIZE]]) -> Result<bool, SysError> {
    assert_eq!(pages.len(), want.len());
    // SAFETY: after fork the child only reads and writes memory with raw
    // pointers (no allocation, no locks) and leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(SysError::new("fork", super::last_errno()));
    }
    if pid == 0 {
        let mut ok = true;
        for (&(base, index), w) in pages.iter().zip(want) {
            let page = base + index * PAGE_SIZE;
            for (j, b) in w.iter().enumerate() {
                let p = (page + j) as *const u8;
                // SAFETY: a page of memory the parent had mapped, inherited.
                ok &= unsafe { p.read_volatile() } == *b;
            }
            let p = (page + 17) as *mut u8;
            // SAFETY: as above; the child's copy is private to it.
            unsafe { p.write_volatile(!w[17]) };
            // SAFETY: as above.
            ok &= unsafe { p.read_volatile() } == !w[17];
        }
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    if r != pid {
        return Err(SysError::new("waitpid", super::last_errno()));
    }
    Ok(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0)
}
