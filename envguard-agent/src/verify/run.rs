//! Running `envguard verify`: the plan against the policy in force (the
//! agent's, or a file's offline), the probes, the drift checks; the
//! subcommand (`cmd::verify`) only parses arguments and prints the report.
use std::{
    net::{SocketAddr, ToSocketAddrs as _},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;

use super::{
    drift::{self, Drift},
    listeners,
    plan::{self, Observed, Planned, Target},
    probe,
    report::{ProbeOutcome, Report},
};
use crate::{
    control::{PolicyReply, Request, StatusReply, call_typed},
    explain::{self as ex, Endpoint, Explanation},
    modes::Modes,
    policy::{
        Policy,
        compile::{compile, compile_with_ids},
        probe::ProbeProto,
    },
};

/// What a verify run is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// The policy to compare with (default: the agent's); required offline.
    pub policy: Option<PathBuf>,
    /// Probes run in this network namespace (`/run/netns/NAME`).
    pub netns: Option<String>,
    pub no_listeners: bool,
    /// A TCP probe's connect timeout.
    pub timeout: Duration,
    /// How long to wait for an audited probe's violation record.
    pub record_timeout: Duration,
    /// The agent's control socket and pin root.
    pub socket: PathBuf,
    pub pin_root: PathBuf,
}

/// How long verify waits for the agent's answer to `status`: a stopped or
/// hung agent accepts connections (the kernel's backlog) but never answers.
const AGENT_ANSWER: Duration = Duration::from_secs(5);

/// One request, answered within [`AGENT_ANSWER`].
fn call_quick<T: serde::de::DeserializeOwned>(
    socket: &Path,
    request: &Request,
) -> anyhow::Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (response, _) = rt
        .block_on(async {
            tokio::time::timeout(AGENT_ANSWER, crate::control::call(socket, request)).await
        })
        .map_err(|_| {
            anyhow::anyhow!("no answer on {} within {AGENT_ANSWER:?}", socket.display())
        })??;
    if !response.ok {
        anyhow::bail!("{}", response.error.unwrap_or_default());
    }
    Ok(serde_json::from_value(response.result.unwrap_or_default())?)
}

fn run_id() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("verify-{}-{}", now.as_secs(), std::process::id())
}

fn resolve(name: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    (name, port)
        .to_socket_addrs()
        .map(Iterator::collect)
        .map_err(|e| format!("cannot resolve {name}: {e}"))
}

fn offline_decider(
    policy: &Policy,
) -> anyhow::Result<
    impl FnMut(&Endpoint, &Endpoint, ex::PortProto) -> Result<Explanation, String> + '_,
> {
    let compiled = compile(policy)?;
    let modes = Modes::from_policy(policy);
    Ok(move |f: &Endpoint, t: &Endpoint, p: ex::PortProto| {
        ex::explain(
            policy,
            &compiled,
            f,
            t,
            p.proto,
            p.port,
            &ex::State::offline(&modes),
        )
        .map_err(|e| e.to_string())
    })
}

fn planned_only(p: Planned) -> ProbeOutcome {
    ProbeOutcome {
        outcome: format!("expect {}", p.expect),
        planned: p,
        observed: None,
        record: None,
        matched: None,
        ms: None,
        cgroup_id: None,
    }
}

pub fn dry_run(args: &Options) -> anyhow::Result<Report> {
    let Some(path) = args.policy.as_ref() else {
        anyhow::bail!("a dry run needs --policy FILE");
    };
    let policy = Policy::load(path)?;
    let targets = plan::policy_targets(&policy, resolve);
    let planned = plan::plan(
        &plan::local_envs(&policy),
        &targets,
        offline_decider(&policy)?,
    );
    Ok(Report::new(
        run_id(),
        true,
        path.display().to_string(),
        policy.revision.clone(),
        policy.mode.to_string(),
        planned.into_iter().map(planned_only).collect(),
        Vec::new(),
    ))
}

pub fn live(args: &Options) -> anyhow::Result<Report> {
    if !crate::sys::is_root() {
        return Err(crate::error::Error::NotRoot.into());
    }
    let socket = args.socket.clone();
    let run = run_id();
    let mut drift = Vec::new();
    let status = match call_quick::<StatusReply>(&socket, &Request::Status {}) {
        Ok(s) => Some(s),
        Err(e) => {
            // How long ago an agent last beat, from the pinned state.
            let beat = drift::maps_dir(&args.pin_root)
                .and_then(|d| drift::heartbeat_age(&d))
                .map_or_else(
                    |_| String::new(),
                    |age| match age {
                        Some(a) => format!(
                            "; its last heartbeat is {} old",
                            humantime::format_duration(std::time::Duration::from_secs(a.as_secs()))
                        ),
                        None => "; no agent ever beat on this pin root".to_owned(),
                    },
                );
            drift.push(Drift::new(
                "agent",
                format!("agent is stale or not running: {e:#}{beat}"),
            ));
            None
        }
    };
    let file_path = match (&args.policy, &status) {
        (Some(p), _) => p.clone(),
        (None, Some(s)) => PathBuf::from(&s.policy),
        (None, None) => anyhow::bail!(
            "no agent answers on {} and no --policy given: nothing to verify against",
            socket.display()
        ),
    };
    let file = Policy::load(&file_path);
    // The policy in force: what the agent loaded (as its files read then).
    let loaded = match &status {
        Some(_) => {
            let reply: PolicyReply = call_typed(&socket, &Request::Policy {})
                .context("asking the agent for the policy it loaded")?;
            let files: Vec<(PathBuf, String)> = reply
                .files
                .into_iter()
                .map(|f| (PathBuf::from(f.path), f.text))
                .collect();
            Some(
                Policy::reparse(Path::new(&reply.path), &files)
                    .context("reading the policy the agent reports as loaded")?,
            )
        }
        None => None,
    };
    match (&file, &loaded, &status) {
        (Err(e), _, _) => drift.push(Drift::new(
            "policy_file",
            format!("policy file {} cannot be loaded: {e}", file_path.display()),
        )),
        (Ok(f), Some(l), Some(s)) => {
            if Path::new(&s.policy) != file_path {
                drift.push(Drift::new(
                    "agent",
                    format!(
                        "the agent runs policy {}, not {}",
                        s.policy,
                        file_path.display()
                    ),
                ));
            } else if f.revision != s.revision || f.revision != l.revision {
                drift.push(Drift::new(
                    "policy_file",
                    format!(
                        "policy file changed since the agent loaded it (reload?): {} is {}, the agent loaded {}",
                        file_path.display(),
                        f.revision,
                        s.revision
                    ),
                ));
            }
        }
        _ => {}
    }
    let in_force: &Policy = match (&loaded, &file) {
        (Some(l), _) => l,
        (None, Ok(f)) => f,
        (None, Err(e)) => anyhow::bail!("no policy to verify against: {e}"),
    };

    // The kernel maps of the slot in force against the loaded policy.
    let pin_root = status
        .as_ref()
        .map_or_else(|| args.pin_root.clone(), |s| PathBuf::from(&s.pin_root));
    match kernel_drift(&pin_root, in_force, status.as_ref()) {
        Ok(d) => drift.extend(d),
        Err(e) => drift.push(Drift::new("kernel", format!("kernel maps not read: {e:#}"))),
    }

    // The probes.
    let mount = crate::sys::cgroup2_mount()?;
    let mut targets = plan::policy_targets(in_force, resolve);
    let compiled = compile(in_force)?;
    if !args.no_listeners {
        let ns_path = match &args.netns {
            Some(n) => PathBuf::from("/run/netns").join(n),
            None => PathBuf::from("/proc/self/ns/net"),
        };
        let ns = std::fs::metadata(&ns_path)
            .map(|m| format!("net:[{}]", std::os::unix::fs::MetadataExt::ino(&m)))
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", ns_path.display()))?;
        for l in listeners::discover(
            &compiled.cgroups,
            |id| compiled.env_name(id).to_owned(),
            &ns,
        ) {
            targets.push(Target {
                label: l.label(),
                kind: "listener".to_owned(),
                listed_in: l.env.clone(),
                addr: Ok(listeners::reach(l.local)),
                proto: l.proto,
                dest: Some(Endpoint::Cgroup(l.cgroup.clone())),
            });
        }
    }
    let locals = plan::local_envs(in_force);
    let planned = if status.is_some() {
        plan::plan(&locals, &targets, |f, t, p| {
            call_typed::<Explanation>(
                &socket,
                &Request::Explain {
                    from: f.to_string(),
                    to: t.to_string(),
                    port: p.to_string(),
                },
            )
            .map_err(|e| format!("{e:#}"))
        })
    } else {
        plan::plan(&locals, &targets, offline_decider(in_force)?)
    };
    let seen = match status {
        Some(_) => Some(
            probe::watch_events(&socket)
                .context("subscribing to the agent's events (audited probes need their records)")?,
        ),
        None => None,
    };
    let mut outcomes = Vec::new();
    for p in planned {
        outcomes.push(run_one(args, &run, &socket, &mount, seen.as_ref(), p));
    }
    let mode = status
        .as_ref()
        .map_or_else(|| in_force.mode.to_string(), |s| s.mode.to_string());
    Ok(Report::new(
        run,
        false,
        file_path.display().to_string(),
        in_force.revision.clone(),
        mode,
        outcomes,
        drift,
    ))
}

fn run_one(
    args: &Options,
    run: &str,
    socket: &Path,
    mount: &Path,
    seen: Option<&probe::Seen>,
    p: Planned,
) -> ProbeOutcome {
    let mut out = planned_only(p);
    let fail = |out: &mut ProbeOutcome, why: String| {
        let (ok, text) = plan::judge(&out.planned.expect, Observed::NotRun, &why, None);
        out.observed = Some(Observed::NotRun);
        out.matched = Some(ok);
        out.outcome = text;
    };
    let Some(addr) = out
        .planned
        .addr
        .as_ref()
        .and_then(|a| a.parse::<SocketAddr>().ok())
    else {
        let why = out
            .planned
            .note
            .clone()
            .unwrap_or_else(|| "no address".into());
        fail(&mut out, why);
        return out;
    };
    let proto = if out.planned.proto == "udp" {
        ProbeProto::Udp
    } else {
        ProbeProto::Tcp
    };
    let parent = crate::sys::cgroup_dir(mount, &out.planned.cgroup);
    let cg = match probe::TransientCgroup::create(
        &parent,
        &format!("envguard-{run}-{}", out.planned.id),
    ) {
        Ok(c) => c,
        Err(e) => {
            fail(&mut out, format!("{e:#}"));
            return out;
        }
    };
    out.cgroup_id = Some(cg.id);
    if seen.is_some()
        && let Err(e) = call_typed::<serde_json::Value>(
            socket,
            &Request::ProbeMark {
                cgroup_id: cg.id,
                run: run.to_owned(),
                ttl_secs: Some(600),
            },
        )
    {
        log::warn!("the agent did not take the probe mark: {e:#}");
    }
    let r = match probe::spawn_child(&cg.dir, args.netns.as_deref(), addr, proto, args.timeout) {
        Ok(r) => r,
        Err(e) => {
            fail(&mut out, format!("{e:#}"));
            return out;
        }
    };
    out.ms = Some(r.ms);
    out.observed = Some(r.observed);
    // An audited flow must be reported; wait for its record.
    if out.planned.expect == "audited"
        && r.observed != Observed::Eperm
        && let Some(seen) = seen
    {
        out.record = probe::wait_record(seen, cg.id, args.record_timeout).map(|(v, _)| v);
    }
    let (ok, text) = plan::judge(
        &out.planned.expect,
        r.observed,
        &r.detail,
        out.record.as_deref(),
    );
    out.matched = Some(ok);
    out.outcome = text;
    out
}

fn kernel_drift(
    pin_root: &Path,
    policy: &Policy,
    status: Option<&StatusReply>,
) -> anyhow::Result<Vec<Drift>> {
    let dir = drift::maps_dir(pin_root)?;
    let (slot, names) = drift::read_ids(&dir)?;
    let compiled = compile_with_ids(policy, &names)?;
    let pairs: Vec<(String, String, String)> = match status {
        Some(s) => s
            .pairs
            .iter()
            .filter(|p| p.mode_source != crate::control::ModeSource::Global)
            .map(|p| (p.from.clone(), p.to.clone(), p.mode.to_string()))
            .collect(),
        None => Modes::from_policy(policy)
            .kernel_pairs(&compiled)
            .into_iter()
            .map(|(k, m)| {
                (
                    compiled.env_name(k.src_env).to_owned(),
                    compiled.env_name(k.dst_env).to_owned(),
                    if m == envguard_common::config::MODE_ENFORCE {
                        "enforce"
                    } else {
                        "audit"
                    }
                    .to_owned(),
                )
            })
            .collect(),
    };
    let mut want = drift::expected(&compiled, slot, &pairs);
    want.mode = status.map(|s| s.mode.to_string());
    let got = drift::read_kernel(&dir, slot, &names)?;
    Ok(drift::compare(&want, &got))
}
