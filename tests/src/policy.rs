//! The test policy, its decision table, and temporary files.

use std::path::{Path, PathBuf};

use crate::process::Proto;
use crate::sys;

/// The agent's mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Audit,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }

    /// The `verdict` of a violation event in this mode.
    pub fn verdict(self) -> &'static str {
        match self {
            Mode::Enforce => "denied",
            Mode::Audit => "audited",
        }
    }
}

/// The policy every agent test runs with. `root` is the test's cgroup tree
/// (relative to the cgroup2 mount); `prod` and `dev` are its children.
pub fn standard_policy(mode: Mode, root: &str) -> String {
    format!(
        r#"# envguard integration test policy
mode = "{mode}"

[envs.prod]
cgroups = ["{root}/prod"]
cidrs = ["198.18.10.0/24", "2001:db8:10::/48"]

[envs.dev]
cgroups = ["{root}/dev"]
cidrs = ["198.18.20.0/24", "2001:db8:20::/48"]

[envs.shared]
cidrs = ["198.18.0.0/28", "2001:db8:0:1::/64"]

[[allow]]
from = "*"
to = "shared"
ports = ["53/udp", "53/tcp", "8000-8100/tcp"]
"#,
        mode = mode.name()
    )
}

/// The envs `standard_policy` declares, as `policy_loaded` must list them.
pub const STANDARD_ENVS: [&str; 3] = ["dev", "prod", "shared"];

/// Whether traffic from env `from` to env `to` on `proto`/`port` violates
/// `standard_policy`, per the contract: same env → allowed; `host`
/// (untagged local cgroup) or `world` (address in no CIDR) on either side →
/// allowed; the `* → shared` allow rule (53/udp, 53/tcp, 8000-8100/tcp) →
/// allowed; any other pair of different declared envs → violation.
pub fn violates(from: &str, to: &str, proto: Proto, port: u16) -> bool {
    let untagged = |e: &str| e == "host" || e == "world";
    if from == to || untagged(from) || untagged(to) {
        return false;
    }
    let allowed_to_shared = port == 53 || (proto == Proto::Tcp && (8000..=8100).contains(&port));
    !(to == "shared" && allowed_to_shared)
}

/// A file under the temp dir with a unique name, removed on drop.
pub struct TempFile {
    path: PathBuf,
}

impl TempFile {
    /// Writes `contents` to `<tmp>/<prefix>-<pid>-<n><suffix>`.
    pub fn new(prefix: &str, suffix: &str, contents: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}{suffix}", sys::unique_name(prefix)));
        std::fs::write(&path, contents)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        TempFile { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            eprintln!(
                "envguard-tests: cleanup: cannot remove {}: {e}",
                self.path.display()
            );
        }
    }
}
