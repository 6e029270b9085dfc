//! `samepage run --merge-any`'s supervisor: the program's parent, holding
//! the seccomp listener (see `samepage::supervise`).
//!
//! Every mapping change the filter stops (glibc's internal `munmap`,
//! `mremap`, `mprotect`, `brk`, `mmap(MAP_FIXED)` and discarding `madvise`
//! included) comes here with the calling thread's id and arguments. If the
//! calling process has an agent (the preload library's `samepage-agent`
//! thread, connected to `$SAMEPAGE_AGENT_SOCKET`), the agent first takes the
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
use samepage::supervise::{Answer, Hello, Listener, Notification, Request};
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};

/// A process's agent, after its hello.
struct Agent {
    stream: UnixStream,
    /// The preload library's code in that process. A backstop: the
    /// library's own calls go through `libc::syscall` with the run's tag
    /// (`own_syscall`), so they are not stopped; a stopped call made from
    /// this code would be an untagged one added later, and is let through
    /// rather than sent to an agent that may be the caller.
    text: std::ops::Range<u64>,
    /// Its stopped calls; the first one is with the agent.
    queue: VecDeque<Notification>,
    /// Bytes of an answer read so far.
    buf: Vec<u8>,
}

/// A connection that has not said hello yet, and what it sent so far.
struct Pending {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// What the supervisor did, for `--verbose` and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    /// Calls passed to an agent first.
    pub forwarded: u64,
    /// Calls the agent refused (the program saw the errno, or `brk` its
    /// break unchanged).
    pub failed: u64,
    /// Calls made by the engine itself (its code or its threads), let through.
    pub engine: u64,
    /// Calls of processes without an agent, let through.
    pub unattended: u64,
    /// Calls stopped, by system call: munmap, mremap, mprotect, brk, mmap, madvise.
    pub by_call: [u64; 6],
}

impl Tally {
    /// Calls stopped by the filter.
    pub fn notified(&self) -> u64 {
        self.by_call.iter().sum()
    }

    fn count_call(&mut self, nr: i32) {
        use samepage::supervise::nr;
        let i = match nr {
            nr::MUNMAP => 0,
            nr::MREMAP => 1,
            nr::MPROTECT => 2,
            nr::BRK => 3,
            nr::MMAP => 4,
            _ => 5,
        };
        self.by_call[i] += 1;
    }
}

struct Supervisor {
    listener: Listener,
    agents_socket: UnixListener,
    agents: HashMap<u32, Agent>,
    pending: Vec<Pending>,
    /// tid -> (process, whether it is an engine thread).
    tids: HashMap<u32, (u32, bool)>,
    tally: Tally,
}

/// Reads what is there into `buf`; false at end of stream or on error.
fn fill(stream: &mut UnixStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 64];
    match stream.read(&mut chunk) {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

fn tid_info(tid: u32) -> Option<(u32, bool)> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    let tgid = status.lines().find_map(|l| l.strip_prefix("Tgid:"))?.trim().parse().ok()?;
    let comm = status.lines().find_map(|l| l.strip_prefix("Name:")).unwrap_or("").trim();
    Some((tgid, comm.starts_with("samepage-")))
}

impl Supervisor {
    fn notified(&mut self, n: Notification) {
        self.tally.count_call(n.nr);
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
            self.tally.unattended += 1;
            let _ = self.listener.allow(n.id);
            return;
        };
        match self.agents.get_mut(&pid) {
            Some(a) if !(engine || a.text.contains(&n.ip)) => {
                self.tally.forwarded += 1;
                a.queue.push_back(n);
                if a.queue.len() == 1 {
                    Self::send_first(a);
                }
            }
            Some(_) => {
                self.tally.engine += 1;
                let _ = self.listener.allow(n.id);
            }
            None => {
                self.tally.unattended += 1;
                let _ = self.listener.allow(n.id);
            }
        }
    }

    /// Passes the first queued call to the agent (a dead agent is seen by
    /// `poll`, and its calls then run).
    fn send_first(a: &mut Agent) {
        if let Some(n) = a.queue.front() {
            let _ = a.stream.write_all(&Request::from(n).encode());
        }
    }

    /// Reads an agent's answers; false when it is gone.
    fn answers(listener: &Listener, a: &mut Agent, tally: &mut Tally) -> bool {
        if !fill(&mut a.stream, &mut a.buf) {
            return false;
        }
        while a.buf.len() >= Answer::LEN {
            let bytes: [u8; Answer::LEN] = a.buf[..Answer::LEN].try_into().expect("LEN bytes");
            a.buf.drain(..Answer::LEN);
            if let Some(n) = a.queue.pop_front() {
                // An answer this supervisor cannot read lets the call run,
                // as a dead agent's calls do.
                match Answer::decode(&bytes).unwrap_or(Answer::Run) {
                    Answer::Run => {
                        let _ = listener.allow(n.id);
                    }
                    Answer::Fail(errno) => {
                        tally.failed += 1;
                        let _ = listener.fail(n.id, errno);
                    }
                    Answer::Return(v) => {
                        tally.failed += 1;
                        let _ = listener.skip(n.id, v);
                    }
                }
            }
            Self::send_first(a);
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
                    self.pending.push(Pending { stream, buf: Vec::new() });
                }
            }
            for (p, ready) in pids.iter().zip(agent_in) {
                if ready {
                    let a = self.agents.get_mut(p).expect("listed");
                    if !Self::answers(&self.listener, a, &mut self.tally) {
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
            // Hellos: from then on the process's calls go to its agent.
            let mut i = 0;
            for ready in pending_in {
                if !ready {
                    i += 1;
                    continue;
                }
                let p = &mut self.pending[i];
                if !fill(&mut p.stream, &mut p.buf) {
                    self.pending.remove(i);
                    continue;
                }
                if p.buf.len() < Hello::LEN {
                    i += 1;
                    continue;
                }
                let mut p = self.pending.remove(i);
                let hello = p.buf[..Hello::LEN].try_into().ok().and_then(Hello::decode);
                // The ack. (A new agent of the same pid, after an exec,
                // replaces the old one, whose connection died with the old
                // image.)
                if let Some(h) = hello.filter(|_| p.stream.write_all(&[1]).is_ok()) {
                    self.tids.retain(|_, (pid, _)| *pid != h.pid);
                    let a = Agent { stream: p.stream, text: h.text, queue: VecDeque::new(), buf: Vec::new() };
                    if let Some(old) = self.agents.insert(h.pid, a) {
                        for n in old.queue {
                            let _ = self.listener.allow(n.id);
                        }
                    }
                }
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
