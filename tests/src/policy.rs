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
    standard_policy_with(mode, root, &PolicyExtras::default())
}

/// Additions to [`standard_policy`]: TOML lines inside `[envs.dev]` and
/// `[envs.prod]` (e.g. `on_agent_loss = "open"`), whole `[[allow]]` tables
/// and any other top-level tables (`[[deny]]`, `[[pair_mode]]`) appended at
/// the end, and optionally a fourth env, `staging` (CIDRs only: the
/// [`crate::Site::Staging`] addresses). The envs are [`STANDARD_ENVS`],
/// plus `staging` if asked for ([`PolicyExtras::envs`]).
#[derive(Clone, Debug, Default)]
pub struct PolicyExtras {
    pub dev: String,
    pub prod: String,
    pub allow: String,
    /// Further top-level tables, appended after `allow`.
    pub tables: String,
    /// Declare `[envs.staging]` with `cidrs = ["198.18.30.0/24", "2001:db8:30::/48"]`.
    pub staging: bool,
}

impl PolicyExtras {
    /// A `staging` env whose flows from dev are audited by a `[[pair_mode]]`
    /// while the global mode enforces: the pair-mode tests' policy.
    pub fn dev_to_staging_audited() -> PolicyExtras {
        PolicyExtras {
            staging: true,
            tables: "[[pair_mode]]\nfrom = \"dev\"\nto = \"staging\"\nmode = \"audit\"\n".into(),
            ..Default::default()
        }
    }

    /// The envs `policy_loaded` must list for a policy with these extras
    /// (sorted, as the agent lists them).
    pub fn envs(&self) -> Vec<String> {
        let mut envs: Vec<String> = STANDARD_ENVS.iter().map(|e| (*e).to_owned()).collect();
        if self.staging {
            envs.push("staging".into());
        }
        envs.sort();
        envs
    }

    /// `on_agent_loss = "<mode>"` and `agent_loss_timeout = "<timeout>"` lines.
    pub fn agent_loss(mode: &str, timeout: &str) -> String {
        format!("on_agent_loss = \"{mode}\"\nagent_loss_timeout = \"{timeout}\"\n")
    }
}

/// [`standard_policy`] with `extras`.
pub fn standard_policy_with(mode: Mode, root: &str, extras: &PolicyExtras) -> String {
    format!(
        r#"# envguard integration test policy
mode = "{mode}"

[envs.prod]
cgroups = ["{root}/prod"]
cidrs = ["198.18.10.0/24", "2001:db8:10::/48"]
{prod}
[envs.dev]
cgroups = ["{root}/dev"]
cidrs = ["198.18.20.0/24", "2001:db8:20::/48"]
{dev}

[envs.shared]
cidrs = ["198.18.0.0/28", "2001:db8:0:1::/64"]

{staging}
[[allow]]
from = "*"
to = "shared"
ports = ["53/udp", "53/tcp", "8000-8100/tcp"]
{allow}
{tables}"#,
        mode = mode.name(),
        dev = extras.dev,
        prod = extras.prod,
        allow = extras.allow,
        tables = extras.tables,
        staging = if extras.staging {
            "\n[envs.staging]\ncidrs = [\"198.18.30.0/24\", \"2001:db8:30::/48\"]\n"
        } else {
            ""
        },
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

    /// Replaces the contents (same path).
    pub fn rewrite(&self, contents: &str) {
        std::fs::write(&self.path, contents)
            .unwrap_or_else(|e| panic!("cannot rewrite {}: {e}", self.path.display()));
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
