//! The tunables, with the kernel's sysfs names, defaults and validation
//! (`/sys/kernel/mm/ksm/*`, `mm/ksm.c`).

use thiserror::Error;

/// `run`: what the scanner does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Run {
    /// 0: stop scanning, keep merged pages merged.
    #[default]
    Stop,
    /// 1: scan and merge.
    Merge,
    /// 2: stop scanning and unmerge every merged page (zero pages included).
    Unmerge,
}

impl Run {
    /// The sysfs value (0, 1 or 2).
    pub fn as_u32(self) -> u32 {
        match self {
            Run::Stop => 0,
            Run::Merge => 1,
            Run::Unmerge => 2,
        }
    }

    /// Parses a sysfs value; anything but 0, 1 or 2 is refused as the kernel does.
    pub fn from_u32(v: u32) -> Result<Run, TunableError> {
        match v {
            0 => Ok(Run::Stop),
            1 => Ok(Run::Merge),
            2 => Ok(Run::Unmerge),
            _ => Err(TunableError::OutOfRange {
                name: "run",
                value: v.to_string(),
                allowed: "0 (stop), 1 (merge) or 2 (unmerge)",
            }),
        }
    }
}

/// `advisor_mode`: who sets `pages_to_scan`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum AdvisorMode {
    /// `none`: the user does (the default).
    #[default]
    None,
    /// `scan-time`: the scan-time advisor, after every full scan.
    ScanTime,
}

/// A tunable value the kernel would refuse.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TunableError {
    /// The value is outside the range the kernel accepts.
    #[error("{name} = {value} is out of range: allowed {allowed}")]
    OutOfRange {
        /// Tunable name (sysfs spelling).
        name: &'static str,
        /// The refused value.
        value: String,
        /// The accepted range.
        allowed: &'static str,
    },
    /// The value is not a number (or boolean) of the tunable's type.
    #[error("{name} = {value:?} is not valid: expected {allowed}")]
    Parse {
        /// Tunable name.
        name: &'static str,
        /// The refused text.
        value: String,
        /// What is expected.
        allowed: &'static str,
    },
    /// No tunable of that name.
    #[error("no tunable named {0:?}")]
    Unknown(String),
    /// Refused in the current state (the kernel's EINVAL for `pages_to_scan`
    /// while the advisor is on).
    #[error("{name} cannot be set now: {why}")]
    Refused {
        /// Tunable name.
        name: &'static str,
        /// Why.
        why: &'static str,
    },
    /// The kernel's EBUSY: `max_page_sharing` cannot change while pages are shared.
    #[error("max_page_sharing cannot change while {pages_shared} stable pages are shared (the kernel answers EBUSY); set run=2 first")]
    Busy {
        /// Stable pages that still have mappings.
        pages_shared: u64,
    },
}

impl TunableError {
    /// The errno the kernel's sysfs store answers with: `EBUSY` for
    /// `max_page_sharing` while pages are shared, `EINVAL` for everything else
    /// (`ENOENT` for a name that does not exist, as a missing sysfs file).
    pub fn errno(&self) -> i32 {
        match self {
            TunableError::Busy { .. } => 16,
            TunableError::Unknown(_) => 2,
            _ => 22,
        }
    }
}

/// The tunables of one engine. Field names are the kernel's sysfs names.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Tunables {
    /// `run`: 0 stop, 1 merge, 2 unmerge (default 0, as the kernel's).
    pub run: Run,
    /// `pages_to_scan`: pages scanned per batch (default 100; any u32).
    pub pages_to_scan: u32,
    /// `sleep_millisecs`: sleep between batches (default 20; any u32).
    pub sleep_millisecs: u32,
    /// `max_page_sharing`: most mappings one stable page may have (default 256, at least 2).
    pub max_page_sharing: u32,
    /// `use_zero_pages`: merge empty pages with the kernel's zero page (default false).
    pub use_zero_pages: bool,
    /// `stable_node_chains_prune_millisecs`: how often stale dups are pruned (default 2000).
    pub stable_node_chains_prune_millisecs: u32,
    /// `smart_scan`: skip pages that keep failing to merge, for a growing
    /// number of scans (default true, as since Linux 6.7).
    pub smart_scan: bool,
    /// `stable_node_defrag` (samepage's own; the kernel documents it as future
    /// work): at every prune, refile the mappings of sparse dups into dups
    /// with room so each chain keeps `ceil(mappings / max_page_sharing)` dups
    /// (default true).
    pub stable_node_defrag: bool,
    /// `thp_split_min_subpages` (samepage's own, after a threshold discussed
    /// on LKML in June 2011 and never built): a transparent huge page is split to merge its
    /// subpages only once at least this many of its 512 subpages would merge
    /// (zero subpages counted under `use_zero_pages`). 1 (the default) is the
    /// kernel's behaviour: any one subpage splits it. 1 to 512.
    pub thp_split_min_subpages: u32,
    /// `advisor_mode`: `none` (default) or `scan-time`.
    pub advisor_mode: AdvisorMode,
    /// `advisor_max_cpu`: most CPU percent the advisor lets a scan use (default 70).
    pub advisor_max_cpu: u32,
    /// `advisor_target_scan_time`: seconds a full scan should take (default 200, at least 1).
    pub advisor_target_scan_time: u64,
    /// `advisor_min_pages_to_scan`: where the advisor starts (default 500).
    pub advisor_min_pages_to_scan: u32,
    /// `advisor_max_pages_to_scan`: the advisor's cap (default 30000).
    pub advisor_max_pages_to_scan: u32,
}

impl Default for Tunables {
    fn default() -> Self {
        Tunables {
            run: Run::Stop,
            pages_to_scan: 100,
            sleep_millisecs: 20,
            max_page_sharing: 256,
            use_zero_pages: false,
            stable_node_chains_prune_millisecs: 2000,
            smart_scan: true,
            stable_node_defrag: true,
            thp_split_min_subpages: 1,
            advisor_mode: AdvisorMode::None,
            advisor_max_cpu: 70,
            advisor_target_scan_time: 200,
            advisor_min_pages_to_scan: 500,
            advisor_max_pages_to_scan: 30000,
        }
    }
}

/// `max_page_sharing`'s lower bound (the kernel's: a stable page needs two sharers).
pub const MIN_MAX_PAGE_SHARING: u32 = 2;
/// `max_page_sharing`'s upper bound (the kernel parses it as an `int`).
pub const MAX_MAX_PAGE_SHARING: u32 = i32::MAX as u32;

impl Tunables {
    /// Checks every value as the kernel's sysfs stores do.
    pub fn validate(&self) -> Result<(), TunableError> {
        if !(MIN_MAX_PAGE_SHARING..=MAX_MAX_PAGE_SHARING).contains(&self.max_page_sharing) {
            return Err(TunableError::OutOfRange {
                name: "max_page_sharing",
                value: self.max_page_sharing.to_string(),
                allowed: "2 to 2147483647",
            });
        }
        if !(1..=512).contains(&self.thp_split_min_subpages) {
            return Err(TunableError::OutOfRange {
                name: "thp_split_min_subpages",
                value: self.thp_split_min_subpages.to_string(),
                allowed: "1 to 512 (subpages of a 2 MiB huge page)",
            });
        }
        if !(1..=100).contains(&self.advisor_max_cpu) {
            return Err(TunableError::OutOfRange {
                name: "advisor_max_cpu",
                value: self.advisor_max_cpu.to_string(),
                allowed: "1 to 100 (percent)",
            });
        }
        if self.advisor_target_scan_time < 1 {
            return Err(TunableError::OutOfRange {
                name: "advisor_target_scan_time",
                value: self.advisor_target_scan_time.to_string(),
                allowed: "at least 1 (seconds)",
            });
        }
        Ok(())
    }

    /// Every tunable by its sysfs name, with the value as the kernel's
    /// sysfs file shows it (`advisor_mode` as `[none] scan-time`).
    pub fn named(&self) -> Vec<(&'static str, String)> {
        let b = |v: bool| u32::from(v).to_string();
        let mode = match self.advisor_mode {
            AdvisorMode::None => "[none] scan-time",
            AdvisorMode::ScanTime => "none [scan-time]",
        };
        vec![
            ("run", self.run.as_u32().to_string()),
            ("pages_to_scan", self.pages_to_scan.to_string()),
            ("sleep_millisecs", self.sleep_millisecs.to_string()),
            ("max_page_sharing", self.max_page_sharing.to_string()),
            ("use_zero_pages", b(self.use_zero_pages)),
            ("stable_node_chains_prune_millisecs", self.stable_node_chains_prune_millisecs.to_string()),
            ("smart_scan", b(self.smart_scan)),
            ("stable_node_defrag", b(self.stable_node_defrag)),
            ("thp_split_min_subpages", self.thp_split_min_subpages.to_string()),
            ("advisor_mode", mode.to_string()),
            ("advisor_max_cpu", self.advisor_max_cpu.to_string()),
            ("advisor_target_scan_time", self.advisor_target_scan_time.to_string()),
            ("advisor_min_pages_to_scan", self.advisor_min_pages_to_scan.to_string()),
            ("advisor_max_pages_to_scan", self.advisor_max_pages_to_scan.to_string()),
        ]
    }

    /// Sets one tunable from its sysfs text, validated as the kernel does.
    /// `max_page_sharing` changes are subject to [`TunableError::Busy`] at the engine.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), TunableError> {
        let v = value.trim();
        let mut next = self.clone();
        match name {
            "run" => next.run = Run::from_u32(parse_u32("run", v)?)?,
            "pages_to_scan" => {
                if self.advisor_mode != AdvisorMode::None {
                    return Err(TunableError::Refused {
                        name: "pages_to_scan",
                        why: "advisor_mode is scan-time: the advisor sets it (set advisor_mode=none first)",
                    });
                }
                next.pages_to_scan = parse_u32("pages_to_scan", v)?
            }
            "advisor_mode" => {
                next.advisor_mode = match v {
                    "none" => AdvisorMode::None,
                    "scan-time" => AdvisorMode::ScanTime,
                    _ => {
                        return Err(TunableError::Parse {
                            name: "advisor_mode",
                            value: v.to_string(),
                            allowed: "none or scan-time",
                        })
                    }
                };
                if next.advisor_mode != self.advisor_mode {
                    // The kernel's set_advisor_defaults().
                    next.pages_to_scan = match next.advisor_mode {
                        AdvisorMode::None => 100,
                        AdvisorMode::ScanTime => next.advisor_min_pages_to_scan,
                    };
                }
            }
            "advisor_max_cpu" => next.advisor_max_cpu = parse_u32("advisor_max_cpu", v)?,
            "advisor_target_scan_time" => {
                next.advisor_target_scan_time = parse_u32("advisor_target_scan_time", v)? as u64
            }
            "advisor_min_pages_to_scan" => next.advisor_min_pages_to_scan = parse_u32("advisor_min_pages_to_scan", v)?,
            "advisor_max_pages_to_scan" => next.advisor_max_pages_to_scan = parse_u32("advisor_max_pages_to_scan", v)?,
            "sleep_millisecs" => next.sleep_millisecs = parse_u32("sleep_millisecs", v)?,
            "max_page_sharing" => {
                let n: i64 = v.parse().map_err(|_| TunableError::Parse {
                    name: "max_page_sharing",
                    value: v.to_string(),
                    allowed: "an integer from 2 to 2147483647",
                })?;
                if !(MIN_MAX_PAGE_SHARING as i64..=MAX_MAX_PAGE_SHARING as i64).contains(&n) {
                    return Err(TunableError::OutOfRange {
                        name: "max_page_sharing",
                        value: v.to_string(),
                        allowed: "2 to 2147483647",
                    });
                }
                next.max_page_sharing = n as u32;
            }
            "use_zero_pages" => next.use_zero_pages = parse_bool("use_zero_pages", v)?,
            "smart_scan" => next.smart_scan = parse_bool("smart_scan", v)?,
            "stable_node_defrag" => next.stable_node_defrag = parse_bool("stable_node_defrag", v)?,
            "thp_split_min_subpages" => next.thp_split_min_subpages = parse_u32("thp_split_min_subpages", v)?,
            "stable_node_chains_prune_millisecs" => {
                next.stable_node_chains_prune_millisecs = parse_u32("stable_node_chains_prune_millisecs", v)?
            }
            other => return Err(TunableError::Unknown(other.to_string())),
        }
        next.validate()?;
        *self = next;
        Ok(())
    }
}

fn parse_u32(name: &'static str, v: &str) -> Result<u32, TunableError> {
    v.parse::<u32>().map_err(|_| TunableError::Parse {
        name,
        value: v.to_string(),
        allowed: "an unsigned integer from 0 to 4294967295",
    })
}

/// The kernel's `kstrtobool`: 1/0, y/n, yes/no (first letter), on/off.
fn parse_bool(name: &'static str, v: &str) -> Result<bool, TunableError> {
    let lower = v.to_ascii_lowercase();
    match lower.as_str() {
        "1" | "y" | "yes" | "on" | "true" => Ok(true),
        "0" | "n" | "no" | "off" | "false" => Ok(false),
        _ => Err(TunableError::Parse { name, value: v.to_string(), allowed: "a boolean (0/1, y/n, on/off)" }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_kernels() {
        let t = Tunables::default();
        assert_eq!(t.run, Run::Stop);
        assert_eq!(t.pages_to_scan, 100);
        assert_eq!(t.sleep_millisecs, 20);
        assert_eq!(t.max_page_sharing, 256);
        assert!(!t.use_zero_pages);
        assert_eq!(t.stable_node_chains_prune_millisecs, 2000);
        t.validate().unwrap();
    }

    #[test]
    fn refuses_what_the_kernel_refuses() {
        let mut t = Tunables::default();
        let e = t.set("max_page_sharing", "1").unwrap_err();
        assert!(e.to_string().contains("max_page_sharing = 1"), "{e}");
        assert!(e.to_string().contains("2 to 2147483647"), "{e}");
        assert!(t.set("run", "3").unwrap_err().to_string().contains("run = 3"));
        assert!(t.set("pages_to_scan", "-1").is_err());
        assert!(t.set("sleep_millisecs", "x").is_err());
        assert!(t.set("use_zero_pages", "maybe").is_err());
        assert!(matches!(t.set("nope", "1"), Err(TunableError::Unknown(_))));
        assert_eq!(t, Tunables::default(), "a refused value changes nothing");
        t.set("max_page_sharing", "2").unwrap();
        t.set("use_zero_pages", "y").unwrap();
        t.set("run", "2").unwrap();
        assert_eq!((t.max_page_sharing, t.use_zero_pages, t.run), (2, true, Run::Unmerge));
    }

    #[test]
    fn every_named_value_reads_back() {
        let t = Tunables { run: Run::Merge, use_zero_pages: true, max_page_sharing: 7, ..Tunables::default() };
        let mut u = Tunables::default();
        for (name, value) in t.named() {
            let value = if name == "advisor_mode" { "none".to_string() } else { value };
            u.set(name, &value).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert_eq!(u, t);
    }

    #[test]
    fn the_advisor_owns_pages_to_scan_while_on() {
        let mut t = Tunables::default();
        t.set("advisor_mode", "scan-time").unwrap();
        assert_eq!(t.pages_to_scan, 500, "starts at advisor_min_pages_to_scan");
        let e = t.set("pages_to_scan", "1000").unwrap_err();
        assert!(matches!(e, TunableError::Refused { name: "pages_to_scan", .. }), "{e}");
        assert!(t.set("advisor_max_cpu", "0").is_err());
        assert!(t.set("advisor_target_scan_time", "0").is_err());
        assert!(t.set("advisor_mode", "fast").is_err());
        t.set("advisor_mode", "none").unwrap();
        assert_eq!(t.pages_to_scan, 100);
        t.set("pages_to_scan", "1000").unwrap();
    }
}
