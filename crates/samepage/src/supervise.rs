//! seccomp user notification for `samepage run`'s supervisor: the filter
//! that stops a program's mapping changes (glibc's internal ones included)
//! before they run, its listener, and the little wire protocol between the
//! supervisor and the agent thread the preload library runs in each
//! process.
//!
//! The protocol, over a Unix stream socket (`$SAMEPAGE_AGENT_SOCKET`):
//! the agent sends a [`Hello`] and waits for one ack byte; then, for each
//! stopped call of its process, the supervisor sends a [`Request`] and the
//! agent answers with [`reply`]: 0 to let the call run, or the errno the
//! call fails with. Numbers are little-endian.

pub use crate::sys::seccomp::{
    nr, own_syscall, set_own_tag, tag_args, Filter, Listener, Notification, OwnTag, DISCARDING_ADVICE, OWN_TAG_ENV,
};
use std::ops::Range;

/// The environment variable naming the supervisor's agent socket.
pub const AGENT_SOCKET_ENV: &str = "SAMEPAGE_AGENT_SOCKET";
/// The environment variable that carries merge-any (`prctl(PR_SET_MEMORY_MERGE, 1)`)
/// across `exec`: `1` when on.
pub const MERGE_ANY_ENV: &str = "SAMEPAGE_MERGE_ANY";

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// An agent's first message: its process and the address range of the
/// preload library's code (calls made from there are the engine's own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The agent's process.
    pub pid: u32,
    /// The library's code.
    pub text: Range<u64>,
}

impl Hello {
    /// Bytes on the wire.
    pub const LEN: usize = 24;
    const MAGIC: [u8; 4] = *b"SPAG";

    /// The wire form.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&Self::MAGIC);
        b[4..8].copy_from_slice(&self.pid.to_le_bytes());
        b[8..16].copy_from_slice(&self.text.start.to_le_bytes());
        b[16..24].copy_from_slice(&self.text.end.to_le_bytes());
        b
    }

    /// Reads the wire form; `None` if it is not a hello.
    pub fn decode(b: &[u8; Self::LEN]) -> Option<Hello> {
        (b[0..4] == Self::MAGIC).then(|| Hello { pid: u32_at(b, 4), text: u64_at(b, 8)..u64_at(b, 16) })
    }
}

/// A stopped call, passed to the agent of the caller's process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The system call ([`nr`]).
    pub nr: i32,
    /// The calling thread.
    pub tid: u32,
    /// Its arguments.
    pub args: [u64; 6],
}

impl Request {
    /// Bytes on the wire.
    pub const LEN: usize = 56;

    /// The wire form.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&self.nr.to_le_bytes());
        b[4..8].copy_from_slice(&self.tid.to_le_bytes());
        for (i, v) in self.args.iter().enumerate() {
            b[8 + 8 * i..16 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Reads the wire form.
    pub fn decode(b: &[u8; Self::LEN]) -> Request {
        Request { nr: u32_at(b, 0) as i32, tid: u32_at(b, 4), args: std::array::from_fn(|i| u64_at(b, 8 + 8 * i)) }
    }
}

impl From<&Notification> for Request {
    fn from(n: &Notification) -> Request {
        Request { nr: n.nr, tid: n.tid, args: n.args }
    }
}

/// The agent's answer to a [`Request`]: 0 lets the call run, else its errno.
pub fn reply(errno: i32) -> [u8; 4] {
    errno.to_le_bytes()
}

/// Reads an answer (see [`reply`]).
pub fn read_reply(b: &[u8; 4]) -> i32 {
    i32::from_le_bytes(*b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_back_as_written() {
        let h = Hello { pid: 4242, text: 0x7f00_0000_1000..0x7f00_0020_0000 };
        assert_eq!(Hello::decode(&h.encode()), Some(h));
        let mut bad = Hello { pid: 1, text: 0..1 }.encode();
        bad[0] = b'X';
        assert_eq!(Hello::decode(&bad), None);
        let r = Request { nr: nr::MREMAP, tid: 77, args: [1, 2, 3, u64::MAX, 5, 6] };
        assert_eq!(Request::decode(&r.encode()), r);
        assert_eq!(read_reply(&reply(-12)), -12);
    }
}
