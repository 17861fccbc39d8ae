//! `envguard run`: the host daemon.
use std::path::PathBuf;

use anyhow::Context as _;

use crate::{
    control,
    daemon::{self, Settings},
    loader::{self, Options},
    sinks::{SinkConfig, SyslogTarget},
};

/// Enforce a policy: load it into the kernel, attach, stream violation events.
///
/// Runs in the foreground. Events are JSON lines on stdout (the first is
/// `policy_loaded`, printed once every program is attached); logs go to stderr.
/// Programs, links and maps are pinned under --pin-root, so enforcement does
/// not depend on this process: SIGINT and SIGTERM exit 0 and leave it in place
/// (`envguard detach` removes it), and the next `envguard run` adopts it
/// without a moment unguarded. SIGHUP reloads the policy file.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The policy file (TOML).
    #[arg(long, short)]
    pub policy: PathBuf,
    /// Attach at this cgroup instead of the root of the cgroup2 hierarchy: only
    /// workloads below it are guarded. A path relative to the cgroup2 mount
    /// (e.g. /test.slice), like the policy's cgroups.
    #[arg(long, value_name = "PATH")]
    pub cgroup_root: Option<String>,
    /// Where programs, links and maps are pinned (on a bpf filesystem; bpffs
    /// is mounted at /sys/fs/bpf if nothing is).
    #[arg(long, value_name = "DIR", default_value = loader::DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,
    /// On SIGINT/SIGTERM, remove every program, link and pin instead of
    /// leaving enforcement in place (for ephemeral use).
    #[arg(long)]
    pub detach_on_exit: bool,
    /// The control socket for `envguard status|mode|reload|explain|events`
    /// (mode 0600, root only, unless --control-group) [default:
    /// /run/envguard/control.sock for the default pin root, else one named
    /// after the pin root, which the client commands find with --pin-root].
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// A group whose members may use the read-only commands (status, explain,
    /// events): the socket becomes 0660 with this group.
    #[arg(long, value_name = "GROUP")]
    pub control_group: Option<String>,
    /// The annotation that names a container's env when the agent finds
    /// running containers at start (runc's state): the `--key` its OCI
    /// hooks use.
    #[arg(long, value_name = "KEY", default_value = crate::containers::DEFAULT_ENV_KEY)]
    pub container_env_key: String,
    /// Size of the kernel's event ring buffer in bytes (a power of two, at
    /// least 4096). Changing it replaces the pinned maps.
    #[arg(long, value_name = "BYTES")]
    pub ringbuf_bytes: Option<u32>,
    /// Capacity of the kernel's per-flow verdict cache (an LRU: a flow evicted
    /// from it is classified again). Changing it replaces the pinned maps.
    #[arg(long, value_name = "N")]
    pub flow_cache_entries: Option<u32>,
    /// How the tc hooks go on the listed interfaces: `auto` (tcx links,
    /// else, on kernels before 6.6, clsact + cls_bpf filters) or `clsact`
    /// (the filters even where tcx exists: that fallback where tcx is
    /// unwanted, or to test it).
    #[arg(long, value_name = "HOW", default_value = "auto", value_parser = ["auto", "clsact"])]
    pub tc_attach: String,
    /// Repeats of one violating flow within this long of its last record are
    /// counted in the kernel and reported as one `violation_rollup` per
    /// interval instead of one record each (0 sends every one).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub dedup_interval: std::time::Duration,
    /// Also append records to this file (rotated by size, reopened on SIGHUP
    /// for logrotate).
    #[arg(long, value_name = "PATH")]
    pub events_file: Option<PathBuf>,
    /// Rotate the events file when it would grow past this many MiB.
    #[arg(long, value_name = "MIB", default_value_t = 100)]
    pub events_file_max_mb: u64,
    /// Rotated events files to keep (PATH.1 … PATH.N).
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub events_file_backups: u32,
    /// Also send records to syslog as RFC 5424 messages: `unix:/dev/log`
    /// (a unix datagram socket) or `udp:127.0.0.1:514`.
    #[arg(long, value_name = "TARGET", value_parser = parse_syslog)]
    pub syslog: Option<SyslogTarget>,
    /// Do not write records to stdout (when another sink takes them).
    #[arg(long)]
    pub no_stdout: bool,
    /// Records each sink may fall behind by before it loses some (counted and
    /// reported as `lost_events` with source `queue:<sink>`).
    #[arg(long, value_name = "N", default_value_t = 65_536)]
    pub sink_queue: usize,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9477 (off by default).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// At most this many `violation` records per second (a token bucket; the
    /// next record that goes out carries `suppressed`: N). Off by default:
    /// in-kernel dedup already folds repeats.
    #[arg(long, value_name = "PER_SEC")]
    pub rate_limit: Option<f64>,
    /// Burst allowed by --rate-limit [default: one second's worth].
    #[arg(long, value_name = "N", requires = "rate_limit")]
    pub rate_burst: Option<u32>,
    /// Keep the history `envguard report` reads (decision counters sampled
    /// every --history-interval, violation rollups) in this directory
    /// (created 0700; refused if anyone but root could write it or a path
    /// above it) [default: /var/lib/envguard for the default pin root; an
    /// agent on another pin root keeps no history unless given one, since
    /// two agents must not share one].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// How often the decision counters are sampled into the history.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_interval)]
    pub history_interval: std::time::Duration,
    /// Keep no history, whatever the pin root.
    #[arg(long, conflicts_with = "state_dir")]
    pub no_history: bool,
    /// Print the kernel verifier's log when it rejects a program.
    #[arg(long)]
    pub verifier_log: bool,
}

pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    let control_group = args.control_group.as_deref().map(group_id).transpose()?;
    let settings = Settings {
        policy: args.policy.clone(),
        cgroup_root: args.cgroup_root.clone(),
        kernel: Options {
            pin_root: args.pin_root.clone(),
            verifier_log: args.verifier_log,
            ringbuf_bytes: args.ringbuf_bytes,
            flow_cache_entries: args.flow_cache_entries,
            dedup_interval: args.dedup_interval,
            force_clsact: args.tc_attach == "clsact",
        },
        control_socket: args
            .control_socket
            .clone()
            .unwrap_or_else(|| control::socket_for(&args.pin_root)),
        control_group,
        container_env_key: args.container_env_key.clone(),
        detach_on_exit: args.detach_on_exit,
        sinks: sinks(args),
        sink_queue: args.sink_queue.max(1),
        metrics_listen: args.metrics_listen,
        rate_limit: args
            .rate_limit
            .map(|r| (r, args.rate_burst.unwrap_or(r.ceil().max(1.0) as u32))),
        state_dir: state_dir(args),
        state_dir_explicit: args.state_dir.is_some(),
        history_interval: args.history_interval,
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(daemon::run(settings))
}

fn state_dir(args: &RunArgs) -> Option<PathBuf> {
    if args.no_history {
        return None;
    }
    args.state_dir.clone().or_else(|| {
        (args.pin_root == std::path::Path::new(loader::DEFAULT_PIN_ROOT))
            .then(|| PathBuf::from(crate::history::store::DEFAULT_STATE_DIR))
    })
}

fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < std::time::Duration::from_millis(100) {
        return Err("at least 100ms".into());
    }
    Ok(d)
}

fn sinks(args: &RunArgs) -> Vec<SinkConfig> {
    let mut out = Vec::new();
    if !args.no_stdout {
        out.push(SinkConfig::Stdout);
    }
    if let Some(path) = &args.events_file {
        out.push(SinkConfig::File {
            path: path.clone(),
            max_bytes: args.events_file_max_mb.saturating_mul(1 << 20),
            backups: args.events_file_backups,
        });
    }
    if let Some(target) = &args.syslog {
        out.push(SinkConfig::Syslog {
            target: target.clone(),
            app_name: "envguard".to_owned(),
        });
    }
    out
}

fn parse_syslog(s: &str) -> Result<SyslogTarget, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        return Ok(SyslogTarget::Unix(PathBuf::from(path)));
    }
    if let Some(addr) = s.strip_prefix("udp:") {
        return addr
            .parse()
            .map(SyslogTarget::Udp)
            .map_err(|e| format!("invalid UDP address {addr:?}: {e}"));
    }
    Err(format!("{s:?}: expected unix:/dev/log or udp:HOST:PORT"))
}

fn group_id(name: &str) -> anyhow::Result<u32> {
    let c = std::ffi::CString::new(name).context("group name with a NUL byte")?;
    // SAFETY: valid C string; the result is read at once.
    let gr = unsafe { libc::getgrnam(c.as_ptr()) };
    if gr.is_null() {
        anyhow::bail!("no such group {name:?} (for --control-group)");
    }
    // SAFETY: non-null result of getgrnam.
    Ok(unsafe { (*gr).gr_gid })
}
