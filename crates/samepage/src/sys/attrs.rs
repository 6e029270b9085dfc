//! VMA attributes of registered memory (`/proc/self/smaps` `VmFlags`,
//! `ProtectionKey`, `/proc/self/numa_maps`), and what merged memory does
//! with each.
//!
//! A merged page is a `MAP_PRIVATE` mapping of the pool made with
//! `mmap(MAP_FIXED)`: a new VMA, which inherits none of the flags the
//! program gave the anonymous memory it replaces. So for every attribute
//! the engine either puts it back on the pool mapping ([`Keep`]) or stays
//! away from the pages that have it ([`Exclusion`]):
//!
//! | attribute | smaps | merged memory |
//! |---|---|---|
//! | `MADV_DONTFORK` | `dc` | put back (`MADV_DONTFORK`): a child sees no mapping |
//! | `MADV_DONTDUMP` | `dd` | put back (`MADV_DONTDUMP`) |
//! | `MADV_HUGEPAGE` / `MADV_NOHUGEPAGE` | `hg` / `nh` | put back |
//! | `mlock` | `lo` | put back as `mlock2(MLOCK_ONFAULT)` and populated for reading: locked and resident, without the write fault a plain `mlock` of a private file mapping takes (which would copy every page) |
//! | `MADV_WIPEONFORK` | `wf` | stay away: `EINVAL` on file mappings (`mm/madvise.c`), and a child would read the pages instead of zeros |
//! | `mseal` | `sl` | stay away: sealed memory cannot be replaced |
//! | another userfaultfd | `um`/`uw`/`ui` | stay away: a VMA has one userfaultfd, and it is the program's |
//! | memory policy (`mbind`) | `numa_maps` not `default` | stay away: `mbind` on a shmem mapping sets the file's shared policy instead |
//! | protection key | `ProtectionKey` not 0 | stay away: the engine's thread would need the key's access rights |
//! | VMA name | `[anon:...]` | stay away: a file mapping cannot carry an anonymous name (`EBADF`) |

use super::addr::PageRange;
use super::SysError;
use bitflags::bitflags;

bitflags! {
    /// Attributes merged memory gets back on its pool mapping.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct Keep: u8 {
        /// `MADV_DONTFORK` (`dc`).
        const DONTFORK = 1;
        /// `MADV_DONTDUMP` (`dd`).
        const DONTDUMP = 2;
        /// `MADV_HUGEPAGE` (`hg`).
        const HUGEPAGE = 4;
        /// `MADV_NOHUGEPAGE` (`nh`).
        const NOHUGEPAGE = 8;
        /// `mlock` (`lo`).
        const LOCKED = 16;
    }
}

/// Why the engine stays away from some registered pages.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Exclusion {
    /// `MADV_WIPEONFORK` (`wf`).
    WipeOnFork,
    /// `mseal` (`sl`).
    Sealed,
    /// Registered with a userfaultfd of the program's own (`um`, `uw`, `ui`).
    OtherUserfaultfd,
    /// A memory policy other than the default (`mbind`).
    MemPolicy(String),
    /// A protection key other than 0.
    ProtectionKey(u32),
    /// An anonymous VMA name (`PR_SET_VMA_ANON_NAME`).
    Named(String),
    /// The process called `mlockall(MCL_FUTURE)` without `MCL_ONFAULT`: every
    /// new mapping is locked and populated with write faults, so a pool
    /// mapping would be copied the moment it is made.
    LockAllFuture,
}

impl std::fmt::Display for Exclusion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exclusion::WipeOnFork => f.write_str("MADV_WIPEONFORK (a file mapping cannot wipe on fork)"),
            Exclusion::Sealed => f.write_str("mseal (sealed memory cannot be replaced)"),
            Exclusion::OtherUserfaultfd => f.write_str("registered with another userfaultfd"),
            Exclusion::MemPolicy(p) => write!(f, "memory policy {p} (mbind on a pool mapping would set the pool's)"),
            Exclusion::ProtectionKey(k) => write!(f, "protection key {k}"),
            Exclusion::Named(n) => write!(f, "VMA name {n} (a pool mapping cannot carry it)"),
            Exclusion::LockAllFuture => f.write_str("mlockall(MCL_FUTURE) without MCL_ONFAULT"),
        }
    }
}

/// The attributes of one VMA (or the part of it inside the range asked for).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmaAttrs {
    /// Its pages.
    pub range: PageRange,
    /// What a pool mapping there gets back.
    pub keep: Keep,
    /// Why the engine stays away, if it does.
    pub exclusion: Option<Exclusion>,
}

/// The attributes of the VMAs inside `range`, in address order (pages no
/// VMA covers are left out). Mappings of the file with inode `own_inode`
/// (the engine's pool) carry the engine's own userfaultfd registration,
/// which is no reason to stay away.
pub fn read(range: PageRange, own_inode: u64) -> Result<Vec<VmaAttrs>, SysError> {
    let smaps = read_until("/proc/self/smaps", range.end().get())?;
    let numa = read_until("/proc/self/numa_maps", range.end().get()).unwrap_or_default();
    Ok(parse(&smaps, &numa, range, own_inode))
}

/// The start of a `/proc/self` file listing mappings in address order, up to
/// the first mapping at or past `end`: the kernel formats (and, for `smaps`,
/// walks the page tables of) only the mappings read, which matters with the
/// many mappings merged memory makes.
fn read_until(path: &'static str, end: usize) -> Result<String, SysError> {
    use std::io::BufRead;
    let f = std::fs::File::open(path)
        .map_err(|e| SysError::new(path, rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO)))?;
    let mut out = String::new();
    for line in std::io::BufReader::with_capacity(1 << 16, f).lines() {
        let Ok(line) = line else { break };
        let first = line.split_whitespace().next().unwrap_or("");
        let start = first.split_once('-').map_or(first, |(a, _)| a);
        if !first.ends_with(':') && usize::from_str_radix(start, 16).is_ok_and(|a| a >= end) {
            break;
        }
        out.push_str(&line);
        out.push('\n');
    }
    Ok(out)
}

/// [`read`] on given `smaps` and `numa_maps` texts.
pub fn parse(smaps: &str, numa_maps: &str, range: PageRange, own_inode: u64) -> Vec<VmaAttrs> {
    let (lo, hi) = (range.start().get(), range.end().get());
    let mut out = Vec::new();
    let mut cur: Option<(usize, usize, String, bool)> = None;
    let mut pkey = 0u32;
    for line in smaps.lines() {
        if let Some(m) = super::mem::MapsLine::parse(line) {
            let ours = own_inode != 0 && m.inode == own_inode;
            cur = (m.end > lo && m.start < hi).then(|| (m.start.max(lo), m.end.min(hi), m.path, ours));
            pkey = 0;
            continue;
        }
        let Some((start, end, name, ours)) = &cur else { continue };
        if let Some(v) = line.strip_prefix("ProtectionKey:") {
            pkey = v.trim().parse().unwrap_or(0);
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            let mut keep = Keep::empty();
            let mut exclusion = None;
            for f in flags.split_whitespace() {
                match f {
                    "dc" => keep |= Keep::DONTFORK,
                    "dd" => keep |= Keep::DONTDUMP,
                    "hg" => keep |= Keep::HUGEPAGE,
                    "nh" => keep |= Keep::NOHUGEPAGE,
                    "lo" => keep |= Keep::LOCKED,
                    "wf" => exclusion = Some(Exclusion::WipeOnFork),
                    "sl" => exclusion = exclusion.or(Some(Exclusion::Sealed)),
                    "um" | "uw" | "ui" if !*ours => exclusion = exclusion.or(Some(Exclusion::OtherUserfaultfd)),
                    _ => {}
                }
            }
            if exclusion.is_none() && pkey != 0 {
                exclusion = Some(Exclusion::ProtectionKey(pkey));
            }
            if exclusion.is_none() && !*ours && name.starts_with("[anon:") {
                exclusion = Some(Exclusion::Named(name.clone()));
            }
            if exclusion.is_none() {
                if let Some(p) = policy(numa_maps, *start) {
                    exclusion = Some(Exclusion::MemPolicy(p));
                }
            }
            let pages = (end - start) / crate::PAGE_SIZE;
            if let Some(r) = super::addr::PageAddr::new(*start).map(|s| PageRange::new(s, pages)) {
                out.push(VmaAttrs { range: r, keep, exclusion });
            }
            cur = None;
        }
    }
    out
}

/// The memory policy `numa_maps` gives the VMA starting at or containing
/// `addr`, if it is not the default.
fn policy(numa_maps: &str, addr: usize) -> Option<String> {
    let mut best: Option<(usize, &str)> = None;
    for line in numa_maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(start), Some(pol)) = (f.next(), f.next()) else { continue };
        let Ok(start) = usize::from_str_radix(start, 16) else { continue };
        if start <= addr && best.is_none_or(|(s, _)| start > s) {
            best = Some((start, pol));
        }
    }
    best.map(|(_, p)| p).filter(|p| *p != "default").map(str::to_string)
}

/// Whether `mlockall(MCL_FUTURE)` without `MCL_ONFAULT` is in force: a fresh
/// mapping comes out populated (locked) without being touched, which nothing
/// else does to fresh anonymous memory.
pub fn lock_all_future() -> bool {
    let Ok(m) = super::mapping::AnonMapping::new(crate::PAGE_SIZE) else { return false };
    super::mem::resident(m.range()).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::addr::PageAddr;

    const SMAPS: &str = "\
7f0000000000-7f0000004000 rw-p 00000000 00:00 0 
Size:                 16 kB
ProtectionKey:         0
VmFlags: rd wr mr mw me dc ac dd 
7f0000004000-7f0000008000 rw-p 00000000 00:00 0 
ProtectionKey:         0
VmFlags: rd wr mr mw me lo ac wf 
7f0000008000-7f000000a000 rw-p 00000000 00:00 0                          [anon:arena]
ProtectionKey:         3
VmFlags: rd wr mr mw me ac 
7f000000a000-7f000000c000 rw-p 00000000 00:00 0 
ProtectionKey:         0
VmFlags: rd wr mr mw me ac hg 
";

    #[test]
    fn flags_map_to_keep_and_exclusions_and_clip_to_the_range() {
        let range = PageRange::new(PageAddr::new(0x7f00_0000_2000).unwrap(), 10);
        let numa = "7f000000a000 bind:0 anon=2\n";
        let a = parse(SMAPS, numa, range, 0);
        assert_eq!(a.len(), 4);
        assert_eq!((a[0].range.start().get(), a[0].range.pages()), (0x7f00_0000_2000, 2), "clipped to the range");
        assert_eq!(a[0].keep, Keep::DONTFORK | Keep::DONTDUMP);
        assert_eq!(a[0].exclusion, None);
        assert_eq!(a[1].keep, Keep::LOCKED);
        assert_eq!(a[1].exclusion, Some(Exclusion::WipeOnFork));
        assert_eq!(a[2].exclusion, Some(Exclusion::ProtectionKey(3)), "a key wins over the name");
        assert_eq!(a[3].keep, Keep::HUGEPAGE);
        assert_eq!(a[3].exclusion, Some(Exclusion::MemPolicy("bind:0".into())));
    }
}
