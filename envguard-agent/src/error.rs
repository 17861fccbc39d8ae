//! The library's error type. Every message says what went wrong and, where
//! there is one, what to do about it.
use std::{fmt, path::PathBuf};

/// One problem in a policy file, located by line when the parser knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.path.display(), self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("reading policy {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Diagnostic>),
    #[error(
        "policy needs {needed} {what} entries in the kernel, more than the {max} envguard allocates"
    )]
    TooLarge {
        what: &'static str,
        needed: usize,
        max: u32,
    },
}

/// A pin root someone other than root could tamper with (see `pinroot`).
#[derive(Debug, thiserror::Error)]
#[error(
    "{operation}: refusing {what} {pin_root}: {path} {problem} (owner uid {uid}, mode {mode:04o}); {fix}",
    pin_root = .pin_root.display(),
    path = .path.display()
)]
pub struct UnsafePinRoot {
    /// What was being done: starting the agent, detaching.
    pub operation: String,
    /// `pin root`, or `state directory` (the history's, same rule).
    pub what: &'static str,
    pub pin_root: PathBuf,
    /// The offending component: the pin root, a directory above or below it.
    pub path: PathBuf,
    pub problem: String,
    pub uid: u32,
    pub mode: u32,
    pub fix: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(
        "envguard must run as root (it loads eBPF programs and attaches them to cgroups: CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    )]
    NotRoot,
    #[error(
        "no cgroup v2 hierarchy is mounted (none in /proc/self/mountinfo); mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup`"
    )]
    NoCgroup2,
    #[error(
        "this envguard binary was built without its kernel programs (bpf-linker was missing at build time); run `cargo xtask build` or `cargo xtask setup` first"
    )]
    NoKernelObject,
    #[error(
        "cgroup {path} does not exist; --cgroup-root must name an existing cgroup below {mount}"
    )]
    NoSuchCgroup { path: String, mount: PathBuf },
    #[error(
        "{pin_root} is not on a bpf filesystem; mount one (`mount -t bpf bpf /sys/fs/bpf`) or choose a --pin-root below one"
    )]
    NoBpffs { pin_root: PathBuf },
    #[error(
        "another envguard is already running with pin root {pin_root}; stop it first, or give this one its own --pin-root"
    )]
    AlreadyRunning { pin_root: PathBuf },
    #[error(
        "control socket {path} is in use by another agent; give this one its own --control-socket"
    )]
    ControlSocketInUse { path: PathBuf },
    #[error(transparent)]
    UnsafePinRoot(Box<UnsafePinRoot>),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{context}: {message}")]
    Bpf { context: String, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
