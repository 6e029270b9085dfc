//! `samepage run --merge-any`'s supervisor: the program's parent, holding
//! the seccomp listener (see `samepage::supervise`).
//!
//! Every mapping change the filter stops (glibc's internal `munmap`,
//! `mremap`, `mprotect`, `brk`, `mmap(MAP_FIXED)` and discarding `madvise`
//! included) comes here with the calling thread's id and arguments. If the
//! calling process has an agent (the preload library's `samepage-agent`
//! thread, connected to [`AGENT_SOCKET_ENV`]), the agent first takes the
//! range back from its engine (merged pages private again, content intact;
//! discarded ones zeroed), then the call runs; without an agent (a process
//! that has registered nothing yet) it runs at once. Calls made by the
//! engine itself (from the preload library's code, or by one of its
//! `samepage-*` threads) run at once too: they are how the engine changes
//! the program's mappings, under its own locks.
//!
//! Each process's calls are served in order, one at a time; the processes
//! are independent. The supervisor exits when no task is left under the
//! filter (the listener hangs up), with the program's exit status.

use anyhow::{Context, Result};
use rustix::event::{poll, PollFd, PollFlags};
use samepage::supervise::{Listener, Notification};
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};

/// The environment variable naming the agents' socket.
pub const AGENT_SOCKET_ENV: &str = "SAMEPAGE_AGENT_SOCKET";

/// Bytes of an agent's hello: magic, pid, the preload library's text range.
const HELLO: usize = 24;
/// Bytes of a request: number, calling thread, six arguments.
const REQUEST: usize = 56;

struct Agent {
    stream: UnixStream,
    text: (u64, u64),
    queue: VecDeque<Notification>,
    busy: bool,
    /// Bytes of a hello or reply read so far.
    buf: Vec<u8>,
    hello: bool,
    pid: u32,
}

/// What the supervisor did, for `--verbose` and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    /// Calls stopped by the filter.
    pub notified: u64,
    /// Calls passed to an agent first.
    pub forwarded: u64,
    /// Calls the agent failed (the program saw the errno).
    pub failed: u64,
}

struct Supervisor {
    listener: Listener,
    agents_socket: UnixListener,
    agents: HashMap<u32, Agent>,
    /// Connections that have not said hello yet.
    pending: Vec<Agent>,
    /// tid -> (process, whether it is an engine thread).
    tids: HashMap<u32, (u32, bool)>,
    tally: Tally,
}

fn tid_info(tid: u32) -> Option<(u32, bool)> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    let tgid = status.lines().find_map(|l| l.strip_prefix("Tgid:"))?.trim().parse().ok()?;
    let comm = status.lines().find_map(|l| l.strip_prefix("Name:")).unwrap_or("").trim();
    Some((tgid, comm.starts_with("samepage-")))
}

impl Supervisor {
    fn notified(&mut self, n: Notification) {
        self.tally.notified += 1;
        let info = match self.tids.get(&n.tid) {
            Some(i) => Some(*i),
            None => {
                let i = tid_info(n.tid);
                if let Some(i) = i {
                    if self.tids.len() > 1 << 16 {
                        self.tids.clear();
                    }
                    self.tids.insert(n.tid, i);
                }
                i
            }
        };
        let Some((pid, engine)) = info else {
            let _ = self.listener.allow(n.id);
            return;
        };
        match self.agents.get_mut(&pid) {
            Some(a) if !(engine || (a.text.0..a.text.1).contains(&n.ip)) => {
                self.tally.forwarded += 1;
                a.queue.push_back(n);
                if !a.busy {
                    Self::send_next(a);
                }
            }
            _ => {
                let _ = self.listener.allow(n.id);
            }
        }
    }

    fn send_next(a: &mut Agent) {
        let Some(n) = a.queue.front() else { return };
        let mut req = [0u8; REQUEST];
        req[0..4].copy_from_slice(&n.nr.to_le_bytes());
        req[4..8].copy_from_slice(&n.tid.to_le_bytes());
        for (i, v) in n.args.iter().enumerate() {
            req[8 + 8 * i..16 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        a.busy = a.stream.write_all(&req).is_ok();
    }

    /// Reads what an agent sent; false when it is gone.
    fn agent_readable(listener: &Listener, a: &mut Agent, tally: &mut Tally) -> bool {
        let mut chunk = [0u8; 64];
        let n = match a.stream.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        a.buf.extend_from_slice(&chunk[..n]);
        if !a.hello {
            if a.buf.len() >= HELLO {
                a.pid = u32::from_le_bytes(a.buf[4..8].try_into().expect("4 bytes"));
                a.text = (
                    u64::from_le_bytes(a.buf[8..16].try_into().expect("8 bytes")),
                    u64::from_le_bytes(a.buf[16..24].try_into().expect("8 bytes")),
                );
                a.buf.drain(..HELLO);
                a.hello = true;
            }
            return true;
        }
        while a.buf.len() >= 4 {
            let errno = i32::from_le_bytes(a.buf[..4].try_into().expect("4 bytes"));
            a.buf.drain(..4);
            if let Some(n) = a.queue.pop_front() {
                if errno == 0 {
                    let _ = listener.allow(n.id);
                } else {
                    tally.failed += 1;
                    let _ = listener.fail(n.id, errno);
                }
            }
            a.busy = false;
            Self::send_next(a);
        }
        true
    }

    fn run(&mut self) -> Result<()> {
        loop {
            let pids: Vec<u32> = self.agents.keys().copied().collect();
            let (hup, listen_in, accept_in, agent_in, pending_in) = {
                let lfd = self.listener.fd();
                let mut fds = vec![PollFd::new(&lfd, PollFlags::IN), PollFd::new(&self.agents_socket, PollFlags::IN)];
                for p in &pids {
                    fds.push(PollFd::new(&self.agents[p].stream, PollFlags::IN));
                }
                for a in &self.pending {
                    fds.push(PollFd::new(&a.stream, PollFlags::IN));
                }
                match poll(&mut fds, None) {
                    Ok(_) => {}
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(e).context("poll"),
                }
                let r: Vec<PollFlags> = fds.iter().map(|f| f.revents()).collect();
                (
                    r[0].intersects(PollFlags::HUP | PollFlags::ERR) && !r[0].contains(PollFlags::IN),
                    r[0].contains(PollFlags::IN),
                    !r[1].is_empty(),
                    r[2..2 + pids.len()].iter().map(|f| !f.is_empty()).collect::<Vec<_>>(),
                    r[2 + pids.len()..].iter().map(|f| !f.is_empty()).collect::<Vec<_>>(),
                )
            };
            if listen_in {
                match self.listener.recv() {
                    Ok(n) => self.notified(n),
                    Err(e) if e.errno == rustix::io::Errno::NOENT || e.errno == rustix::io::Errno::INTR => {}
                    Err(e) => return Err(e).context("receiving a stopped call"),
                }
            } else if hup {
                return Ok(());
            }
            if accept_in {
                if let Ok((stream, _)) = self.agents_socket.accept() {
                    self.pending.push(Agent {
                        stream,
                        text: (0, 0),
                        queue: VecDeque::new(),
                        busy: false,
                        buf: Vec::new(),
                        hello: false,
                        pid: 0,
                    });
                }
            }
            for (p, ready) in pids.iter().zip(agent_in) {
                if ready {
                    let a = self.agents.get_mut(p).expect("listed");
                    if !Self::agent_readable(&self.listener, a, &mut self.tally) {
                        // Gone (the process exited or exec'd): its waiting
                        // calls run; it has nothing registered any more.
                        let a = self.agents.remove(p).expect("listed");
                        for n in a.queue {
                            let _ = self.listener.allow(n.id);
                        }
                        self.tids.retain(|_, (pid, _)| pid != p);
                    }
                }
            }
            let mut i = 0;
            let mut ready = pending_in.into_iter();
            while i < self.pending.len() {
                if !ready.next().unwrap_or(false) {
                    i += 1;
                    continue;
                }
                let a = &mut self.pending[i];
                if !Self::agent_readable(&self.listener, a, &mut self.tally) {
                    self.pending.remove(i);
                    continue;
                }
                if a.hello {
                    let mut a = self.pending.remove(i);
                    // Its ack: from now on its calls come to it. (A new
                    // agent of the same pid, after an exec, replaces the
                    // old one, whose connection died with the old image.)
                    if a.stream.write_all(&[1]).is_ok() {
                        self.tids.retain(|_, (pid, _)| *pid != a.pid);
                        if let Some(old) = self.agents.insert(a.pid, a) {
                            for n in old.queue {
                                let _ = self.listener.allow(n.id);
                            }
                        }
                    }
                    continue;
                }
                i += 1;
            }
        }
    }
}

/// Serves the listener until no task is left under the filter.
pub fn serve(listener: Listener, agents_socket: UnixListener) -> Result<Tally> {
    let mut s = Supervisor {
        listener,
        agents_socket,
        agents: HashMap::new(),
        pending: Vec::new(),
        tids: HashMap::new(),
        tally: Tally::default(),
    };
    s.run()?;
    Ok(s.tally)
}
