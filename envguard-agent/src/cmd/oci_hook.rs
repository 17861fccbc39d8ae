//! `envguard oci-hook`: the OCI runtime hook that registers a container's
//! cgroup with the running agent before the container's process starts.
use std::{io::Read as _, time::Duration};

use anyhow::{Context as _, bail};

use crate::{
    containers::{
        self, ContainerRef, DEFAULT_ENV_KEY, HookState, K8S_NAMESPACE_KEY, RegisterRequest,
        Registered,
    },
    control::{Request, Response, SocketArg},
};

/// Largest container state read from stdin.
const MAX_STATE: u64 = 1 << 20;

/// OCI hook (`createRuntime` stage, which runs in the runtime's namespaces,
/// where the agent's control socket is): reads the
/// container's state from stdin, and if its annotations name an env (or a
/// Kubernetes namespace), registers its cgroup with the running agent and
/// waits for the agent's answer, so the container is in its env from its
/// first packet. A container without them is left alone (exit 0). If the
/// agent is not running or refuses, the hook fails, and so does the
/// container's start, unless --fail-open.
#[derive(Debug, clap::Args)]
pub struct OciHookArgs {
    /// The annotation (or label the runtime passes as one) naming the env.
    #[arg(long, value_name = "KEY", default_value = DEFAULT_ENV_KEY)]
    pub key: String,
    /// The annotation naming the Kubernetes namespace, mapped to an env by the
    /// agent's policy (`[envs.X] k8s_namespaces`).
    #[arg(long, value_name = "KEY", default_value = K8S_NAMESPACE_KEY)]
    pub k8s_namespace_key: String,
    /// Let the container start when it cannot be registered (no agent, or
    /// the agent refused): it then runs as `host` until the agent, at its
    /// next start, finds it.
    #[arg(long)]
    pub fail_open: bool,
    /// How long to wait for the agent's answer.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub socket: SocketArg,
}

pub fn oci_hook(args: &OciHookArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut input = Vec::new();
    std::io::stdin()
        .take(MAX_STATE + 1)
        .read_to_end(&mut input)
        .context("reading the container state from stdin")?;
    if input.len() as u64 > MAX_STATE {
        bail!("container state on stdin is larger than {MAX_STATE} bytes");
    }
    let state: HookState = serde_json::from_slice(&input)
        .context("reading the container state from stdin (an OCI runtime's hook state)")?;
    let annotations = state.annotations();
    let Some(claim) = containers::claim(&annotations, &args.key, &args.k8s_namespace_key) else {
        return Ok(());
    };
    let result = register(args, &state, &annotations, claim);
    match result {
        Ok(r) => {
            log::info!(
                "container {} ({}) registered in env {} (cgroup {}) in {} us",
                r.container.name,
                r.container.id,
                r.env,
                r.cgroup,
                started.elapsed().as_micros()
            );
            Ok(())
        }
        Err(e) if args.fail_open => {
            log::warn!(
                "container {} not registered, starting anyway (--fail-open): {e:#}",
                state.id
            );
            Ok(())
        }
        Err(e) => Err(e.context(format!(
            "container {} not registered with envguard; refusing its start (fail closed; --fail-open lets it start)",
            state.id
        ))),
    }
}

fn register(
    args: &OciHookArgs,
    state: &HookState,
    annotations: &std::collections::BTreeMap<String, String>,
    claim: containers::Claim,
) -> anyhow::Result<Registered> {
    let pid = state
        .pid
        .filter(|&p| p > 0)
        .context("the container state has no pid: run the hook at the createRuntime stage")?;
    let cgroup = containers::cgroup_of_pid(pid)
        .with_context(|| format!("finding the cgroup of the container's process {pid}"))?;
    let request = Request::Register(RegisterRequest {
        cgroup,
        claim,
        container: ContainerRef {
            id: state.id.clone(),
            name: containers::container_name(&state.id, &state.bundle, annotations),
        },
    });
    let socket = args.socket.path();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let answer = rt
        .block_on(async {
            tokio::time::timeout(args.timeout, crate::control::call(&socket, &request)).await
        })
        .map_err(|_| anyhow::anyhow!("the agent did not answer within {:?}", args.timeout))??
        .0;
    match answer {
        Response {
            ok: true,
            result: Some(r),
            ..
        } => Ok(serde_json::from_value(r)?),
        Response { error, .. } => bail!(
            "the agent refused: {}",
            error.unwrap_or_else(|| "no reason given".to_owned())
        ),
    }
}
