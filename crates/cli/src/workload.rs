//! The demo's workloads: the synthetic mix, or files loaded N times.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;

/// Bytes of a page.
pub const PAGE: usize = samepage::PAGE_SIZE;
/// Pages of a transparent huge page.
pub const HUGE_SUBPAGES: usize = samepage::core::HUGE_PAGE_SUBPAGES as usize;

/// What one page holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Content {
    Zero,
    /// Generated from a seed: equal ids give equal pages.
    Gen(u64),
    /// Page `page` of file `file` (zero-padded at the end).
    File {
        file: u32,
        page: u32,
    },
}

/// Memory a workload is written into: an engine's region or a plain mapping
/// (handed to the kernel's KSM).
pub trait Mem: Sync {
    /// Copies `data` in at `off`.
    fn write(&self, off: usize, data: &[u8]);
    /// Copies bytes out from `off`.
    fn read(&self, off: usize, buf: &mut [u8]);
}

impl Mem for samepage::testing::AnonMapping {
    fn write(&self, off: usize, data: &[u8]) {
        samepage::testing::AnonMapping::write(self, off, data).expect("inside the mapping")
    }
    fn read(&self, off: usize, buf: &mut [u8]) {
        samepage::testing::AnonMapping::read(self, off, buf).expect("inside the mapping")
    }
}

impl Mem for samepage::Region {
    fn write(&self, off: usize, data: &[u8]) {
        samepage::Region::write(self, off, data).expect("inside the region")
    }
    fn read(&self, off: usize, buf: &mut [u8]) {
        samepage::Region::read(self, off, buf).expect("inside the region")
    }
}

/// A layout of page contents.
pub struct Workload {
    pub name: String,
    pub pages: Vec<Content>,
    pub files: Vec<Vec<u8>>,
}

/// Deterministic pseudo-random page content for an id.
pub fn gen_page(id: u64, out: &mut [u8; PAGE]) {
    let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    for c in out.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_ne_bytes());
    }
}

impl Workload {
    /// The synthetic mix: a quarter zero pages, half copies of `distinct`
    /// pages, a quarter unique pages, scattered.
    pub fn mix(bytes: u64, distinct: u64, seed: u64) -> Workload {
        let n = (bytes as usize).div_ceil(PAGE);
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut pages: Vec<Content> = (0..n)
            .map(|i| match i * 4 / n {
                0 => Content::Zero,
                1 | 2 => Content::Gen(rng.u64(..distinct.max(1))),
                _ => Content::Gen(distinct + i as u64),
            })
            .collect();
        rng.shuffle(&mut pages);
        Workload { name: format!("mix-{}MiB", bytes >> 20), pages, files: Vec::new() }
    }

    /// Huge pages (2 MiB, 512 subpages) for `--thp`: one in 16 (at least
    /// one) is mostly duplicate (496 of its subpages are copies of 16
    /// contents, 16 are unique); every other has one subpage that is a copy
    /// (the same content in each) and 511 unique ones.
    pub fn thp(bytes: u64, seed: u64) -> Workload {
        const SUB: u64 = HUGE_SUBPAGES as u64;
        let frames = (bytes / (SUB * PAGE as u64)).max(2);
        let dense = (frames / 16).max(1);
        let base = seed.wrapping_mul(1 << 40);
        let mut pages = Vec::with_capacity((frames * SUB) as usize);
        for f in 0..frames {
            for j in 0..SUB {
                let unique = Content::Gen(base + (1 << 32) + f * SUB + j);
                pages.push(if f < dense {
                    if j % 32 == 31 {
                        unique
                    } else {
                        Content::Gen(base + j % 16)
                    }
                } else if j == 7 {
                    Content::Gen(base + 100)
                } else {
                    unique
                });
            }
        }
        Workload {
            name: format!("thp-{}MiB ({dense} of {frames} huge pages mostly duplicate)", bytes >> 20),
            pages,
            files: Vec::new(),
        }
    }

    /// Each file loaded page-aligned, its last page zero-padded, `copies` times.
    pub fn files(paths: &[PathBuf], copies: u32) -> Result<Workload> {
        if copies == 0 {
            bail!("--copies 0: must be at least 1");
        }
        let mut files = Vec::new();
        for p in paths {
            let data = std::fs::read(p).with_context(|| format!("cannot read --files {}", p.display()))?;
            files.push(data);
        }
        let mut pages = Vec::new();
        for _ in 0..copies {
            for (f, data) in files.iter().enumerate() {
                for pg in 0..data.len().div_ceil(PAGE) {
                    pages.push(Content::File { file: f as u32, page: pg as u32 });
                }
            }
        }
        if pages.is_empty() {
            bail!("--files: the files are empty, nothing to load");
        }
        Ok(Workload { name: format!("files x{copies}"), pages, files })
    }

    /// Bytes of memory the workload fills.
    pub fn bytes(&self) -> u64 {
        (self.pages.len() * PAGE) as u64
    }

    /// Writes every page into `m`, from its start.
    pub fn write_into(&self, m: &dyn Mem) {
        let mut buf = [0u8; PAGE];
        for i in 0..self.pages.len() {
            self.page(i, &mut buf);
            m.write(i * PAGE, &buf);
        }
    }

    /// Pages of `m` that differ from the workload, byte for byte; `edit`
    /// applies the caller's own later writes to the expected content of page `i`.
    pub fn mismatches(&self, m: &dyn Mem, edit: impl Fn(usize, &mut [u8; PAGE])) -> u64 {
        let (mut want, mut got) = ([0u8; PAGE], [0u8; PAGE]);
        let mut bad = 0;
        for i in 0..self.pages.len() {
            self.page(i, &mut want);
            edit(i, &mut want);
            m.read(i * PAGE, &mut got);
            bad += u64::from(want != got);
        }
        bad
    }

    /// The content of page `i`.
    pub fn page(&self, i: usize, out: &mut [u8; PAGE]) {
        match self.pages[i] {
            Content::Zero => out.fill(0),
            Content::Gen(id) => gen_page(id, out),
            Content::File { file, page } => {
                let data = &self.files[file as usize];
                let start = page as usize * PAGE;
                let end = (start + PAGE).min(data.len());
                out[..end - start].copy_from_slice(&data[start..end]);
                out[end - start..].fill(0);
            }
        }
    }

    /// What the content implies with `max_page_sharing` and `use_zero_pages`:
    /// `(pages_shared, pages_sharing, ksm_zero_pages)` once fully merged, as
    /// the kernel's chains reach it (a remainder of one copy stays unshared).
    /// A `max_page_sharing` below 2 is a usage error, as the kernel's EINVAL.
    pub fn expected(&self, max_page_sharing: u64, use_zero_pages: bool) -> Result<(u64, u64, u64)> {
        // The rule lives in samepage_core::estimate (one home for it).
        let rule = samepage::core::estimate::SharingRule::new(max_page_sharing, use_zero_pages)
            .map_err(|e| crate::args::UsageError(format!("--max-page-sharing: {e}")))?;
        let mut census = samepage::core::estimate::Census::new();
        let mut buf = [0u8; PAGE];
        for i in 0..self.pages.len() {
            self.page(i, &mut buf);
            census.add(0, samepage::core::page_hash(&buf), 1);
        }
        let c = census.estimate(rule).counters;
        Ok((c.pages_shared, c.pages_sharing, c.ksm_zero_pages))
    }
}
