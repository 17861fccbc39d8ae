//! The policy: parsed from TOML, validated into a model, compiled into map entries.
//!
//! Everything here is pure: no file system beyond reading the file, no kernel.
pub mod compile;
mod file;
pub mod interfaces;
pub mod lint;
pub mod ports;
pub mod probe;
mod validate;

use validate::Validator;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnetwork::IpNetwork;
use sha2::{Digest as _, Sha256};
use toml::Spanned;

pub use ports::PortSpec;
pub use probe::ProbeTarget;

use crate::error::{Diagnostic, PolicyError};

/// Names of the implicit envs; a policy cannot declare them.
pub const HOST: &str = "host";
pub const WORLD: &str = "world";
/// The wildcard of a rule's `from` or `to`.
pub const ANY: &str = "*";

pub use envguard_common::config::Mode;

/// A mode by name, with the message a policy file or a request gets otherwise.
pub fn parse_mode(s: &str) -> Result<Mode, String> {
    Mode::from_name(s).ok_or_else(|| format!("mode must be \"audit\" or \"enforce\", not {s:?}"))
}

/// What happens to a flow involving `host` or `world` that no rule allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Default {
    Allow,
    Deny,
}

/// What the kernel does with an env's new flows once the agent has been gone
/// longer than the env's `agent_loss_timeout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnLoss {
    /// Go on enforcing the policy as it was.
    Keep,
    /// Allow every new flow involving the env.
    Open,
    /// Refuse every new flow involving the env.
    Closed,
}

impl fmt::Display for OnLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnLoss::Keep => "keep",
            OnLoss::Open => "open",
            OnLoss::Closed => "closed",
        })
    }
}

pub const DEFAULT_AGENT_LOSS_TIMEOUT: Duration = Duration::from_secs(30);
/// The agent beats once a second; a shorter timeout would trip while it lives.
pub const MIN_AGENT_LOSS_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Env {
    pub name: String,
    /// Normalised: absolute, no trailing slash, relative to the cgroup2 mount.
    pub cgroups: Vec<String>,
    pub cidrs: Vec<IpNetwork>,
    /// Interfaces whose traffic is this env's (names or `prefix*`).
    pub interfaces: Vec<interfaces::IfacePattern>,
    pub on_agent_loss: OnLoss,
    pub agent_loss_timeout: Duration,
    /// `envguard verify`'s targets in this env (its database, secrets
    /// store, DNS…): names stay names until verify resolves them.
    pub probes: Vec<ProbeTarget>,
    /// Kubernetes namespace patterns (`prod`, `prod-*`) mapped to this env
    /// for containers registered by namespace (`envguard oci-hook`).
    pub k8s_namespaces: Vec<String>,
    /// Where the env is written, for diagnostics.
    pub lines: EnvLines,
}

/// 1-based lines of an env's parts in the policy file.
#[derive(Clone, Debug, PartialEq, Eq, std::default::Default)]
pub struct EnvLines {
    /// The env's name (`[envs.NAME]`).
    pub name: usize,
    /// One per entry of `Env::cgroups`, in the same order.
    pub cgroups: Vec<usize>,
    /// One per entry of `Env::cidrs`, in the same order.
    pub cidrs: Vec<usize>,
    /// One per entry of `Env::probes`, in the same order.
    pub probes: Vec<usize>,
}

/// One side of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    Any,
    Env(String),
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Any => f.write_str(ANY),
            Selector::Env(e) => f.write_str(e),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub action: Action,
    pub from: Selector,
    pub to: Selector,
    /// `None`: any port and protocol.
    pub ports: Option<Vec<PortSpec>>,
    /// 1-based line of the rule in the file, for attribution.
    pub line: usize,
    /// `FILE:LINE` of the rule in a policy directory (`None` for a file).
    pub at: Option<String>,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} -> {}", self.action, self.from, self.to)?;
        if let Some(ports) = &self.ports {
            let ports: Vec<String> = ports.iter().map(ToString::to_string).collect();
            write!(f, " [{}]", ports.join(", "))?;
        }
        match &self.at {
            Some(at) => write!(f, " ({at})"),
            None => write!(f, " (line {})", self.line),
        }
    }
}

/// One file a policy was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub path: PathBuf,
    /// The policy's line numbers are lines of its files laid end to end, in
    /// name order: this file's line 1 is the policy's line `first_line`.
    pub first_line: usize,
}

/// A validated policy.
#[derive(Clone, Debug)]
pub struct Policy {
    /// The policy file, or the policy directory (`*.toml` merged in name
    /// order, see `Policy::load`).
    pub path: PathBuf,
    /// `sha256:<hex>` of the file's bytes; for a directory, of what
    /// `cd DIR && LC_ALL=C sha256sum *.toml` prints (`<hex>  <name>` lines in
    /// name order), so a rename, an added file or any byte changes it.
    pub revision: String,
    /// The files, in merge order (one for a policy file). Every line number
    /// in the model (rules, envs, pair modes) counts across them; `locate`
    /// turns one into a file and its own line.
    pub sources: Vec<Source>,
    pub mode: Mode,
    pub default_host: Default,
    pub default_world: Default,
    /// Sorted by name.
    pub envs: Vec<Env>,
    /// `[[allow]]` then `[[deny]]` rules, each in file order; a rule's index
    /// is its id in the kernel and in events.
    pub rules: Vec<Rule>,
    /// `[[pair_mode]]`: pairs handled in another mode than the global one.
    pub pair_modes: Vec<PairMode>,
    /// The text of each file as read (path, contents), in merge order: what
    /// the agent reports as loaded, so that `verify` can compile exactly
    /// that policy even after the file changed on disk.
    pub files: Vec<(PathBuf, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairMode {
    pub from: Selector,
    pub to: Selector,
    pub mode: Mode,
    pub line: usize,
}

impl Policy {
    /// Reads and validates a policy file, or a policy directory: its `*.toml`
    /// files (not those named `.*`, nor subdirectories: a Kubernetes
    /// ConfigMap volume's `..data` is skipped, its files' symlinks followed),
    /// merged in byte order of their names as if they were one file, except
    /// that an env, `mode` or a `[defaults]` key may be set in one file only.
    /// Errors name the file and its line.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        if path.is_dir() {
            return Policy::load_dir(path);
        }
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Policy::parse(path, &text)
    }

    fn load_dir(dir: &Path) -> Result<Policy, PolicyError> {
        let read_err = |path: &Path| {
            let path = path.to_owned();
            move |source| PolicyError::Read { path, source }
        };
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read_err(dir))? {
            let entry = entry.map_err(read_err(dir))?;
            let name = entry.file_name();
            let n = name.as_encoded_bytes();
            // metadata follows symlinks: a ConfigMap's files are links.
            if n.ends_with(b".toml")
                && !n.starts_with(b".")
                && std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file())
            {
                names.push(name);
            }
        }
        names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
        let mut files = Vec::new();
        for name in names {
            let path = dir.join(name);
            let text = std::fs::read_to_string(&path).map_err(read_err(&path))?;
            files.push((path, text));
        }
        Policy::parse_dir(dir, &files)
    }

    /// Validates the files of a policy directory, given in merge order.
    pub fn parse_dir(dir: &Path, files: &[(PathBuf, String)]) -> Result<Policy, PolicyError> {
        if files.is_empty() {
            return Err(PolicyError::Invalid(vec![Diagnostic {
                path: dir.to_owned(),
                line: None,
                message:
                    "policy directory holds no *.toml file (names starting with '.' are skipped)"
                        .to_owned(),
            }]));
        }
        // The files end to end, each ending with a newline, so that every
        // span and line number of the merged policy is unique.
        let mut text = String::new();
        let mut bases = Vec::new();
        for (_, t) in files {
            bases.push(text.len());
            text.push_str(t);
            if !t.ends_with('\n') {
                text.push('\n');
            }
        }
        let lines = Lines::new(&text);
        let sources = files
            .iter()
            .zip(&bases)
            .map(|((path, _), &base)| Source {
                path: path.clone(),
                first_line: lines.line_of(base),
            })
            .collect();
        let mut v = Validator {
            path: dir,
            text: &text,
            lines,
            errors: Vec::new(),
            sources,
            dir: true,
        };
        let mut merged: Option<file::PolicyFile> = None;
        for ((_, t), &base) in files.iter().zip(&bases) {
            match toml::from_str::<file::PolicyFile>(t) {
                Ok(f) => {
                    let f = f.shifted(base);
                    match merged.as_mut() {
                        None => merged = Some(f),
                        Some(m) => v.merge(m, f),
                    }
                }
                Err(e) => v.error(
                    e.span().map(|r| r.start + base..r.end + base),
                    e.message().to_owned(),
                ),
            }
        }
        let (Some(merged), true) = (merged, v.errors.is_empty()) else {
            return Err(v.finish());
        };
        let mut policy = v.validate(merged);
        if !v.errors.is_empty() {
            return Err(v.finish());
        }
        let mut sums = String::new();
        for (path, t) in files {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            sums.push_str(&format!("{:x}  {name}\n", Sha256::digest(t.as_bytes())));
        }
        policy.revision = format!("sha256:{:x}", Sha256::digest(sums.as_bytes()));
        policy.files = files.to_vec();
        Ok(policy)
    }

    /// Validates policy text; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Policy, PolicyError> {
        let mut v = Validator {
            path,
            text,
            lines: Lines::new(text),
            errors: Vec::new(),
            sources: vec![Source {
                path: path.to_owned(),
                first_line: 1,
            }],
            dir: false,
        };
        let file: file::PolicyFile = match toml::from_str(text) {
            Ok(f) => f,
            Err(e) => {
                v.error(e.span(), e.message().to_owned());
                return Err(v.finish());
            }
        };
        let mut policy = v.validate(file);
        policy.files = vec![(path.to_owned(), text.to_owned())];
        if v.errors.is_empty() {
            Ok(policy)
        } else {
            Err(v.finish())
        }
    }

    /// The policy again from the files it was read from (`files`): a
    /// directory's files are merged as `load` merged them.
    pub fn reparse(path: &Path, files: &[(PathBuf, String)]) -> Result<Policy, PolicyError> {
        match files {
            [(file, text)] if file == path => Policy::parse(path, text),
            _ => Policy::parse_dir(path, files),
        }
    }

    pub fn env_names(&self) -> Vec<&str> {
        self.envs.iter().map(|e| e.name.as_str()).collect()
    }

    /// The file and its own line of one of the policy's line numbers.
    pub fn locate(&self, line: usize) -> (PathBuf, usize) {
        locate(&self.sources, &self.path, line)
    }

    /// A line for a message: `line N` in a policy file, `NAME:N` in a
    /// policy directory.
    pub fn place(&self, line: usize) -> String {
        place(&self.sources, &self.path, line, self.path.is_dir())
    }
}

fn locate(sources: &[Source], fallback: &Path, line: usize) -> (PathBuf, usize) {
    match sources.iter().rev().find(|s| s.first_line <= line) {
        Some(s) => (s.path.clone(), line - s.first_line + 1),
        None => (fallback.to_owned(), line),
    }
}

fn place(sources: &[Source], fallback: &Path, line: usize, dir: bool) -> String {
    if !dir {
        return format!("line {line}");
    }
    let (path, line) = locate(sources, fallback, line);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    format!("{name}:{line}")
}

/// A cgroup path as the policy holds it: absolute below the cgroup2 mount, no
/// empty parts, no trailing slash (`/a//b/` is `/a/b`); `.`, `..`, relative
/// paths and paths deeper than the kernel resolves are refused.
pub fn normalize_cgroup(s: &str) -> Result<String, String> {
    if !s.starts_with('/') {
        return Err(format!(
            "cgroup {s:?} must be an absolute path below the cgroup2 mount, e.g. \"/prod.slice\""
        ));
    }
    if s.split('/').any(|part| part == "." || part == "..") {
        return Err(format!("cgroup {s:?} must not contain '.' or '..'"));
    }
    let mut normal = String::from("/");
    normal.push_str(
        &s.split('/')
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join("/"),
    );
    let depth = cgroup_level(&normal);
    if depth > envguard_common::config::MAX_CGROUP_LEVEL {
        return Err(format!(
            "cgroup {s:?} is {depth} levels deep; envguard resolves at most {} levels",
            envguard_common::config::MAX_CGROUP_LEVEL
        ));
    }
    Ok(normal)
}

/// Level of a cgroup path below the root, which is level 0.
pub fn cgroup_level(path: &str) -> u32 {
    path.split('/').filter(|p| !p.is_empty()).count() as u32
}

/// 1-based line of a byte offset.
/// 1-based line numbers of byte offsets, from an index of line starts built
/// once: a policy of 100 000 CIDRs asks for 100 000 of them.
struct Lines(Vec<usize>);

impl Lines {
    fn new(text: &str) -> Lines {
        let starts = std::iter::once(0)
            .chain(
                text.bytes()
                    .enumerate()
                    .filter(|&(_, b)| b == b'\n')
                    .map(|(i, _)| i + 1),
            )
            .collect();
        Lines(starts)
    }

    fn line_of(&self, offset: usize) -> usize {
        self.0.partition_point(|&start| start <= offset)
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod dir_tests;
