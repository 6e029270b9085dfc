//! `samepage top`: the live view run in a real terminal (a detached tmux
//! session) shows this process, a merged client of the daemon, with the
//! figures `samepage status --json` reports, changes its order on `p` and
//! quits on `q`; `--once` prints the same frame as plain text. The tmux
//! test skips with a message when tmux is absent (`.ci/run` installs it).

mod common;
use common::{merged_client, spawn_daemon, status_json, wait_for};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("samepage-top-{name}-{}", std::process::id()))
}

/// The cells of a table row: the line without its borders, split at blanks.
fn cells(line: &str) -> Vec<&str> {
    line.split(|c: char| c == '│' || c.is_whitespace()).filter(|c| !c.is_empty()).collect()
}

/// The process table's `column` of process `pid` in a frame: the header
/// row naming the column gives its position.
fn process_cell<'a>(frame: &'a str, pid: u32, column: &str) -> Option<&'a str> {
    let header = frame.lines().map(cells).find(|c| c.first() == Some(&"PID"))?;
    let at = header.iter().position(|c| *c == column)?;
    let row = frame.lines().map(cells).find(|c| c.first() == Some(&pid.to_string().as_str()))?;
    row.get(at).copied()
}

/// This process's `ksm_merging_pages` as `samepage status --json` reports it.
fn my_merging_pages(socket: &Path) -> String {
    let v = status_json(socket);
    let me = v["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["processes"].as_array().unwrap())
        .find(|r| r["pid"] == std::process::id())
        .unwrap_or_else(|| panic!("this process is not in {v}"));
    me["ksm_merging_pages"].to_string()
}

fn my_comm() -> String {
    std::fs::read_to_string("/proc/self/comm").unwrap().trim_end().to_string()
}

/// A tmux server of its own (`tmux -L NAME`), killed when dropped.
struct Tmux(String);

impl Tmux {
    fn cmd(&self, args: &[&str]) -> Output {
        Command::new("tmux").env_remove("TMUX").args(["-L", &self.0, "-f", "/dev/null"]).args(args).output().unwrap()
    }

    fn pane(&self) -> String {
        String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }

    fn alive(&self) -> bool {
        self.cmd(&["has-session", "-t", "top"]).status.success()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

/// `samepage top` in a 160x48 terminal: this process's row shows its
/// command name and the `ksm_merging_pages` that `status --json` reports;
/// `p` orders the processes by CPU; `q` ends it with exit status 0.
#[test]
fn top_in_a_terminal_shows_the_merged_client_and_quits_on_q() {
    if !Command::new("tmux").arg("-V").output().is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: tmux is not installed (Debian package tmux; .ci/run installs it)");
        return;
    }
    let socket = temp("live.sock");
    let _daemon = spawn_daemon(&socket, &["--pages-to-scan", "1000", "--sleep-ms", "5"]);
    let (_engine, _region) = merged_client(&socket);
    let want = my_merging_pages(&socket);
    assert_eq!(want, "64");

    let (err, exit) = (temp("stderr"), temp("exit"));
    let _ = std::fs::remove_file(&exit);
    let script = format!(
        "'{}' top --socket '{}' --interval-ms 200 2>'{}'; echo $? >'{}'",
        env!("CARGO_BIN_EXE_samepage"),
        socket.display(),
        err.display(),
        exit.display()
    );
    let tmux = Tmux(format!("samepage-top-{}", std::process::id()));
    let out = tmux.cmd(&["new-session", "-d", "-s", "top", "-x", "160", "-y", "48", &script]);
    assert!(out.status.success(), "tmux new-session: {}", String::from_utf8_lossy(&out.stderr));

    let pid = std::process::id();
    let stderr = || std::fs::read_to_string(&err).unwrap_or_default();
    let frame = wait_for("samepage top never showed this process with its merging pages", || {
        let frame = tmux.pane();
        assert!(tmux.alive(), "samepage top ended: {}", stderr());
        (process_cell(&frame, pid, "ksm_merging_pages") == Some(want.as_str())).then_some(frame)
    });
    assert_eq!(process_cell(&frame, pid, "COMMAND"), Some(my_comm().as_str()), "{frame}");
    assert_eq!(process_cell(&frame, pid, "uid/domain"), Some(format!("{}/3", common::my_uid()).as_str()), "{frame}");
    assert!(frame.contains("pages_sharing 60"), "{frame}");

    // p: the process table by CPU.
    assert!(tmux.cmd(&["send-keys", "-t", "top", "p"]).status.success());
    wait_for("p never changed the process order", || tmux.pane().contains("by CPU%").then_some(()));

    // q: the session ends, and samepage top with it, successfully.
    assert!(tmux.cmd(&["send-keys", "-t", "top", "q"]).status.success());
    wait_for("q never ended samepage top", || (!tmux.alive()).then_some(()));
    let status = wait_for("no exit status", || std::fs::read_to_string(&exit).ok());
    assert_eq!(status.trim(), "0", "samepage top: {}", stderr());
    let _ = std::fs::remove_file(&err);
    let _ = std::fs::remove_file(&exit);
    let _ = std::fs::remove_file(&socket);
}

/// `samepage top --once`: one frame as plain text (no escape sequences)
/// on stdout, with the figures `status --json` reports.
#[test]
fn once_prints_one_plain_frame() {
    let socket = temp("once.sock");
    let _daemon = spawn_daemon(&socket, &["--pages-to-scan", "1000", "--sleep-ms", "5"]);
    let (_engine, _region) = merged_client(&socket);
    let want = my_merging_pages(&socket);
    let out = Command::new(env!("CARGO_BIN_EXE_samepage"))
        .args(["top", "--once", "--interval-ms", "100", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let frame = String::from_utf8(out.stdout).unwrap();
    assert!(!frame.contains('\x1b'), "escape sequences in {frame:?}");
    let pid = std::process::id();
    assert_eq!(process_cell(&frame, pid, "ksm_merging_pages"), Some(want.as_str()), "{frame}");
    assert_eq!(process_cell(&frame, pid, "COMMAND"), Some(my_comm().as_str()), "{frame}");
    assert!(process_cell(&frame, pid, "CPU%").is_some_and(|c| c.parse::<f64>().is_ok()), "a rate: {frame}");
    assert!(frame.contains("pages_sharing 60") && frame.contains("saved (general_profit)"), "{frame}");
    assert!(frame.lines().all(|l| l.chars().count() <= 160), "{frame}");
    let _ = std::fs::remove_file(&socket);
}

/// Without a daemon `samepage top` fails naming the socket; bad flags are
/// usage errors (exit status 2).
#[test]
fn top_without_a_daemon_or_with_bad_flags_fails() {
    let socket = temp("nobody.sock");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_samepage"))
            .arg("top")
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .output()
            .unwrap()
    };
    let out = run(&["--once"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&socket.display().to_string()));
    assert_eq!(run(&["--interval-ms", "1"]).status.code(), Some(2));
    assert_eq!(run(&["--once", "--width", "20"]).status.code(), Some(2));
}
