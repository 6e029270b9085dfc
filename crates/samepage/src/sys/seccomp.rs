//! seccomp user notification: seeing the mapping changes a program makes
//! without going through an interposed symbol.
//!
//! `LD_PRELOAD` interposes only calls made through the PLT. glibc's own
//! `__munmap`, `__mremap`, `__mprotect`, `__madvise`, `__brk` (malloc arenas,
//! `shrink_heap`'s `MADV_DONTNEED`, `realloc`'s `mremap`, thread stacks,
//! ld.so) bypass it. Registered memory must be taken back from the engine
//! *before* such a call runs (afterwards the engine could map a pool page
//! over whatever the program put there).
//!
//! A seccomp filter with `SECCOMP_RET_USER_NOTIF` stops the calling thread
//! at system-call entry and hands its arguments to whoever holds the
//! listener fd; the thread goes on only when the listener answers
//! (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`: the call runs as asked; or an
//! error). Filters are inherited by every thread and child and survive
//! `exec`; the listener fd is `O_CLOEXEC`, so it must live in a process
//! that outlives the program's `exec`s: `samepage run`'s supervisor, the
//! program's parent. (Documentation/userspace-api/seccomp_filter.rst,
//! "Userspace Notification".)
//!
//! The filter notifies only the calls that can change registered memory:
//! `munmap`, `mremap`, `mprotect`, `brk`, `mmap` with `MAP_FIXED`, and
//! `madvise` with `MADV_DONTNEED`, `MADV_DONTNEED_LOCKED`, `MADV_FREE` or
//! `MADV_REMOVE`. Everything else (and every call of another architecture
//! or ABI) is allowed without a round trip.

use super::{Op, SysError};
use linux_raw_sys::ptrace as p;
use rustix::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use rustix::ioctl::{self, opcode};

// Classic BPF opcodes (<linux/bpf_common.h>).
const LD_W_ABS: u16 = 0x20; // BPF_LD (0) | BPF_W (0) | BPF_ABS (0x20)
const JEQ_K: u16 = 0x05 | 0x10; // BPF_JMP | BPF_JEQ | BPF_K
const JSET_K: u16 = 0x05 | 0x40; // BPF_JMP | BPF_JSET | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K

// Offsets into `struct seccomp_data`.
const NR: u32 = 0;
const ARCH: u32 = 4;
fn arg_low(i: u32) -> u32 {
    16 + 8 * i
}

const MADV_DONTNEED_LOCKED: u32 = 24;

/// The system calls the filter notifies, by number (x86-64).
pub mod nr {
    /// `mmap` (notified with `MAP_FIXED` only).
    pub const MMAP: i32 = 9;
    /// `mprotect`.
    pub const MPROTECT: i32 = 10;
    /// `munmap`.
    pub const MUNMAP: i32 = 11;
    /// `brk`.
    pub const BRK: i32 = 12;
    /// `mremap`.
    pub const MREMAP: i32 = 25;
    /// `madvise` (notified for discarding advice only).
    pub const MADVISE: i32 = 28;
}

fn stmt(code: u16, k: u32) -> p::sock_filter {
    p::sock_filter { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> p::sock_filter {
    p::sock_filter { code, jt, jf, k }
}

/// The filter program (see the module documentation).
fn program() -> Vec<p::sock_filter> {
    let notify = p::SECCOMP_RET_USER_NOTIF;
    let allow = p::SECCOMP_RET_ALLOW;
    // Layout (indices): the two returns are at the end; jumps count forward.
    let mut f = vec![
        /* 0 */ stmt(LD_W_ABS, ARCH),
        /* 1 */ jump(JEQ_K, p::AUDIT_ARCH_X86_64, 0, 0), // jf patched to ALLOW
        /* 2 */ stmt(LD_W_ABS, NR),
        /* 3 */ jump(JEQ_K, nr::MUNMAP as u32, 0, 0), // jt -> NOTIFY
        /* 4 */ jump(JEQ_K, nr::MREMAP as u32, 0, 0),
        /* 5 */ jump(JEQ_K, nr::MPROTECT as u32, 0, 0),
        /* 6 */ jump(JEQ_K, nr::BRK as u32, 0, 0),
        /* 7 */ jump(JEQ_K, nr::MMAP as u32, 0, 2), // jt -> 8, jf -> 10
        /* 8 */ stmt(LD_W_ABS, arg_low(3)),
        /* 9 */ jump(JSET_K, rustix::mm::MapFlags::FIXED.bits(), 0, 0), // jt NOTIFY, jf ALLOW
        /* 10 */ jump(JEQ_K, nr::MADVISE as u32, 0, 0), // jf -> ALLOW
        /* 11 */ stmt(LD_W_ABS, arg_low(2)),
        /* 12 */ jump(JEQ_K, libc::MADV_DONTNEED as u32, 0, 0),
        /* 13 */ jump(JEQ_K, libc::MADV_FREE as u32, 0, 0),
        /* 14 */ jump(JEQ_K, libc::MADV_REMOVE as u32, 0, 0),
        /* 15 */ jump(JEQ_K, MADV_DONTNEED_LOCKED, 0, 0), // jf -> ALLOW
        /* 16 ALLOW */ stmt(RET_K, allow),
        /* 17 NOTIFY */ stmt(RET_K, notify),
    ];
    const ALLOW: usize = 16;
    const NOTIFY: usize = 17;
    let off = |from: usize, to: usize| (to - from - 1) as u8;
    f[1].jf = off(1, ALLOW);
    for (i, ins) in f.iter_mut().enumerate().take(7).skip(3) {
        ins.jt = off(i, NOTIFY);
    }
    f[9].jt = off(9, NOTIFY);
    f[9].jf = off(9, ALLOW);
    f[10].jf = off(10, ALLOW);
    for (i, ins) in f.iter_mut().enumerate().take(16).skip(12) {
        ins.jt = off(i, NOTIFY);
    }
    f[15].jf = off(15, ALLOW);
    f
}

/// Installs the filter on the calling thread (and so on everything it
/// `exec`s and forks afterwards) and returns the listener.
///
/// Without `CAP_SYS_ADMIN` the kernel requires `no_new_privs`, which is set
/// then (a set-user-ID program run afterwards gets no new privileges).
/// Call it in the child about to `exec` the program, single-threaded.
pub fn install_filter() -> Result<OwnedFd, SysError> {
    let mut filter = program();
    let prog = p::sock_fprog { len: filter.len() as u16, filter: filter.as_mut_ptr() };
    let flags = p::SECCOMP_FILTER_FLAG_NEW_LISTENER as usize;
    let call = |prog: &p::sock_fprog| {
        // SAFETY: seccomp(SECCOMP_SET_MODE_FILTER, flags, &prog): `prog`
        // points to `len` valid instructions that live across the call; the
        // kernel copies them. The return value is a new fd (the listener) or
        // -1 with errno.
        let r = unsafe { libc::syscall(libc::SYS_seccomp, p::SECCOMP_SET_MODE_FILTER as usize, flags, prog) };
        if r < 0 {
            Err(rustix::io::Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)))
        } else {
            // SAFETY: the kernel just returned this fd to us; we own it.
            Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
        }
    };
    match call(&prog) {
        Err(rustix::io::Errno::ACCESS) => {
            rustix::thread::set_no_new_privs(true).op("prctl(PR_SET_NO_NEW_PRIVS)")?;
            call(&prog).op("seccomp(SECCOMP_SET_MODE_FILTER, NEW_LISTENER)")
        }
        r => r.op("seccomp(SECCOMP_SET_MODE_FILTER, NEW_LISTENER)"),
    }
}

/// One stopped system call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notification {
    /// The kernel's cookie for the answer.
    pub id: u64,
    /// The calling thread (its id in the listener's pid namespace).
    pub tid: u32,
    /// The system call number ([`nr`]).
    pub nr: i32,
    /// Where the call was made from (the instruction after `syscall`).
    pub ip: u64,
    /// Its six arguments.
    pub args: [u64; 6],
}

/// The listener side of the filter.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
}

type Recv<'a> = ioctl::Updater<'a, { opcode::read_write::<p::seccomp_notif>(b'!', 0) }, p::seccomp_notif>;
type Send<'a> = ioctl::Updater<'a, { opcode::read_write::<p::seccomp_notif_resp>(b'!', 1) }, p::seccomp_notif_resp>;
type SetFlags = ioctl::Setter<{ opcode::write::<u64>(b'!', 4) }, u64>;

impl Listener {
    /// Wraps the fd [`install_filter`] returned (possibly received from
    /// another process). Asks for synchronous wake-ups
    /// (`SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP`, 6.6+: the answered thread runs
    /// on the listener's CPU, saving a migration); older kernels go without.
    pub fn new(fd: OwnedFd) -> Listener {
        // SAFETY: SECCOMP_IOCTL_NOTIF_SET_FLAGS takes a u64 by pointer; the
        // Setter holds the value for the call.
        // SAFETY: the opcode is right for a u64 argument (above).
        let req = unsafe { SetFlags::new(1) };
        // SAFETY: as above; the request owns its value for the call.
        let _ = unsafe { ioctl::ioctl(&fd, req) };
        Listener { fd }
    }

    /// The fd, to poll for readiness (`POLLIN`: a call waits; `POLLHUP`: no
    /// task is left under the filter).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Receives one stopped call (blocks until one comes). `ENOENT` when the
    /// caller died meanwhile.
    pub fn recv(&self) -> Result<Notification, SysError> {
        // SAFETY: all-zero is a valid `seccomp_notif` (integers only); the
        // kernel requires it zeroed.
        let mut n: p::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: SECCOMP_IOCTL_NOTIF_RECV = _IOWR('!', 0, struct
        // seccomp_notif); the Updater points to our live, exclusively
        // borrowed struct for the call.
        let req = unsafe { Recv::new(&mut n) };
        // SAFETY: as above.
        unsafe { ioctl::ioctl(&self.fd, req) }.op("ioctl(SECCOMP_IOCTL_NOTIF_RECV)")?;
        Ok(Notification { id: n.id, tid: n.pid, nr: n.data.nr, ip: n.data.instruction_pointer, args: n.data.args })
    }

    fn answer(&self, id: u64, error: i32, flags: u32) -> Result<(), SysError> {
        let mut r = p::seccomp_notif_resp { id, val: 0, error, flags };
        // SAFETY: SECCOMP_IOCTL_NOTIF_SEND = _IOWR('!', 1, struct
        // seccomp_notif_resp); the Updater points to our live struct.
        let req = unsafe { Send::new(&mut r) };
        // SAFETY: as above.
        unsafe { ioctl::ioctl(&self.fd, req) }.op("ioctl(SECCOMP_IOCTL_NOTIF_SEND)")
    }

    /// Lets the call run as the program made it. `ENOENT` when the caller
    /// died (or was interrupted by a signal) meanwhile.
    pub fn allow(&self, id: u64) -> Result<(), SysError> {
        self.answer(id, 0, p::SECCOMP_USER_NOTIF_FLAG_CONTINUE)
    }

    /// Fails the call with `errno` without running it.
    pub fn fail(&self, id: u64, errno: i32) -> Result<(), SysError> {
        self.answer(id, -errno.abs(), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_jump_lands_inside_the_program() {
        let f = program();
        for (i, ins) in f.iter().enumerate() {
            if ins.code & 0x07 == 0x05 {
                assert!(i + 1 + (ins.jt as usize) < f.len() && i + 1 + (ins.jf as usize) < f.len(), "{i}");
            }
        }
        assert_eq!(f.last().unwrap().k, p::SECCOMP_RET_USER_NOTIF);
    }
}
