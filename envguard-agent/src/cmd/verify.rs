//! `envguard verify`: probe from inside each env, compare with the policy in
//! force, and look for drift between file, agent and kernel maps.
use std::{
    net::{SocketAddr, ToSocketAddrs as _},
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    control::{PolicyReply, Request, SocketArg, StatusReply, call_typed},
    explain::{self as ex, Endpoint, Explanation},
    modes::Modes,
    policy::{
        Policy,
        compile::{compile, compile_with_ids},
        probe::ProbeProto,
    },
    verify::{
        drift::{self, Drift},
        listeners,
        plan::{self, Observed, Planned, Target},
        probe,
        report::{ProbeOutcome, Report},
    },
};

/// Prove that the kernel does what the policy says: for every local env (by
/// its first listed cgroup) and every env's `probes` target — and every
/// same-host listener of an env — run a short probe inside the env (a
/// process in a transient child cgroup, made and removed here), and compare
/// with the decision of the policy in force: refused flows must fail with
/// EPERM at once (enforce) or produce a violation record (audit); allowed
/// flows must not be refused (a timeout or connection refused from the
/// network is "allowed, unreachable"). Then compare the policy file, the
/// policy the agent loaded and the kernel's policy maps, entry by entry.
///
/// Exit status 0 only when every probe matched and no drift was found.
///
/// Examples:
///   envguard verify
///   envguard verify --netns app --junit verify.xml
///   envguard verify --policy /etc/envguard/policy.toml --dry-run
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct VerifyArgs {
    /// The policy file (or directory) to compare with [default: the one the
    /// agent runs]. With --dry-run, the policy to plan from (required).
    #[arg(long, short)]
    pub policy: Option<PathBuf>,
    /// List what would be probed and the expected matrix; send nothing, need
    /// no agent (and no root).
    #[arg(long, requires = "policy")]
    pub dry_run: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Also write a JUnit XML report (one testcase per probe) to FILE.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Run the probes in this network namespace (a name under /run/netns),
    /// and look for same-host listeners there [default: verify's own].
    #[arg(long, value_name = "NAME")]
    pub netns: Option<String>,
    /// Do not probe same-host listeners.
    #[arg(long)]
    pub no_listeners: bool,
    /// How long a TCP probe waits for the connection.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub timeout_ms: u64,
    /// How long to wait for the violation record of an audited probe.
    #[arg(long, value_name = "MS", default_value_t = 3000)]
    pub record_timeout_ms: u64,
    #[command(flatten)]
    pub socket: SocketArg,
}

/// The hidden child: `envguard verify-probe` (see `verify::probe`).
#[derive(Debug, clap::Args)]
pub struct ProbeChildArgs {
    #[arg(long)]
    pub cgroup: PathBuf,
    #[arg(long)]
    pub netns: Option<String>,
    #[arg(long)]
    pub addr: SocketAddr,
    #[arg(long)]
    pub proto: String,
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
}

pub fn probe_child(args: &ProbeChildArgs) -> anyhow::Result<()> {
    let proto = match args.proto.as_str() {
        "tcp" => ProbeProto::Tcp,
        "udp" => ProbeProto::Udp,
        p => anyhow::bail!("--proto must be tcp or udp, not {p:?}"),
    };
    let r = probe::child(
        &args.cgroup,
        args.netns.as_deref(),
        args.addr,
        proto,
        Duration::from_millis(args.timeout_ms),
    );
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
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

/// Exit status: 0 when the report is OK, 1 otherwise (errors too).
pub fn verify(args: &VerifyArgs) -> anyhow::Result<bool> {
    let report = if args.dry_run {
        dry_run(args)?
    } else {
        live(args)?
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.text());
    }
    if let Some(path) = &args.junit {
        std::fs::write(path, report.junit())
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    }
    Ok(report.ok)
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
        ex::explain(policy, &compiled, f, t, p.proto, p.port, &modes).map_err(|e| e.to_string())
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

fn dry_run(args: &VerifyArgs) -> anyhow::Result<Report> {
    let path = args.policy.as_ref().expect("clap requires --policy");
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

fn live(args: &VerifyArgs) -> anyhow::Result<Report> {
    if !crate::sys::is_root() {
        return Err(crate::error::Error::NotRoot.into());
    }
    let socket = args.socket.path();
    let run = run_id();
    let mut drift = Vec::new();
    let status = match call_quick::<StatusReply>(&socket, &Request::Status {}) {
        Ok(s) => Some(s),
        Err(e) => {
            // How long ago an agent last beat, from the pinned state.
            let beat = drift::maps_dir(&args.socket.pin_root)
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
            let reply: PolicyReply = call_typed(&socket, &Request::Policy {})?;
            let files: Vec<(PathBuf, String)> = reply
                .files
                .into_iter()
                .map(|f| (PathBuf::from(f.path), f.text))
                .collect();
            Some(Policy::reparse(Path::new(&reply.path), &files)?)
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
    let pin_root = status.as_ref().map_or_else(
        || args.socket.pin_root.clone(),
        |s| PathBuf::from(&s.pin_root),
    );
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
        Some(_) => Some(probe::watch_events(&socket)?),
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
    args: &VerifyArgs,
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
    let r = match probe::spawn_child(
        &cg.dir,
        args.netns.as_deref(),
        addr,
        proto,
        Duration::from_millis(args.timeout_ms),
    ) {
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
        out.record = probe::wait_record(seen, cg.id, Duration::from_millis(args.record_timeout_ms))
            .map(|(v, _)| v);
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

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: VerifyArgs,
    }

    #[test]
    fn dry_run_plans_from_the_file_alone() {
        let path =
            std::env::temp_dir().join(format!("envguard-verify-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "mode = \"enforce\"\n[envs.prod]\ncgroups = [\"/prod.slice\"]\ncidrs = [\"198.18.10.0/24\"]\nprobes = [\"198.18.10.5:5432/tcp\"]\n[envs.dev]\ncgroups = [\"/dev.slice\"]\n",
        )
        .unwrap();
        let cli = Cli::try_parse_from(["verify", "--policy", path.to_str().unwrap(), "--dry-run"])
            .unwrap();
        let r = dry_run(&cli.args).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(r.ok && r.dry_run);
        assert_eq!(r.mode, "enforce");
        let got: Vec<(&str, &str, &str)> = r
            .probes
            .iter()
            .map(|p| {
                (
                    p.planned.from.as_str(),
                    p.planned.to.as_str(),
                    p.planned.expect.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [("dev", "prod", "denied"), ("prod", "prod", "allowed")]
        );
        assert!(
            r.probes
                .iter()
                .all(|p| p.matched.is_none() && p.observed.is_none())
        );
        assert!(
            Cli::try_parse_from(["verify", "--dry-run"]).is_err(),
            "--dry-run needs --policy"
        );
    }
}
