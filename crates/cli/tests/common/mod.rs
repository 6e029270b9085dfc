//! Helpers shared by the command-line tests that start daemons and
//! servers.
#![allow(dead_code, reason = "each test crate uses a part of these")]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed and reaped when dropped (a failing test leaves
/// nothing behind).
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` with its output thrown away, killed when dropped.
pub fn spawn_quiet(cmd: &mut Command) -> Killed {
    Killed(cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap())
}

/// Starts `samepage daemon --socket SOCKET ARGS` (the socket file is left as
/// it is: a daemon takes over a stale one).
pub fn spawn_daemon(socket: &Path, args: &[&str]) -> Killed {
    spawn_quiet(Command::new(env!("CARGO_BIN_EXE_samepage")).args(["daemon", "--socket"]).arg(socket).args(args))
}

/// `f` until it succeeds, for at most 30 s (a daemon or server starting).
pub fn retry<T, E: std::fmt::Display>(what: &str, mut f: impl FnMut() -> Result<T, E>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) => {
                assert!(Instant::now() < deadline, "{what}: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// `f` until it gives `Some`, for at most 30 s.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    retry(what, || f().ok_or("not yet"))
}

/// This process's user id.
pub fn my_uid() -> u32 {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap()
}

/// `samepage status --json` of the daemon at `socket`.
pub fn status_json(socket: &Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_samepage"))
        .args(["status", "--json", "--socket"])
        .arg(socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// An engine of this process connected to the daemon in domain 3, with 64
/// pages of 4 contents, merged: `pages_shared` 4, `pages_sharing` 60 and
/// this process's `ksm_merging_pages` 64 in `samepage status --json`.
pub fn merged_client(socket: &Path) -> (samepage::Engine, samepage::Region) {
    use samepage::{Domain, Engine, Run, Tunables};
    let engine = wait_for("the daemon never listened", || {
        Engine::connect(socket, Domain(3), Tunables { run: Run::Merge, ..Tunables::default() }).ok()
    });
    let region = engine.alloc_region(64 * 4096).unwrap();
    for i in 0..64 {
        region.write(i * 4096, &[(i % 4) as u8 + 1; 4096]).unwrap();
    }
    wait_for("the 64 pages never merged into 4", || {
        let v = status_json(socket);
        let p = &v["partitions"][0];
        let me = &p["processes"][0];
        (p["pages_sharing"] == 60 && me["ksm_merging_pages"] == 64).then_some(())
    });
    (engine, region)
}

/// The machine's ksmd, borrowed: `run` 2 then 0 at once, and every setting
/// it touches put back when dropped (`run` 2 then 0, the tunables, `run`).
/// The tests of one binary take turns ([`ksmd_turn`]).
pub struct Ksmd {
    saved: Vec<(&'static str, String)>,
    _turn: std::sync::MutexGuard<'static, ()>,
}

/// The turn of a test that drives the machine's ksmd (tests of one binary
/// run in parallel; the kernel has one ksmd).
pub fn ksmd_turn() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// The kernel's KSM directory.
pub const KSM: &str = "/sys/kernel/mm/ksm";

/// A counter or tunable of the kernel's KSM.
pub fn ksm_get(name: &str) -> u64 {
    let s = std::fs::read_to_string(format!("{KSM}/{name}")).unwrap();
    s.trim().parse().unwrap_or_else(|_| panic!("{name}: {s:?}"))
}

/// Sets a tunable of the kernel's KSM (panics if refused).
pub fn ksm_set(name: &str, value: &str) {
    std::fs::write(format!("{KSM}/{name}"), value).unwrap_or_else(|e| panic!("{name} = {value}: {e}"));
}

impl Ksmd {
    /// Saves the settings and stops ksmd with everything unmerged.
    pub fn take() -> Ksmd {
        let turn = ksmd_turn();
        let saved = ["run", "max_page_sharing", "pages_to_scan", "sleep_millisecs", "use_zero_pages"]
            .map(|n| (n, std::fs::read_to_string(format!("{KSM}/{n}")).unwrap().trim().to_string()))
            .to_vec();
        ksm_set("run", "2");
        ksm_set("run", "0");
        Ksmd { saved, _turn: turn }
    }
}

impl Drop for Ksmd {
    fn drop(&mut self) {
        let set = |n: &str, v: &str| std::fs::write(format!("{KSM}/{n}"), v);
        let _ = set("run", "2");
        let _ = set("run", "0");
        for (n, v) in &self.saved {
            if *n != "run" {
                let _ = set(n, v);
            }
        }
        if let Some((_, v)) = self.saved.iter().find(|(n, _)| *n == "run") {
            let _ = set("run", v);
        }
    }
}

/// `Command::output` with a time limit: a program that hangs (a deadlock
/// in the engine, say) fails its test with what each of its threads waits
/// for, instead of stalling the whole suite.
pub trait OutputWithin {
    /// Runs the command to its end, for at most `limit`. Past it, prints
    /// every thread of the command's process group (its name, state and
    /// kernel wait channel, and each thread's stack when `gdb` is there),
    /// kills the group and panics.
    fn output_within(&mut self, limit: Duration) -> std::process::Output;
}

impl OutputWithin for Command {
    fn output_within(&mut self, limit: Duration) -> std::process::Output {
        use std::io::Read;
        use std::os::unix::process::CommandExt;
        let mut child =
            self.process_group(0).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let drain = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = r.read_to_end(&mut v);
                v
            })
        };
        let out = drain(Box::new(child.stdout.take().unwrap()));
        let err = drain(Box::new(child.stderr.take().unwrap()));
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let group = child.id();
                let threads = group_threads(group);
                let _ = Command::new("kill").args(["-KILL", "--", &format!("-{group}")]).status();
                let _ = child.wait();
                let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
                panic!("{self:?} still ran after {limit:?}; its threads:\n{threads}\nits stderr:\n{stderr}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        std::process::Output { status, stdout: out.join().unwrap_or_default(), stderr: err.join().unwrap_or_default() }
    }
}

/// Every thread of the processes in process group `group`: pid, name,
/// state, wait channel; and the user stacks from `gdb` when it is installed.
fn group_threads(group: u32) -> String {
    let mut text = String::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return text };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // Fields after the name's closing parenthesis: state, ppid, pgrp.
        let rest: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
        if rest.get(2).and_then(|g| g.parse::<u32>().ok()) != Some(group) {
            continue;
        }
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        text += &format!("process {pid}: {}\n", String::from_utf8_lossy(&cmd).replace('\0', " "));
        for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
            let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default().trim().to_string();
            let state = read("stat").rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next().map(String::from));
            text += &format!(
                "  thread {} {:?} state {} waits in {}\n",
                t.file_name().to_string_lossy(),
                read("comm"),
                state.unwrap_or_default(),
                read("wchan")
            );
        }
        if let Ok(gdb) = Command::new("timeout")
            .args(["30", "gdb", "-batch", "-p", &pid.to_string(), "-ex", "thread apply all bt 16"])
            .stdin(Stdio::null())
            .output()
        {
            text += &String::from_utf8_lossy(&gdb.stdout);
        }
    }
    text
}
