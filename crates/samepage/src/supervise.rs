//! seccomp user notification for `samepage run`'s supervisor: the filter
//! that stops a program's mapping changes (glibc's internal ones included)
//! before they run, its listener, and the little wire protocol between the
//! supervisor and the agent thread the preload library runs in each
//! process.
//!
//! The protocol, over a Unix stream socket (`$SAMEPAGE_AGENT_SOCKET`):
//! the agent sends a [`Hello`] and waits for one ack byte; then, for each
//! stopped call of its process, the supervisor sends a [`Request`] and the
//! agent answers with an [`Answer`]: let the call run, fail it with an
//! errno, or return a value without running it. Numbers are little-endian.

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
    /// Names the protocol's version: "SPA2" since answers are [`Answer`]s
    /// (12 bytes), so a supervisor and a preload library of different
    /// versions refuse each other rather than fall out of step.
    const MAGIC: [u8; 4] = *b"SPA2";

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

/// The agent's answer to a [`Request`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The call runs as the program made it.
    Run,
    /// The call fails with this errno, changing nothing.
    Fail(i32),
    /// The call returns this value without running (`brk` refusing
    /// returns the break unchanged).
    Return(u64),
}

impl Answer {
    /// Bytes on the wire: a kind (`u32`: 0 run, 1 fail, 2 return), then
    /// the errno or value (`u64`).
    pub const LEN: usize = 12;

    /// `Run` for 0, else `Fail(errno)`.
    pub fn from_errno(errno: i32) -> Answer {
        if errno == 0 {
            Answer::Run
        } else {
            Answer::Fail(errno)
        }
    }

    /// The bytes on the wire.
    pub fn encode(&self) -> [u8; Answer::LEN] {
        let (kind, v): (u32, u64) = match *self {
            Answer::Run => (0, 0),
            Answer::Fail(errno) => (1, errno as u32 as u64),
            Answer::Return(v) => (2, v),
        };
        let mut b = [0u8; Answer::LEN];
        b[..4].copy_from_slice(&kind.to_le_bytes());
        b[4..].copy_from_slice(&v.to_le_bytes());
        b
    }

    /// Reads an answer; `None` for an unknown kind.
    pub fn decode(b: &[u8; Answer::LEN]) -> Option<Answer> {
        let v = u64_at(b, 4);
        match u32_at(b, 0) {
            0 => Some(Answer::Run),
            1 => Some(Answer::Fail(v as u32 as i32)),
            2 => Some(Answer::Return(v)),
            _ => None,
        }
    }
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
        for a in [Answer::Run, Answer::Fail(12), Answer::Return(0x5555_0000_1000)] {
            assert_eq!(Answer::decode(&a.encode()), Some(a));
        }
        let mut bad = Answer::Run.encode();
        bad[0] = 9;
        assert_eq!(Answer::decode(&bad), None);
    }
}
