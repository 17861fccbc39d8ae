//! One module per subcommand.
pub mod check;
pub mod detach;
pub mod events;
pub mod mode;
pub mod reload;
pub mod run;
pub mod status;

use std::path::Path;

use crate::{policy::Policy, sys};

/// Problems that do not stop a policy from loading but that an operator should
/// hear about: they usually mean it does less than intended.
pub fn policy_warnings(policy: &Policy, cgroup_mount: Option<&Path>) -> Vec<String> {
    let mut out = Vec::new();
    for env in &policy.envs {
        if env.cgroups.is_empty() && env.cidrs.is_empty() {
            out.push(format!(
                "env {} lists no cgroups and no CIDRs: it matches nothing",
                env.name
            ));
        }
        if let Some(mount) = cgroup_mount {
            for c in &env.cgroups {
                if sys::cgroup_id(&sys::cgroup_dir(mount, c)).is_none() {
                    out.push(format!(
                        "cgroup {c} of env {} does not exist yet under {}; it will belong to {} once created",
                        env.name,
                        mount.display(),
                        env.name
                    ));
                }
            }
        }
    }
    out
}
