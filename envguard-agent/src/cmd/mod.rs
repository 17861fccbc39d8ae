//! One module per subcommand.
pub mod check;
pub mod detach;
pub mod events;
pub mod explain;
pub mod mode;
pub mod reload;
pub mod run;
pub mod status;

use std::path::Path;

use crate::{
    error::Diagnostic,
    policy::{Policy, lint::lint},
    sys,
};

/// Problems that do not stop a policy from loading but that an operator should
/// hear about: they usually mean it does less than intended. The policy's lint
/// warnings (`policy::lint`), then, given the cgroup2 mount, the listed cgroups
/// that do not exist yet; in file order. Each displays as `FILE:LINE: message`.
pub fn policy_warnings(policy: &Policy, cgroup_mount: Option<&Path>) -> Vec<Diagnostic> {
    let mut out = lint(policy);
    if let Some(mount) = cgroup_mount {
        out.extend(missing_cgroups(policy, mount));
        out.sort_by(|a, b| (&a.path, a.line).cmp(&(&b.path, b.line)));
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
