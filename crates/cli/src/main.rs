#![recursion_limit = "256"]
//! `samepage`: the userspace KSM engine's command line.

mod args;
mod bench;
mod daemon;
mod demo;
mod estimate;
mod kernel;
mod measure;
mod metrics;
mod processes;
mod procfs;
mod run;
mod side;
mod supervisor;
mod sysctl;
mod sysfs;
mod top;
mod torture;
mod torture_io;
mod torture_procs;
mod workload;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "samepage",
    version,
    about = "Kernel Samepage Merging in userspace: merge identical pages, really free memory"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build a workload in mergeable memory, merge it at full speed, and
    /// report counters, memory freed (as /proc reports it), time, CPU, integrity.
    Demo(demo::DemoArgs),
    /// samepage against the kernel's ksmd on identical content, side by side.
    Bench(bench::BenchArgs),
    /// Merge at full speed while threads, the kernel and forked children
    /// write, regions come and go and run changes; check every byte.
    Torture(torture::TortureArgs),
    /// Serve the stable tree, unstable tree and pool that processes share
    /// when they merge with each other (one partition per user and domain).
    Daemon(daemon::DaemonArgs),
    /// The daemon's partitions: counters with the kernel's names, clients.
    Status(daemon::StatusArgs),
    /// Change the daemon's system-wide tunables while it runs, by their
    /// kernel names (as writing /sys/kernel/mm/ksm/NAME): root or the
    /// daemon's user only.
    Set(daemon::SetArgs),
    /// Merge a process's mergeable memory now, through the daemon, and
    /// print what it saved.
    Merge(daemon::MergeArgs),
    /// Run a program that knows nothing of samepage so that its
    /// madvise(MADV_MERGEABLE) memory merges (through the daemon if one
    /// answers, else inside the program).
    Run(run::RunArgs),
    /// What the kernel's KSM would save by merging these processes' memory,
    /// read from outside (nothing is merged): counters by kernel name,
    /// bytes saved net of metadata, where the savings come from.
    Estimate(estimate::EstimateArgs),
    /// Mount the files of /sys/kernel/mm/ksm (and ksm_stat/PID per
    /// process) backed by the daemon, for tools written for the kernel's KSM.
    Sysfs(sysfs::SysfsArgs),
    /// A live terminal view of the daemon: savings, cost and rates over
    /// time, system-wide, per partition and per process, with sparklines
    /// (q quits, p changes the process order; --once prints one frame).
    Top(top::TopArgs),
    /// A process of `bench --workload processes` (run by it, not by hand).
    #[command(hide = true)]
    Worker(processes::WorkerArgs),
    /// A client process of `torture --processes` (run by it, not by hand).
    #[command(hide = true)]
    TortureClient(torture_procs::ClientArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Interrupted (Ctrl-C, SIGTERM): put the machine's settings back first.
    let _ = ctrlc::set_handler(|| {
        kernel::restore_after_signal();
        sysctl::restore_after_signal();
        top::restore_after_signal();
        eprintln!("interrupted: kernel KSM settings and vm.max_map_count restored");
        std::process::exit(130);
    });
    let r = match cli.cmd {
        Cmd::Demo(a) => demo::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Torture(a) => torture::run(a),
        Cmd::Daemon(a) => daemon::run(a),
        Cmd::Status(a) => daemon::status(a),
        Cmd::Set(a) => daemon::set(a),
        Cmd::Merge(a) => daemon::merge(a),
        Cmd::Run(a) => run::run(a),
        Cmd::Estimate(a) => estimate::run(a),
        Cmd::Sysfs(a) => sysfs::run(a),
        Cmd::Top(a) => top::run(a),
        Cmd::Worker(a) => processes::worker(a),
        Cmd::TortureClient(a) => torture_procs::client(a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<args::UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
