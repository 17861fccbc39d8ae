//! `envguard`: the command line. Everything else lives in the library.
use clap::{Parser, Subcommand};
use envguard_agent::cmd::{
    check, detach, events, explain, mode, oci_hook, reload, report, run, status, verify,
};

/// envguard keeps workloads of different environments (dev, staging, prod…)
/// on one host from talking to each other, enforced by eBPF programs on cgroup
/// hooks; violations stream out as JSON lines.
/// `envguard --version`: `envguard-agent 0.1.0` on the first line (what
/// `envguard_build_info{version}` says), then the commit and the layout
/// fingerprint of the embedded kernel programs' maps (the pin directory an
/// agent of this build uses with default options: two builds with the same
/// one adopt each other's pinned state).
static LONG_VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{}\ncommit: {}\nlayout: {}\ntarget: {}",
        env!("CARGO_PKG_VERSION"),
        env!("ENVGUARD_COMMIT"),
        envguard_agent::loader::default_layout()
            .unwrap_or_else(|| "none (built without kernel programs)".to_owned()),
        env!("ENVGUARD_TARGET"),
    )
});

#[derive(Parser)]
#[command(version, long_version = LONG_VERSION.as_str(), propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    // Boxed: the daemon's options dwarf every other command's.
    Run(Box<run::RunArgs>),
    Check(check::CheckArgs),
    Detach(detach::DetachArgs),
    Status(status::StatusArgs),
    Mode(mode::ModeArgs),
    Reload(reload::ReloadArgs),
    Events(events::EventsArgs),
    Explain(explain::ExplainArgs),
    Report(report::ReportArgs),
    Verify(verify::VerifyArgs),
    /// The probe process `verify` starts inside an env (internal).
    #[command(hide = true, name = "verify-probe")]
    VerifyProbe(verify::ProbeChildArgs),
    OciHook(oci_hook::OciHookArgs),
}

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run(_)) {
        // A client whose output is cut (`envguard status | head -1`) should
        // just stop. The daemon keeps Rust's default (SIGPIPE ignored), so a
        // closed stdout is a sink error it counts, not its death.
        // SAFETY: setting a signal disposition before any thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match &cli.command {
        Command::Run(args) => run::run(args),
        Command::Check(args) => check::check(args),
        Command::Detach(args) => detach::detach(args),
        Command::Status(args) => status::status(args),
        Command::Mode(args) => mode::mode(args),
        Command::Reload(args) => reload::reload(args),
        Command::Events(args) => events::events(args),
        Command::Explain(args) => explain::explain(args),
        Command::Report(args) => report::report(args),
        Command::VerifyProbe(args) => verify::probe_child(args),
        Command::Verify(args) => match verify::verify(args) {
            // Not an error: the report says what failed.
            Ok(false) => return std::process::ExitCode::FAILURE,
            r => r.map(|_| ()),
        },
        Command::OciHook(args) => oci_hook::oci_hook(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            for line in format!("{e:#}").lines() {
                eprintln!("error: {line}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}
