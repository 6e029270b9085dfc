//! `samepage sysfs MOUNTPOINT`: the files of `/sys/kernel/mm/ksm` as a FUSE
//! file system backed by the daemon, so tools written for the kernel's KSM
//! (ksmtuned's shell reads and writes, node_exporter's `ksmd` collector)
//! work unchanged on samepage, for instance bind-mounted over
//! `/sys/kernel/mm/ksm` in a private mount namespace.
//!
//! Layout: `MOUNTPOINT/NAME` for each of the kernel's 24 files (the same
//! names, modes, formats: one value and a newline, `advisor_mode` as
//! `[none] scan-time`), and `MOUNTPOINT/ksm_stat/PID` for each process the
//! daemon knows, as the kernel's `/proc/PID/ksm_stat`. Reads ask the daemon
//! (`Request::Status` and `Request::Tunables`) at each open; a write is a
//! `samepage set NAME=VALUE` (`Request::Set`), refused with the daemon's
//! errno, which is the kernel's (`EINVAL` for a bad value, `EBUSY` for
//! `max_page_sharing` while pages are shared). Permissions are the kernel
//! checks on the files' modes (`default_permissions`): only their owner
//! (root when root mounts it) writes.

use anyhow::{Context, Result};
use clap::Args;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner, MountOption, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};
use samepage_daemon::client::Connection;
use samepage_daemon::protocol::{PartitionStatus, ProcessStatus};
use samepage_daemon::view;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// `samepage sysfs`.
#[derive(Args, Debug)]
pub struct SysfsArgs {
    /// The directory to mount on (e.g. a directory to bind-mount over
    /// /sys/kernel/mm/ksm, or DIR/kernel/mm/ksm for node_exporter's
    /// --path.sysfs=DIR).
    mountpoint: PathBuf,
    /// The daemon's socket [default: as `samepage daemon`].
    #[arg(long)]
    socket: Option<PathBuf>,
}

/// The kernel's files in `/sys/kernel/mm/ksm` (Linux 6.18) and whether
/// they are writable (mode 0644; the counters are 0444).
pub const FILES: [(&str, bool); 24] = [
    ("advisor_max_cpu", true),
    ("advisor_max_pages_to_scan", true),
    ("advisor_min_pages_to_scan", true),
    ("advisor_mode", true),
    ("advisor_target_scan_time", true),
    ("full_scans", false),
    ("general_profit", false),
    ("ksm_zero_pages", false),
    ("max_page_sharing", true),
    ("merge_across_nodes", true),
    ("pages_scanned", false),
    ("pages_shared", false),
    ("pages_sharing", false),
    ("pages_skipped", false),
    ("pages_to_scan", true),
    ("pages_unshared", false),
    ("pages_volatile", false),
    ("run", true),
    ("sleep_millisecs", true),
    ("smart_scan", true),
    ("stable_node_chains", false),
    ("stable_node_chains_prune_millisecs", true),
    ("stable_node_dups", false),
    ("use_zero_pages", true),
];

const ROOT: u64 = 1;
const KSM_STAT_DIR: u64 = 2;
const FIRST_FILE: u64 = 16;
/// `ksm_stat/PID` is inode `PID_BASE + PID` (pids are below 2^22).
const PID_BASE: u64 = 1 << 32;
const TTL: Duration = Duration::from_secs(1);

/// A file of the mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Node {
    Root,
    KsmStatDir,
    File(usize),
    KsmStat(i32),
}

impl Node {
    fn from_ino(ino: u64) -> Option<Node> {
        match ino {
            ROOT => Some(Node::Root),
            KSM_STAT_DIR => Some(Node::KsmStatDir),
            i if (FIRST_FILE..FIRST_FILE + FILES.len() as u64).contains(&i) => {
                Some(Node::File((i - FIRST_FILE) as usize))
            }
            i if i > PID_BASE => i32::try_from(i - PID_BASE).ok().map(Node::KsmStat),
            _ => None,
        }
    }

    fn ino(self) -> u64 {
        match self {
            Node::Root => ROOT,
            Node::KsmStatDir => KSM_STAT_DIR,
            Node::File(i) => FIRST_FILE + i as u64,
            Node::KsmStat(pid) => PID_BASE + pid as u64,
        }
    }
}

/// A process's `/proc/PID/ksm_stat`, in the kernel's names and format
/// (`ksm_mergeable: yes` once it registered mergeable memory;
/// `ksm_merge_any: no`, as the daemon is not told which processes run
/// under `samepage run --merge-any`).
pub fn ksm_stat(r: &ProcessStatus) -> String {
    format!(
        "ksm_rmap_items {}\nksm_zero_pages {}\nksm_merging_pages {}\nksm_process_profit {}\nksm_merge_any: no\nksm_mergeable: {}\n",
        r.ksm_rmap_items,
        r.ksm_zero_pages,
        r.ksm_merging_pages,
        r.ksm_process_profit,
        if r.ksm_mergeable > 0 { "yes" } else { "no" }
    )
}

/// The content of the kernel file `name`, from the daemon's state (`None`
/// for a name that is not one of [`FILES`]).
pub fn file_content(
    name: &str,
    parts: &[PartitionStatus],
    t: &samepage::Tunables,
    merge_across_nodes: u64,
) -> Option<String> {
    if !FILES.iter().any(|(n, _)| *n == name) {
        return None;
    }
    let counter =
        view::system_counters(parts).named().into_iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string());
    let v = match counter {
        Some(v) => v,
        None if name == "merge_across_nodes" => merge_across_nodes.to_string(),
        None => t.named().into_iter().find(|(n, _)| *n == name)?.1,
    };
    Some(v + "\n")
}

/// The file system.
#[derive(Debug)]
struct KsmFs {
    socket: PathBuf,
    /// Shown and accepted as the kernel does (samepage places no page by
    /// NUMA node: it changes nothing).
    merge_across_nodes: AtomicU64,
    /// What each open file handle reads: filled at its first read at
    /// offset 0, as sysfs fills its buffer.
    open: Mutex<HashMap<u64, Vec<u8>>>,
    next_fh: AtomicU64,
    uid: u32,
    gid: u32,
    started: SystemTime,
}

/// The errno a failed exchange with the daemon gives a reader or writer:
/// the daemon's refusal as it is; no daemon at the socket `ENOTCONN`
/// ("Transport endpoint is not connected"), not the socket's `ENOENT`,
/// which would say the file is missing.
fn daemon_errno(e: &samepage_daemon::client::ClientError) -> Errno {
    match e {
        samepage_daemon::client::ClientError::Connect { .. } => Errno::ENOTCONN,
        e => e.errno().map_or(Errno::EIO, Errno::from_i32),
    }
}

impl KsmFs {
    fn attr(&self, node: Node, owner: u32) -> FileAttr {
        let (kind, perm, size, nlink) = match node {
            Node::Root | Node::KsmStatDir => (FileType::Directory, 0o755, 0, 2),
            Node::File(i) => (FileType::RegularFile, if FILES[i].1 { 0o644 } else { 0o444 }, 4096, 1),
            // As /proc/PID/ksm_stat: its owner's only.
            Node::KsmStat(_) => (FileType::RegularFile, 0o400, 0, 1),
        };
        FileAttr {
            ino: INodeNo(node.ino()),
            size,
            blocks: 0,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink,
            uid: owner,
            gid: if owner == self.uid { self.gid } else { owner },
            rdev: 0,
            flags: 0,
            blksize: 4096,
        }
    }

    fn status(&self) -> Result<Vec<PartitionStatus>, Errno> {
        Connection::status(&self.socket).map_err(|e| daemon_errno(&e))
    }

    /// The process `pid` as the daemon last heard from it, and its user.
    fn process(&self, pid: i32) -> Result<Option<(ProcessStatus, u32)>, Errno> {
        Ok(self
            .status()?
            .into_iter()
            .find_map(|p| p.processes.iter().find(|r| r.pid == pid).map(|r| (r.clone(), p.uid))))
    }

    fn content(&self, node: Node) -> Result<Vec<u8>, Errno> {
        match node {
            Node::File(i) => {
                // One exchange with the daemon: a counter needs its status,
                // a tunable (the writable files) its tunables.
                let (parts, t) = if FILES[i].1 {
                    (Vec::new(), Connection::tunables(&self.socket).map_err(|e| daemon_errno(&e))?)
                } else {
                    (self.status()?, samepage::Tunables::default())
                };
                let m = self.merge_across_nodes.load(Ordering::Relaxed);
                Ok(file_content(FILES[i].0, &parts, &t, m).unwrap_or_default().into_bytes())
            }
            Node::KsmStat(pid) => match self.process(pid)? {
                Some((r, _)) => Ok(ksm_stat(&r).into_bytes()),
                None => Err(Errno::ESRCH),
            },
            Node::Root | Node::KsmStatDir => Err(Errno::EISDIR),
        }
    }

    /// A write to file `i`, as the kernel's store for it.
    fn store(&self, i: usize, data: &[u8]) -> Result<(), Errno> {
        let (name, writable) = FILES[i];
        if !writable {
            return Err(Errno::EACCES);
        }
        let value = std::str::from_utf8(data).map_err(|_| Errno::EINVAL)?.trim();
        if name == "merge_across_nodes" {
            // The kernel's merge_across_nodes_store: kstrtoul, EBUSY while pages are shared.
            let v: u64 = value.parse().map_err(|_| Errno::EINVAL)?;
            if v != self.merge_across_nodes.load(Ordering::Relaxed)
                && view::system_counters(&self.status()?).pages_shared > 0
            {
                return Err(Errno::EBUSY);
            }
            self.merge_across_nodes.store(v, Ordering::Relaxed);
            return Ok(());
        }
        Connection::set(&self.socket, name, value).map(|_| ()).map_err(|e| daemon_errno(&e))
    }
}

impl Filesystem for KsmFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.to_str().unwrap_or("");
        match Node::from_ino(parent.into()) {
            Some(Node::Root) if name == "ksm_stat" => {
                reply.entry(&TTL, &self.attr(Node::KsmStatDir, self.uid), fuser::Generation(0))
            }
            Some(Node::Root) => match FILES.iter().position(|(n, _)| *n == name) {
                Some(i) => reply.entry(&TTL, &self.attr(Node::File(i), self.uid), fuser::Generation(0)),
                None => reply.error(Errno::ENOENT),
            },
            Some(Node::KsmStatDir) => match name.parse::<i32>().ok().filter(|p| *p > 0).map(|p| (p, self.process(p))) {
                Some((pid, Ok(Some((_, uid))))) => {
                    // Processes come and go: no caching of the entry.
                    reply.entry(&Duration::ZERO, &self.attr(Node::KsmStat(pid), uid), fuser::Generation(0))
                }
                Some((_, Err(e))) => reply.error(e),
                _ => reply.error(Errno::ENOENT),
            },
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match Node::from_ino(ino.into()) {
            Some(Node::KsmStat(pid)) => match self.process(pid) {
                Ok(Some((_, uid))) => reply.attr(&Duration::ZERO, &self.attr(Node::KsmStat(pid), uid)),
                Ok(None) => reply.error(Errno::ENOENT),
                Err(e) => reply.error(e),
            },
            Some(node) => reply.attr(&TTL, &self.attr(node, self.uid)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // `echo 1 > run` truncates first: as on sysfs, that changes nothing.
        match Node::from_ino(ino.into()) {
            Some(node @ Node::File(_)) => reply.attr(&TTL, &self.attr(node, self.uid)),
            Some(_) => reply.error(Errno::EPERM),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let writes = !matches!(flags.acc_mode(), fuser::OpenAccMode::O_RDONLY);
        match Node::from_ino(ino.into()) {
            // Even root may not open a counter for writing, as on sysfs.
            Some(Node::File(i)) if writes && !FILES[i].1 => reply.error(Errno::EACCES),
            Some(Node::KsmStat(_)) if writes => reply.error(Errno::EACCES),
            Some(Node::File(_) | Node::KsmStat(_)) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                // Direct I/O: reads return what the daemon says now, whatever
                // the size stat shows (4096, as sysfs's).
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO)
            }
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(node) = Node::from_ino(ino.into()) else { return reply.error(Errno::ENOENT) };
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let key: u64 = fh.into();
        if offset == 0 || !open.contains_key(&key) {
            match self.content(node) {
                Ok(c) => {
                    open.insert(key, c);
                }
                Err(e) => return reply.error(e),
            }
        }
        let c = open.get(&key).map_or(&[][..], |c| &c[..]);
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(c.len());
        let end = start.saturating_add(size as usize).min(c.len());
        reply.data(&c[start..end]);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match Node::from_ino(ino.into()) {
            Some(Node::File(i)) => match self.store(i, data) {
                Ok(()) => reply.written(data.len() as u32),
                Err(e) => reply.error(e),
            },
            Some(_) => reply.error(Errno::EACCES),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).remove(&fh.into());
        reply.ok();
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let mut entries: Vec<(u64, FileType, String)> =
            vec![(ino.into(), FileType::Directory, ".".into()), (ROOT, FileType::Directory, "..".into())];
        match Node::from_ino(ino.into()) {
            Some(Node::Root) => {
                for (i, (name, _)) in FILES.iter().enumerate() {
                    entries.push((Node::File(i).ino(), FileType::RegularFile, name.to_string()));
                }
                entries.push((KSM_STAT_DIR, FileType::Directory, "ksm_stat".into()));
            }
            Some(Node::KsmStatDir) => {
                let parts = match self.status() {
                    Ok(p) => p,
                    Err(e) => return reply.error(e),
                };
                let mut pids: Vec<i32> = parts.iter().flat_map(|p| p.processes.iter().map(|r| r.pid)).collect();
                pids.sort_unstable();
                pids.dedup();
                for pid in pids {
                    entries.push((Node::KsmStat(pid).ino(), FileType::RegularFile, pid.to_string()));
                }
            }
            _ => return reply.error(Errno::ENOTDIR),
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }
}

/// Mounts the file system at `MOUNTPOINT` and serves it until it is
/// unmounted (`fusermount3 -u MOUNTPOINT`) or the command is killed (as
/// root the mount goes with it: `auto_unmount`).
pub fn run(a: SysfsArgs) -> Result<ExitCode> {
    let socket = a.socket.unwrap_or_else(samepage_daemon::default_socket);
    // Fail early, naming the socket, if no daemon answers.
    Connection::tunables(&socket).with_context(|| format!("asking the daemon at {}", socket.display()))?;
    let root = rustix::process::geteuid().is_root();
    let mut cfg = fuser::Config::default();
    cfg.mount_options.extend([
        MountOption::FSName("samepage".into()),
        MountOption::Subtype("samepage".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
    ]);
    if root {
        // Readable by every user, as sysfs is; unmounted when this exits.
        cfg.acl = fuser::SessionACL::All;
        cfg.mount_options.push(MountOption::AutoUnmount);
    }
    let fs = KsmFs {
        socket: socket.clone(),
        merge_across_nodes: AtomicU64::new(1),
        open: Mutex::new(HashMap::new()),
        next_fh: AtomicU64::new(1),
        uid: rustix::process::geteuid().as_raw(),
        gid: rustix::process::getegid().as_raw(),
        started: SystemTime::now(),
    };
    let session = fuser::Session::new(fs, &a.mountpoint, &cfg)
        .with_context(|| format!("mounting on {} (FUSE: is /dev/fuse there?)", a.mountpoint.display()))?;
    eprintln!(
        "samepage sysfs: /sys/kernel/mm/ksm's files at {} (ksm_stat/PID per process), from the daemon at {}",
        a.mountpoint.display(),
        socket.display()
    );
    session.run().context("serving the file system")?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_show_the_kernels_formats() {
        let t = samepage::Tunables::default();
        let none: Vec<PartitionStatus> = Vec::new();
        assert_eq!(file_content("advisor_mode", &none, &t, 1).unwrap(), "[none] scan-time\n");
        assert_eq!(file_content("run", &none, &t, 1).unwrap(), "0\n");
        assert_eq!(file_content("merge_across_nodes", &none, &t, 1).unwrap(), "1\n");
        assert_eq!(file_content("pages_sharing", &none, &t, 1).unwrap(), "0\n");
        assert!(file_content("stable_node_defrag", &none, &t, 1).is_none(), "samepage's own tunable is no kernel file");
        for (name, _) in FILES {
            assert!(file_content(name, &none, &t, 1).is_some_and(|c| c.ends_with('\n')), "{name}");
        }
        let r = ProcessStatus {
            ksm_rmap_items: 3,
            ksm_merging_pages: 2,
            ksm_process_profit: -5,
            ksm_mergeable: 4,
            ..Default::default()
        };
        assert_eq!(
            ksm_stat(&r),
            "ksm_rmap_items 3\nksm_zero_pages 0\nksm_merging_pages 2\nksm_process_profit -5\nksm_merge_any: no\nksm_mergeable: yes\n"
        );
        for ino in [ROOT, KSM_STAT_DIR, FIRST_FILE, FIRST_FILE + 23, PID_BASE + 4_194_304] {
            assert_eq!(Node::from_ino(ino).map(Node::ino), Some(ino));
        }
        assert_eq!(Node::from_ino(FIRST_FILE + 24), None);
    }

    /// The file set and modes are the kernel's, where the kernel has KSM.
    #[test]
    fn the_file_set_is_the_kernels() {
        let Ok(dir) = std::fs::read_dir("/sys/kernel/mm/ksm") else {
            eprintln!("skipped: no /sys/kernel/mm/ksm on this machine");
            return;
        };
        let mut real: Vec<(String, bool)> = dir
            .flatten()
            .map(|e| {
                use std::os::unix::fs::PermissionsExt;
                let mode = e.metadata().unwrap().permissions().mode();
                (e.file_name().to_string_lossy().into_owned(), mode & 0o200 != 0)
            })
            .collect();
        real.sort();
        let ours: Vec<(String, bool)> = FILES.iter().map(|(n, w)| (n.to_string(), *w)).collect();
        assert_eq!(ours, real);
    }
}
