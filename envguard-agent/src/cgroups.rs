//! Everything about cgroup paths: where a path sits below another, which
//! listed cgroup decides a path's env, the attach point given on the command
//! line, and the tracking of the listed cgroups' ids as they come and go.
//! (Parsing a policy's cgroup paths is `policy::normalize_cgroup`; reading the
//! cgroup2 mount and ids is `sys`.)
use std::path::{Path, PathBuf};

use envguard_common::policy::ENV_HOST;

pub use crate::policy::{cgroup_level, normalize_cgroup};
use crate::{
    error::Diagnostic,
    policy::{Policy, compile::Compiled, lint::lint},
    sys,
};

/// The env of a cgroup path: its deepest listed ancestor's, as the kernel decides.
pub fn env_of_cgroup(path: &str, listed: &[(String, u32)]) -> u32 {
    deepest_listed(path, listed).map_or(ENV_HOST, |(_, env)| *env)
}

/// The listed (cgroup path, env id) that decides a cgroup path's env: its
/// deepest listed ancestor, the path itself included; `None` means `host`.
pub fn deepest_listed<'a>(path: &str, listed: &'a [(String, u32)]) -> Option<&'a (String, u32)> {
    listed
        .iter()
        .filter(|(c, _)| is_below(path, c))
        .max_by_key(|(c, _)| cgroup_level(c))
}

/// Accepts the attach point relative to the mount or as an absolute path under it.
pub fn normalize_root(given: &str, mount: &Path) -> String {
    let rel = Path::new(given)
        .strip_prefix(mount)
        .map(|p| format!("/{}", p.display()))
        .unwrap_or_else(|_| given.to_owned());
    let trimmed = rel.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".to_owned()
    } else {
        trimmed.to_owned()
    }
}

pub fn is_below(path: &str, root: &str) -> bool {
    root == "/" || path == root || path.starts_with(&format!("{root}/"))
}

/// Keeps `CGROUP_ENVS` in step with the policy's cgroups as they are created,
/// removed and recreated (a recreated cgroup has a new id).
pub struct CgroupTracker {
    mount: PathBuf,
    /// (path, env id, id when last seen)
    entries: Vec<(String, u32, Option<u64>)>,
}

impl CgroupTracker {
    pub fn new(mount: &Path, compiled: &Compiled) -> Self {
        let entries = compiled
            .cgroups
            .iter()
            .map(|(p, env)| (p.clone(), *env, sys::cgroup_id(&sys::cgroup_dir(mount, p))))
            .collect();
        Self {
            mount: mount.to_owned(),
            entries,
        }
    }

    pub fn present(&self) -> Vec<(u64, u32)> {
        self.entries
            .iter()
            .filter_map(|(_, env, id)| id.map(|id| (id, *env)))
            .collect()
    }

    /// Looks every path up again; the ids found, with their envs.
    pub fn rescan(&mut self) -> Vec<(u64, u32)> {
        for (path, _, id) in &mut self.entries {
            *id = sys::cgroup_id(&sys::cgroup_dir(&self.mount, path));
        }
        self.present()
    }

    pub fn known(&self) -> Vec<(String, u64)> {
        self.entries
            .iter()
            .filter_map(|(p, _, id)| id.map(|id| (p.clone(), id)))
            .collect()
    }

    /// Looks every path up again, saying what went; returns what came.
    pub fn refresh(&mut self) -> Vec<(String, u64)> {
        let mut appeared = Vec::new();
        for (path, _, id) in &mut self.entries {
            let now = sys::cgroup_id(&sys::cgroup_dir(&self.mount, path));
            if now == *id {
                continue;
            }
            if let Some(old) = *id {
                log::info!("cgroup {path} (id {old}) is gone");
            }
            if let Some(new) = now {
                appeared.push((path.clone(), new));
            }
            *id = now;
        }
        appeared
    }
}

/// Problems that do not stop a policy from loading but that an operator should
/// hear about: they usually mean it does less than intended. The policy's lint
/// warnings (`policy::lint`), then, given the cgroup2 mount, the listed cgroups
/// that do not exist yet; in file order. Each displays as `FILE:LINE: message`.
pub fn policy_warnings(policy: &Policy, cgroup_mount: Option<&Path>) -> Vec<Diagnostic> {
    let mut out = lint(policy);
    if let Some(mount) = cgroup_mount {
        out.extend(missing_cgroups(policy, mount));
        out.sort_by_key(|d| d.line);
    }
    out
}

/// The policy's cgroups that do not exist (yet) under the cgroup2 mount: a
/// fact of this host, not a fault of the file.
pub fn missing_cgroups(policy: &Policy, mount: &Path) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for env in &policy.envs {
        for (i, c) in env.cgroups.iter().enumerate() {
            if sys::cgroup_id(&sys::cgroup_dir(mount, c)).is_none() {
                // A policy directory's lines count across its files: say
                // which file and which line of it.
                let (path, line) = match env.lines.cgroups.get(i) {
                    Some(&l) => {
                        let (path, l) = policy.locate(l);
                        (path, Some(l))
                    }
                    None => (policy.path.clone(), None),
                };
                out.push(Diagnostic {
                    path,
                    line,
                    message: format!(
                        "cgroup {c} of env {} does not exist yet under {}; it will belong to {} once created",
                        env.name,
                        mount.display(),
                        env.name
                    ),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_root_accepts_both_spellings() {
        let m = Path::new("/sys/fs/cgroup/unified");
        assert_eq!(normalize_root("/", m), "/");
        assert_eq!(normalize_root("/a/b/", m), "/a/b");
        assert_eq!(normalize_root("/sys/fs/cgroup/unified/a", m), "/a");
        assert_eq!(normalize_root("/sys/fs/cgroup/unified", m), "/");
        assert!(is_below("/a/b", "/a"));
        assert!(!is_below("/ab", "/a"));
        assert!(is_below("/x", "/"));
    }

    #[test]
    fn deepest_listed_ancestor_decides() {
        let listed = vec![
            ("/a".to_owned(), 2),
            ("/a/b".to_owned(), 3),
            ("/c".to_owned(), 4),
        ];
        assert_eq!(env_of_cgroup("/a/b/x", &listed), 3);
        assert_eq!(env_of_cgroup("/a/bx", &listed), 2);
        assert_eq!(env_of_cgroup("/a", &listed), 2);
        assert_eq!(env_of_cgroup("/d", &listed), ENV_HOST);
    }
}
