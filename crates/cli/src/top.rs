//! `samepage top`: a live terminal view of the daemon's savings, cost and
//! rates, system-wide, per partition and per process, with sparklines of
//! the last samples; the kernel's own KSM counters beside them.
//!
//! Every figure comes from the daemon's `Status` answer (the one `samepage
//! status` prints), with the kernel's names; the system and partition
//! counters are [`samepage_daemon::view`]'s. Rates (CPU %, merges and pages
//! scanned per second) are differences between two samples, per process
//! (a process that came or went between them counts for neither).

use anyhow::{Context, Result};
use clap::Args;
use ratatui::backend::{Backend, TestBackend};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Sparkline, SparklineBar, Table};
use ratatui::{Frame, Terminal};
use samepage::Counters;
use samepage_daemon::client::Connection;
use samepage_daemon::protocol::{PartitionStatus, ProcessStatus};
use samepage_daemon::view;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// `samepage top`.
#[derive(Args, Debug)]
pub struct TopArgs {
    /// The daemon's socket [default: as `samepage daemon`].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Milliseconds between samples (rates are per second over this span;
    /// at least 10 live, 0 with --once for a single sample without rates).
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Render one frame as plain text to stdout and exit, from two samples
    /// --interval-ms apart (for scripts).
    #[arg(long)]
    once: bool,
    /// Columns of the --once frame (it has as many rows as its tables need).
    #[arg(long, default_value_t = 160)]
    width: u16,
}

/// Set while the terminal is in raw mode on the alternate screen.
static TERMINAL_TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Gives the terminal back (raw mode off, main screen) if `samepage top`
/// holds it: for the handler of SIGINT and SIGTERM, which exits.
pub fn restore_after_signal() {
    if TERMINAL_TAKEN.swap(false, std::sync::atomic::Ordering::SeqCst) {
        let _ = ratatui::try_restore();
    }
}

/// Samples kept for the sparklines (more than any terminal is wide).
const HISTORY: usize = 1024;

/// The kernel counters shown beside the daemon's, in this order.
const KERNEL_NAMES: [&str; 8] = [
    "run",
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "ksm_zero_pages",
    "general_profit",
    "full_scans",
];

/// A process's engine: one client of the daemon (a process may run several).
type Key = (u32, u32, u32);

/// The engine `r` of partition `p`.
fn key(p: &PartitionStatus, r: &ProcessStatus) -> Key {
    (p.uid, p.domain, r.client.0)
}

/// One answer of the daemon, with what goes with it.
struct Sample {
    /// When it was taken.
    at: Instant,
    /// The daemon's partitions.
    parts: Vec<PartitionStatus>,
    /// The system-wide tunables (`None` if the daemon did not answer).
    tunables: Option<samepage::Tunables>,
    /// `/sys/kernel/mm/ksm`'s counters (`None` without the kernel's KSM).
    kernel: Option<Vec<(&'static str, String)>>,
    /// `/proc/PID/comm` of the processes (those still there).
    comm: HashMap<i32, String>,
    /// Each partition's counters ([`view::partition_counters`]), in `parts`' order.
    per: Vec<Counters>,
    /// The system's ([`Counters::sum`] of `per`).
    sys: Counters,
}

impl Sample {
    /// A sample of `parts` taken at `at`, its counters computed once (every
    /// redraw shows them).
    fn new(
        at: Instant,
        parts: Vec<PartitionStatus>,
        tunables: Option<samepage::Tunables>,
        kernel: Option<Vec<(&'static str, String)>>,
        comm: HashMap<i32, String>,
    ) -> Sample {
        let per: Vec<Counters> = parts.iter().map(view::partition_counters).collect();
        let sys = Counters::sum(&per);
        Sample { at, parts, tunables, kernel, comm, per, sys }
    }

    /// Engines reporting, over all partitions.
    fn processes(&self) -> usize {
        self.parts.iter().map(|p| p.processes.len()).sum()
    }
}

/// Per-second rates between two samples.
#[derive(Debug, Default, PartialEq)]
struct Rates {
    /// Scanner CPU per engine, percent of one CPU.
    cpu_pct: HashMap<Key, f64>,
    /// Merges per second per engine (engines that send their counters).
    merges: HashMap<Key, f64>,
    /// The sums over the engines seen in both samples.
    total_cpu_pct: f64,
    /// Merges per second, all engines.
    total_merges: Option<f64>,
    /// `pages_scanned` per second, all engines.
    total_scanned: Option<f64>,
    /// `pages_skipped` per second (smart_scan's skips), all engines.
    total_skipped: Option<f64>,
}

/// What the sparklines draw, one point per sample.
#[derive(Clone, Copy, Debug)]
struct Point {
    /// `general_profit` (bytes).
    profit: i64,
    /// Merges per second.
    merges: Option<f64>,
    /// Scanner CPU, percent of one CPU.
    cpu_pct: Option<f64>,
}

/// One sparkline's value of a point (`None`: absent).
type Series = fn(&Point) -> Option<u64>;

/// The order of the process table (`p` cycles through them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sort {
    /// `ksm_process_profit`, largest first.
    Profit,
    /// Scanner CPU % in the last interval, largest first.
    Cpu,
    /// `ksm_merging_pages`, largest first.
    Merging,
    /// Process id, smallest first.
    Pid,
}

impl Sort {
    /// The order `p` switches to.
    fn next(self) -> Self {
        match self {
            Sort::Profit => Sort::Cpu,
            Sort::Cpu => Sort::Merging,
            Sort::Merging => Sort::Pid,
            Sort::Pid => Sort::Profit,
        }
    }

    /// The column it orders by.
    fn name(self) -> &'static str {
        match self {
            Sort::Profit => "ksm_process_profit",
            Sort::Cpu => "CPU%",
            Sort::Merging => "ksm_merging_pages",
            Sort::Pid => "PID",
        }
    }
}

/// The view's state.
struct Top {
    /// The daemon's socket.
    socket: PathBuf,
    /// Between samples.
    interval: Duration,
    /// The last sample that succeeded.
    last: Sample,
    /// Between the last two samples (`None` after the first).
    rates: Option<Rates>,
    /// One point per sample, oldest first, at most [`HISTORY`].
    history: VecDeque<Point>,
    /// The process table's order.
    sort: Sort,
    /// The last sample's failure, shown until one succeeds.
    error: Option<String>,
}

/// Bytes with a binary-prefix unit: `512 B`, `4.0 KiB`, `-1.5 MiB`.
fn human(bytes: i64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mag = bytes.unsigned_abs();
    if mag < 1024 {
        return format!("{bytes} B");
    }
    let mut v = mag as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    let sign = if bytes < 0 { "-" } else { "" };
    format!("{sign}{v:.1} {}", UNITS[unit])
}

/// [`human`] of a size that cannot be negative.
fn human_u64(bytes: u64) -> String {
    human(i64::try_from(bytes).unwrap_or(i64::MAX))
}

/// `/sys/kernel/mm/ksm`'s counters, or `None` without the kernel's KSM.
fn kernel_counters() -> Option<Vec<(&'static str, String)>> {
    Path::new(crate::kernel::DIR).is_dir().then(|| {
        KERNEL_NAMES.iter().filter_map(|&n| Some((n, crate::kernel::read(n).ok()?.trim().to_string()))).collect()
    })
}

/// Asks the daemon at `socket` for its view.
fn sample(socket: &Path) -> Result<Sample> {
    let parts = Connection::status(socket).with_context(|| format!("asking the daemon at {}", socket.display()))?;
    let tunables = Connection::tunables(socket).ok();
    let comm =
        parts.iter().flat_map(|p| &p.processes).filter_map(|r| Some((r.pid, crate::procfs::comm(r.pid)?))).collect();
    Ok(Sample::new(Instant::now(), parts, tunables, kernel_counters(), comm))
}

/// The rates between `prev` and `now`, per engine seen in both.
fn rates(prev: &Sample, now: &Sample) -> Rates {
    let secs = now.at.duration_since(prev.at).as_secs_f64();
    let mut r = Rates::default();
    if secs <= 0.0 {
        return r;
    }
    let before: HashMap<Key, &ProcessStatus> =
        prev.parts.iter().flat_map(|p| p.processes.iter().map(move |r| (key(p, r), r))).collect();
    for p in &now.parts {
        for cur in &p.processes {
            let k = key(p, cur);
            let Some(old) = before.get(&k) else { continue };
            let cpu = cur.cpu_ns.saturating_sub(old.cpu_ns) as f64 / 1e9 / secs * 100.0;
            r.cpu_pct.insert(k, cpu);
            r.total_cpu_pct += cpu;
            if let (Some(a), Some(b)) = (&old.counters, &cur.counters) {
                let merges = b.merges.saturating_sub(a.merges) as f64 / secs;
                r.merges.insert(k, merges);
                *r.total_merges.get_or_insert(0.0) += merges;
                *r.total_scanned.get_or_insert(0.0) += b.pages_scanned.saturating_sub(a.pages_scanned) as f64 / secs;
                *r.total_skipped.get_or_insert(0.0) += b.pages_skipped.saturating_sub(a.pages_skipped) as f64 / secs;
            }
        }
    }
    r
}

impl Top {
    /// The view of a first sample.
    fn new(socket: PathBuf, interval: Duration, first: Sample) -> Self {
        let mut top = Top {
            socket,
            interval,
            last: first,
            rates: None,
            history: VecDeque::new(),
            sort: Sort::Profit,
            error: None,
        };
        top.push_point();
        top
    }

    /// Takes a sample; a failure is kept to be shown, the last figures stay.
    fn refresh(&mut self) {
        match sample(&self.socket) {
            Ok(s) => self.absorb(s),
            Err(e) => self.error = Some(format!("{e:#}")),
        }
    }

    /// A new sample: the rates since the last one, and a point more.
    fn absorb(&mut self, s: Sample) {
        self.rates = Some(rates(&self.last, &s));
        self.last = s;
        self.error = None;
        self.push_point();
    }

    /// The last sample's point for the sparklines.
    fn push_point(&mut self) {
        let c = &self.last.sys;
        let r = self.rates.as_ref();
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(Point {
            profit: c.general_profit,
            merges: r.and_then(|r| r.total_merges),
            cpu_pct: r.map(|r| r.total_cpu_pct),
        });
    }

    /// The process rows in the chosen order.
    fn processes(&self) -> Vec<(&PartitionStatus, &ProcessStatus)> {
        let mut v: Vec<_> = self.last.parts.iter().flat_map(|p| p.processes.iter().map(move |r| (p, r))).collect();
        let cpu = |p: &PartitionStatus, r: &ProcessStatus| {
            self.rates.as_ref().and_then(|x| x.cpu_pct.get(&key(p, r)).copied()).unwrap_or(0.0)
        };
        match self.sort {
            Sort::Profit => v.sort_by_key(|(_, r)| std::cmp::Reverse(r.ksm_process_profit)),
            Sort::Cpu => v.sort_by(|(pa, a), (pb, b)| cpu(pb, b).total_cmp(&cpu(pa, a))),
            Sort::Merging => v.sort_by_key(|(_, r)| std::cmp::Reverse(r.ksm_merging_pages)),
            Sort::Pid => v.sort_by_key(|(_, r)| r.pid),
        }
        v
    }

    /// Rows the frame needs to show every partition and process.
    fn rows_needed(&self) -> u16 {
        let n = HEADER_ROWS + SPARK_ROWS + 1 + 3 + self.last.parts.len() + 3 + self.last.processes();
        u16::try_from(n).unwrap_or(u16::MAX)
    }

    /// The whole frame: header, sparklines, tables, keys.
    fn draw(&self, f: &mut Frame) {
        let parts_rows = u16::try_from(self.last.parts.len() + 3).unwrap_or(u16::MAX).min(12);
        let [header, sparks, parts, procs, footer] = Layout::vertical([
            Constraint::Length(HEADER_ROWS as u16),
            Constraint::Length(SPARK_ROWS as u16),
            Constraint::Length(parts_rows),
            Constraint::Min(3),
            Constraint::Length(1),
        ])
        .areas(f.area());
        self.draw_header(f, header);
        self.draw_sparklines(f, sparks);
        self.draw_partitions(f, parts);
        self.draw_processes(f, procs);
        let mut keys = format!(
            "q quit  p sort processes (now by {})  sample every {} ms, {} samples",
            self.sort.name(),
            self.interval.as_millis(),
            self.history.len()
        );
        if let Some(e) = &self.error {
            keys = format!("{keys}  error: {e}");
        }
        f.render_widget(Paragraph::new(keys), footer);
    }

    /// The system's totals and tunables; the kernel's counters beside.
    fn draw_header(&self, f: &mut Frame, area: Rect) {
        let [left, right] = Layout::horizontal([Constraint::Min(60), Constraint::Length(46)]).areas(area);
        let c = &self.last.sys;
        let procs = self.last.processes();
        let r = self.rates.as_ref();
        let rate = |v: Option<f64>, digits: usize, unit: &str| {
            v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}{unit}"))
        };
        let mut lines = vec![
            Line::from(format!(
                "saved (general_profit) {}   pages_sharing {}   pages_shared {}   full_scans {}",
                human(c.general_profit),
                c.pages_sharing,
                c.pages_shared,
                c.full_scans
            )),
            Line::from(format!(
                "pages_unshared {}   pages_volatile {}   ksm_zero_pages {}   metadata {}   processes {}   partitions {}",
                c.pages_unshared,
                c.pages_volatile,
                c.ksm_zero_pages,
                human_u64(c.metadata_bytes),
                procs,
                self.last.parts.len()
            )),
            Line::from(format!(
                "merger CPU {}   merges/s {}   pages_scanned/s {}   pages_skipped/s {}",
                rate(r.map(|r| r.total_cpu_pct), 1, " %"),
                rate(r.and_then(|r| r.total_merges), 1, ""),
                rate(r.and_then(|r| r.total_scanned), 0, ""),
                rate(r.and_then(|r| r.total_skipped), 0, ""),
            )),
        ];
        if let Some(t) = &self.last.tunables {
            let named = t.named();
            let shown = ["run", "pages_to_scan", "sleep_millisecs", "max_page_sharing", "use_zero_pages"];
            lines.push(Line::from(format!(
                "tunables: {}",
                named
                    .iter()
                    .filter(|(k, _)| shown.contains(k))
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )));
        }
        let title = format!(" samepage top: daemon at {} ", self.socket.display());
        f.render_widget(Paragraph::new(lines).block(Block::bordered().title(title)), left);

        let kernel: Vec<Line> = match &self.last.kernel {
            None => vec![Line::from("not available (no CONFIG_KSM)")],
            Some(v) => v
                .chunks(2)
                .map(|pair| {
                    Line::from(
                        pair.iter()
                            .map(|(k, v)| match (*k, v.parse::<i64>()) {
                                ("general_profit", Ok(b)) => format!("{k} {}", human(b)),
                                _ => format!("{k} {v}"),
                            })
                            .collect::<Vec<_>>()
                            .join("  "),
                    )
                })
                .collect(),
        };
        f.render_widget(
            Paragraph::new(kernel).block(Block::bordered().title(format!(" kernel {} ", crate::kernel::DIR))),
            right,
        );
    }

    /// Saved bytes, merges per second and merger CPU over the samples.
    fn draw_sparklines(&self, f: &mut Frame, area: Rect) {
        let cols: [Rect; 3] = Layout::horizontal([Constraint::Ratio(1, 3); 3]).areas(area);
        let last = self.history.back().copied();
        let specs: [(String, Series); 3] = [
            (format!(" saved (general_profit) {} ", last.map_or_else(|| "-".to_string(), |p| human(p.profit))), |p| {
                Some(u64::try_from(p.profit).unwrap_or(0))
            }),
            (
                format!(
                    " merges/s {} ",
                    last.and_then(|p| p.merges).map_or_else(|| "-".to_string(), |m| format!("{m:.1}"))
                ),
                |p| p.merges.map(|m| m.round() as u64),
            ),
            (
                format!(
                    " merger CPU {} ",
                    last.and_then(|p| p.cpu_pct).map_or_else(|| "-".to_string(), |c| format!("{c:.1} %"))
                ),
                // Tenths of a percent, so that low loads still show.
                |p| p.cpu_pct.map(|c| (c * 10.0).round() as u64),
            ),
        ];
        for ((title, value), col) in specs.into_iter().zip(cols) {
            let width = usize::from(col.width.saturating_sub(2));
            let skip = self.history.len().saturating_sub(width);
            let data: Vec<SparklineBar> =
                self.history.iter().skip(skip).map(|p| SparklineBar::from(value(p))).collect();
            f.render_widget(Sparkline::default().data(data).block(Block::bordered().title(title)), col);
        }
    }

    /// One row per partition, its counters by [`view::partition_counters`].
    fn draw_partitions(&self, f: &mut Frame, area: Rect) {
        let head = [
            "uid",
            "domain",
            "pages_shared",
            "pages_sharing",
            "pages_unshared",
            "pages_volatile",
            "general_profit",
            "ksm_zero_pages",
            "full_scans",
            "clients",
            "pool",
            "metadata",
        ];
        let rows = self.last.parts.iter().zip(&self.last.per).map(|(p, c)| {
            Row::new(vec![
                p.uid.to_string(),
                p.domain.to_string(),
                c.pages_shared.to_string(),
                c.pages_sharing.to_string(),
                c.pages_unshared.to_string(),
                c.pages_volatile.to_string(),
                human(c.general_profit),
                c.ksm_zero_pages.to_string(),
                c.full_scans.to_string(),
                p.clients.len().to_string(),
                human_u64(p.pool_bytes),
                human_u64(c.metadata_bytes),
            ])
        });
        let title = format!(" partitions ({}) ", self.last.parts.len());
        f.render_widget(table(&head, rows, |h| h.len().max(10), title), area);
    }

    /// One row per engine, in the chosen order.
    fn draw_processes(&self, f: &mut Frame, area: Rect) {
        let head = [
            "PID",
            "COMMAND",
            "uid/domain",
            "ksm_merging_pages",
            "ksm_zero_pages",
            "ksm_process_profit",
            "engine_mem",
            "ksm_mergeable",
            "full_scans",
            "CPU%",
            "cpu_seconds",
            "merges/s",
        ];
        let rows: Vec<Row> = self
            .processes()
            .into_iter()
            .map(|(p, r)| {
                let k = key(p, r);
                let rates = self.rates.as_ref();
                let cpu = rates.and_then(|x| x.cpu_pct.get(&k)).map_or_else(|| "-".to_string(), |c| format!("{c:.1}"));
                let merges =
                    rates.and_then(|x| x.merges.get(&k)).map_or_else(|| "-".to_string(), |m| format!("{m:.1}"));
                Row::new(vec![
                    r.pid.to_string(),
                    self.last.comm.get(&r.pid).map_or("?", String::as_str).to_string(),
                    format!("{}/{}", p.uid, p.domain),
                    r.ksm_merging_pages.to_string(),
                    r.ksm_zero_pages.to_string(),
                    human(r.ksm_process_profit),
                    human_u64(r.memory_bytes),
                    r.ksm_mergeable.to_string(),
                    r.full_scans.to_string(),
                    cpu,
                    format!("{:.3}", r.cpu_ns as f64 / 1e9),
                    merges,
                ])
            })
            .collect();
        let title = format!(" processes ({}), by {} ", rows.len(), self.sort.name());
        let width = |h: &str| if h == "COMMAND" { 16 } else { h.len().max(8) };
        f.render_widget(table(&head, rows, width, title), area);
    }
}

/// A bordered table titled `title`, its columns headed `head` (in bold),
/// each `width(heading)` wide.
fn table<'a>(
    head: &[&'a str],
    rows: impl IntoIterator<Item = Row<'a>>,
    width: impl Fn(&str) -> usize,
    title: String,
) -> Table<'a> {
    let widths = head.iter().map(|h| Constraint::Length(u16::try_from(width(h)).unwrap_or(u16::MAX)));
    Table::new(rows, widths)
        .header(Row::new(head.to_vec()).style(Style::new().add_modifier(Modifier::BOLD)))
        .block(Block::bordered().title(title))
}

/// Rows of the header (four lines and its border).
const HEADER_ROWS: usize = 6;
/// Rows of the sparklines (three lines and their border).
const SPARK_ROWS: usize = 5;

/// A frame rendered off screen, as plain text (trailing blanks cut).
fn render_text(top: &Top, width: u16, height: u16) -> Result<String> {
    let mut terminal = Terminal::new(TestBackend::new(width, height))?;
    terminal.draw(|f| top.draw(f))?;
    let buf = terminal.backend().buffer();
    let mut out = String::new();
    for y in 0..buf.area.height {
        let line: String = (0..buf.area.width).map(|x| buf[(x, y)].symbol()).collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    Ok(out)
}

/// What the view does with a key.
enum Action {
    /// `q`, Esc, Ctrl-C.
    Quit,
    /// `p`: the next process order.
    Sort,
    /// Anything else (a resize redraws anyway).
    Nothing,
}

/// What `ev` asks for.
fn action(ev: &Event) -> Action {
    let Event::Key(k) = ev else { return Action::Nothing };
    if k.kind != KeyEventKind::Press {
        return Action::Nothing;
    }
    match k.code {
        KeyCode::Char('q') | KeyCode::Esc => Action::Quit,
        KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => Action::Quit,
        KeyCode::Char('p') => Action::Sort,
        _ => Action::Nothing,
    }
}

/// Draws and samples until a key quits.
fn live<B: Backend>(terminal: &mut Terminal<B>, top: &mut Top) -> Result<()>
where
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let mut next = Instant::now() + top.interval;
    loop {
        terminal.draw(|f| top.draw(f))?;
        let now = Instant::now();
        if now >= next {
            top.refresh();
            next = (next + top.interval).max(Instant::now());
            continue;
        }
        if event::poll(next - now)? {
            match action(&event::read()?) {
                Action::Quit => return Ok(()),
                Action::Sort => top.sort = top.sort.next(),
                Action::Nothing => {}
            }
        }
    }
}

/// Runs `samepage top`.
pub fn run(a: TopArgs) -> Result<ExitCode> {
    let socket = a.socket.unwrap_or_else(samepage_daemon::default_socket);
    if !a.once && a.interval_ms < 10 {
        return Err(
            crate::args::UsageError(format!("--interval-ms {} is too short: at least 10", a.interval_ms)).into()
        );
    }
    if a.width < 100 {
        return Err(crate::args::UsageError(format!("--width {} is too narrow: at least 100", a.width)).into());
    }
    let interval = Duration::from_millis(a.interval_ms);
    let mut top = Top::new(socket.clone(), interval, sample(&socket)?);
    if a.once {
        if !interval.is_zero() {
            std::thread::sleep(interval);
            top.refresh();
            if let Some(e) = top.error.take() {
                anyhow::bail!(e);
            }
        }
        print!("{}", render_text(&top, a.width, top.rows_needed())?);
        return Ok(ExitCode::SUCCESS);
    }
    TERMINAL_TAKEN.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut terminal = ratatui::try_init().context("setting up the terminal")?;
    let r = live(&mut terminal, &mut top);
    if TERMINAL_TAKEN.swap(false, std::sync::atomic::Ordering::SeqCst) {
        ratatui::restore();
    }
    r.map(|()| ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(processes: Vec<ProcessStatus>) -> PartitionStatus {
        PartitionStatus {
            uid: 1000,
            domain: 3,
            stable: Default::default(),
            slots_in_use: 0,
            orphans: 0,
            pool_bytes: 0,
            requests: 0,
            processes,
            unshared: 0,
            metadata_bytes: 0,
            clients: vec![],
            gone: Counters::default(),
        }
    }

    fn proc(n: u32, pid: i32, cpu_ns: u64, merges: Option<u64>) -> ProcessStatus {
        let mut r = ProcessStatus {
            pid,
            cpu_ns,
            ksm_merging_pages: 64,
            ksm_process_profit: 60 * 4096,
            counters: merges.map(|m| Box::new(Counters { merges: m, pages_scanned: 10 * m, ..Counters::default() })),
            ..ProcessStatus::default()
        };
        r.client.0 = n;
        r
    }

    fn at(t: Instant, parts: Vec<PartitionStatus>) -> Sample {
        Sample::new(t, parts, None, None, HashMap::new())
    }

    #[test]
    fn bytes_read_as_people_read_them() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(4096), "4.0 KiB");
        assert_eq!(human(-(3 << 19)), "-1.5 MiB");
        assert_eq!(human(5 << 30), "5.0 GiB");
        assert_eq!(human(i64::MIN), "-8.0 EiB");
    }

    #[test]
    fn rates_per_engine_in_both_samples() {
        let t = Instant::now();
        let a = at(t, vec![part(vec![proc(1, 10, 0, Some(0)), proc(2, 20, 0, None), proc(3, 30, 0, Some(0))])]);
        let b = at(
            t + Duration::from_secs(2),
            vec![part(vec![
                proc(1, 10, 1_000_000_000, Some(100)),
                proc(2, 20, 500_000_000, None),
                proc(4, 40, 9, None),
            ])],
        );
        let r = rates(&a, &b);
        assert_eq!(r.cpu_pct[&(1000, 3, 1)], 50.0);
        assert_eq!(r.cpu_pct[&(1000, 3, 2)], 25.0);
        assert!(!r.cpu_pct.contains_key(&(1000, 3, 4)), "a newcomer has no rate yet");
        assert_eq!(r.total_cpu_pct, 75.0);
        assert_eq!(r.merges[&(1000, 3, 1)], 50.0);
        assert_eq!((r.total_merges, r.total_scanned, r.total_skipped), (Some(50.0), Some(500.0), Some(0.0)));
        // A counter that went back (an engine restarted) counts as 0.
        assert_eq!(rates(&b, &at(t + Duration::from_secs(3), a.parts.clone())).total_cpu_pct, 0.0);
    }

    #[test]
    fn a_frame_shows_every_process_with_its_figures() {
        let t = Instant::now();
        let first = at(t, vec![part(vec![proc(1, 4242, 0, Some(0)), proc(2, 77, 0, None)])]);
        let mut top = Top::new(PathBuf::from("/nowhere.sock"), Duration::from_secs(1), first);
        let second =
            at(t + Duration::from_secs(1), vec![part(vec![proc(1, 4242, 300_000_000, Some(5)), proc(2, 77, 0, None)])]);
        top.absorb(second);
        let text = render_text(&top, 160, top.rows_needed()).unwrap();
        // rows_needed leaves room for every process, the last one included.
        assert!(text.lines().any(|l| l.contains("│77 ")), "{text}");
        let row = text.lines().find(|l| l.contains("│4242")).unwrap_or_else(|| panic!("{text}"));
        let cells: Vec<&str> = row.split_whitespace().filter(|c| *c != "│").collect();
        assert_eq!(cells[..4], ["│4242", "?", "1000/3", "64"], "{row}");
        assert!(row.contains("30.0"), "CPU %: {row}");
        assert!(text.contains("saved (general_profit)") && text.contains("merger CPU 30.0 %"), "{text}");
        // p: by CPU puts the busy process first.
        top.sort = Sort::Cpu;
        let pids: Vec<i32> = top.processes().iter().map(|(_, r)| r.pid).collect();
        assert_eq!(pids, [4242, 77]);
        top.sort = top.sort.next().next();
        let pids: Vec<i32> = top.processes().iter().map(|(_, r)| r.pid).collect();
        assert_eq!(pids, [77, 4242]);
    }
}
