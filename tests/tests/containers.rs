//! Containers in envs through the OCI hook, with real podman (runc) and
//! busybox containers: `envguard oci-hook` registers an annotated
//! container's cgroup with the agent before its process starts, so its very
//! first connect is judged in its env; no agent means no start (fail
//! closed) unless `--fail-open`; registrations survive an agent restart and
//! go with the container; Kubernetes namespaces map to envs through the
//! policy; and Scenario A: a dev app cannot reach a prod database on another
//! container network, with nothing configured but labels and env names.

use std::time::Duration;

use envguard_tests::podman::{Container, Pod, now_unix_ns, output, unix_ns};
use envguard_tests::{Agent, AgentOptions, CgroupTree, Mode, PinRoot, TempFile};
use serde_json::Value;

const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

fn start_agent(policy: &TempFile, tree: &CgroupTree, pin: &PinRoot, opts: AgentOptions) -> Agent {
    Agent::start(
        policy.path(),
        &tree.rel(""),
        Mode::Enforce,
        pin.path(),
        &AgentOptions {
            envs: Some(vec!["dev".into(), "prod".into()]),
            ..opts
        },
    )
}

/// The agent's hook arguments: its pin root names its control socket.
fn hook_args(pin: &PinRoot) -> Vec<String> {
    vec!["--pin-root".into(), pin.path().display().to_string()]
}

fn install_hook(pod: &Pod, pin: &PinRoot, extra: &[&str]) {
    let mut args = hook_args(pin);
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    pod.install_hook(&refs);
}

fn violation_to(agent: &Agent, ip: &str) -> Value {
    agent
        .wait_for(&format!("a violation to {ip}"), EVENT_TIMEOUT, |v| {
            v["kind"] == "violation" && v["destination"]["ip"] == ip
        })
        .1
}

/// `podman run --name C --network NETWORK [--annotation A]... [-d] COMMAND`,
/// waited for; `what` names it in a failure.
fn run_in(
    pod: &Pod,
    c: &Container,
    network: &str,
    annotations: &[&str],
    detach: bool,
    command: &[&str],
    what: &str,
) -> std::process::Output {
    let mut extra = vec!["--name", c.name.as_str(), "--network", network];
    for a in annotations {
        extra.extend(["--annotation", a]);
    }
    if detach {
        extra.push("-d");
    }
    output(&mut pod.run_cmd(&extra, command), what)
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_eperm(o: &std::process::Output, what: &str) {
    assert!(
        !o.status.success() && stderr(o).contains("Operation not permitted"),
        "{what}: expected EPERM at connect, got {} stdout {:?} stderr {:?}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        stderr(o)
    );
}

fn registered(agent: &Agent) -> Vec<Value> {
    agent.status()["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The hook's own figure for one registration (it logs `... in N us`).
fn hook_micros(pod: &Pod) -> Vec<u64> {
    std::fs::read_to_string(pod.hook_log())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(" in ").last()?.strip_suffix(" us")?.parse().ok())
        .collect()
}

/// (a) A container annotated `envguard.env=dev` is dev from its first
/// packet: its first connect, to a prod address, is refused, and the
/// violation names it.
#[test]
fn annotated_container_is_in_its_env_from_its_first_packet() {
    let tree = CgroupTree::create();
    let pin = PinRoot::new();
    let pod = Pod::new(&tree);
    let prod_ip = pod.block.net(3, 10).to_string();
    let prod_ip6 = pod.block.net6(3, 10).to_string();
    let policy = TempFile::new(
        "envguard-oci",
        ".toml",
        &format!(
            "mode = \"enforce\"\n[envs.dev]\n[envs.prod]\ncidrs = [\"{prod_ip}/32\", \"{prod_ip6}/128\"]\n"
        ),
    );
    let agent = start_agent(&policy, &tree, &pin, AgentOptions::ephemeral());
    install_hook(&pod, &pin, &[]);
    let net = pod.network("dev", 0);
    let app = pod.container("app");
    let started = now_unix_ns();
    let out = run_in(
        &pod,
        &app,
        &net.name,
        &["envguard.env=dev"],
        false,
        &["/bin/busybox", "nc", "-w", "2", &prod_ip, "5432"],
        "podman run",
    );
    assert_eperm(&out, "the dev container's first connect to prod");
    let v = violation_to(&agent, &prod_ip);
    let id = app.id();
    assert_eq!(v["verdict"], "denied", "{v}");
    assert_eq!(v["hook"], "connect4", "{v}");
    assert_eq!(v["source"]["env"], "dev", "{v}");
    assert_eq!(v["source"]["env_from"], "cgroup", "{v}");
    assert_eq!(v["source"]["container"]["id"], id.as_str(), "{v}");
    assert_eq!(v["source"]["container"]["name"], app.name.as_str(), "{v}");
    assert_eq!(v["destination"]["env"], "prod", "{v}");
    assert_eq!(v["destination"]["env_from"], "cidr", "{v}");
    assert_eq!(v["destination"]["port"], 5432, "{v}");
    assert!(v["destination"].get("container").is_none(), "{v}");
    assert_eq!(v["process"]["comm"], "busybox", "{v}");
    let cgroup = v["process"]["cgroup"].as_str().unwrap_or_default();
    assert!(
        cgroup.starts_with(&tree.rel("")) && cgroup.contains(&id),
        "the process's cgroup {cgroup} is the container's, below {}",
        tree.rel("")
    );
    let judged_ms = (unix_ns(v["time"].as_str().unwrap()) - started) as f64 / 1e6;
    let hook_us = hook_micros(&pod);
    assert_eq!(hook_us.len(), 1, "one registration logged by the hook");
    eprintln!(
        "podman run -> first packet judged (dev, denied): {judged_ms:.0} ms; hook: {} us",
        hook_us[0]
    );
    // The same over IPv6, from a second container's first packet.
    let app6 = pod.container("app6");
    let out = run_in(
        &pod,
        &app6,
        &net.name,
        &["envguard.env=dev"],
        false,
        &["/bin/busybox", "nc", "-w", "2", &prod_ip6, "5432"],
        "podman run",
    );
    assert_eperm(&out, "the dev container's first connect to prod over IPv6");
    let v = violation_to(&agent, &prod_ip6);
    assert_eq!(v["hook"], "connect6", "{v}");
    assert_eq!(v["source"]["env"], "dev", "{v}");
    assert_eq!(v["source"]["container"]["id"], app6.id().as_str(), "{v}");
    assert_eq!(v["destination"]["env"], "prod", "{v}");
    // It exited: runc removed its cgroup, and the agent forgets it (its
    // poll runs every second).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !registered(&agent).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "an exited container's registration is forgotten: {:?}",
            registered(&agent)
        );
    }
    // An unannotated container is left alone: host, allowed to prod by the
    // defaults, and not registered.
    let plain = pod.container("plain");
    let out = run_in(
        &pod,
        &plain,
        &net.name,
        &[],
        false,
        &["/bin/busybox", "nc", "-w", "1", &prod_ip, "5432"],
        "podman run",
    );
    assert!(
        !stderr(&out).contains("Operation not permitted"),
        "an unannotated container is host: {}",
        stderr(&out)
    );
    assert_eq!(
        hook_micros(&pod).len(),
        2,
        "the hook registered nothing more"
    );
    agent.stop();
}

/// (b) No agent: the hook fails the container's start; with --fail-open
/// it starts. The agent, when it starts, finds the running annotated
/// container from runc's state and registers it.
#[test]
fn no_agent_fails_closed_unless_fail_open_and_the_agent_finds_it_later() {
    let tree = CgroupTree::create();
    let pin = PinRoot::new();
    let pod = Pod::new(&tree);
    let prod_ip = pod.block.net(3, 10).to_string();
    install_hook(&pod, &pin, &[]);
    let refused = pod.container("refused");
    let out = run_in(
        &pod,
        &refused,
        "none",
        &["envguard.env=dev"],
        false,
        &["/bin/busybox", "true"],
        "podman run",
    );
    assert!(
        !out.status.success(),
        "without an agent the container must not start: {}",
        stderr(&out)
    );
    let log = std::fs::read_to_string(pod.hook_log()).unwrap_or_default();
    assert!(
        log.contains("not registered with envguard; refusing its start"),
        "the hook says why: {log}"
    );
    // Unannotated containers start whatever the agent does.
    let plain = pod.container("plain");
    let out = run_in(
        &pod,
        &plain,
        "none",
        &[],
        false,
        &["/bin/busybox", "true"],
        "podman run",
    );
    assert!(out.status.success(), "{}", stderr(&out));

    install_hook(&pod, &pin, &["--fail-open"]);
    let net = pod.network("dev", 0);
    let early = pod.container("early");
    let out = run_in(
        &pod,
        &early,
        &net.name,
        &["envguard.env=dev"],
        true,
        &["/bin/busybox", "sleep", "600"],
        "podman run",
    );
    assert!(
        out.status.success(),
        "--fail-open lets it start: {}",
        stderr(&out)
    );
    let policy = TempFile::new(
        "envguard-oci",
        ".toml",
        &format!("mode = \"enforce\"\n[envs.dev]\n[envs.prod]\ncidrs = [\"{prod_ip}/32\"]\n"),
    );
    let agent = start_agent(&policy, &tree, &pin, AgentOptions::ephemeral());
    let id = early.id();
    let listed = registered(&agent);
    assert!(
        listed
            .iter()
            .any(|c| c["container"]["id"] == id.as_str() && c["env"] == "dev"),
        "the agent found the running container at start: {listed:?}"
    );
    assert_eperm(
        &early.exec(&["/bin/busybox", "nc", "-w", "2", &prod_ip, "5432"]),
        "the found container connecting to prod",
    );
    let v = violation_to(&agent, &prod_ip);
    assert_eq!(v["source"]["env"], "dev", "{v}");
    assert_eq!(v["source"]["container"]["id"], id.as_str(), "{v}");
    agent.stop();
}

/// (c) A registration survives an agent restart (pinned), and is forgotten
/// when the container is removed.
#[test]
fn registration_survives_restart_and_goes_with_the_container() {
    let tree = CgroupTree::create();
    let pin = PinRoot::new();
    let pod = Pod::new(&tree);
    let prod_ip = pod.block.net(3, 10).to_string();
    let policy = TempFile::new(
        "envguard-oci",
        ".toml",
        &format!("mode = \"enforce\"\n[envs.dev]\n[envs.prod]\ncidrs = [\"{prod_ip}/32\"]\n"),
    );
    let agent = start_agent(&policy, &tree, &pin, AgentOptions::pinned());
    install_hook(&pod, &pin, &[]);
    let net = pod.network("dev", 0);
    let app = pod.container("app");
    let out = run_in(
        &pod,
        &app,
        &net.name,
        &["envguard.env=dev"],
        true,
        &["/bin/busybox", "sleep", "600"],
        "podman run",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let id = app.id();
    assert_eq!(registered(&agent).len(), 1);
    let human = agent.cli(&["status"], None);
    human.assert_ok("envguard status");
    assert!(
        human
            .stdout
            .lines()
            .any(|l| l.contains("dev") && l.contains(&app.name) && l.contains(&id[..12])),
        "the human status lists the container: {}",
        human.stdout
    );
    // A reload writes the other slot of the policy maps: the registration
    // must be there too (by env name).
    agent.cli(&["reload"], None).assert_ok("envguard reload");
    assert_eperm(
        &app.exec(&["/bin/busybox", "nc", "-w", "2", &prod_ip, "5432"]),
        "the registered container after a reload",
    );
    agent.stop();

    let agent = start_agent(&policy, &tree, &pin, AgentOptions::pinned().adopting());
    let listed = registered(&agent);
    assert!(
        listed.len() == 1
            && listed[0]["container"]["id"] == id.as_str()
            && listed[0]["env"] == "dev",
        "the restarted agent keeps the registration: {listed:?}"
    );
    assert_eperm(
        &app.exec(&["/bin/busybox", "nc", "-w", "2", &prod_ip, "5432"]),
        "the registered container after the restart",
    );
    let v = violation_to(&agent, &prod_ip);
    assert_eq!(v["source"]["env"], "dev", "{v}");
    assert_eq!(v["source"]["container"]["name"], app.name.as_str(), "{v}");

    app.remove();
    // The agent's cgroup poll runs every second.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let listed = registered(&agent);
        if listed.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "removing the container forgets its registration: {listed:?}"
        );
    }
    agent.stop();
}

/// (d) Kubernetes namespaces map to envs through the policy: a container of
/// namespace `prod-x` is prod by `k8s_namespaces = ["prod-*"]`; one whose
/// namespace maps to no env is refused its start.
#[test]
fn k8s_namespace_maps_through_the_policy() {
    let tree = CgroupTree::create();
    let pin = PinRoot::new();
    let pod = Pod::new(&tree);
    let dev_ip = pod.block.net(3, 20).to_string();
    let policy = TempFile::new(
        "envguard-oci",
        ".toml",
        &format!(
            "mode = \"enforce\"\n[envs.dev]\ncidrs = [\"{dev_ip}/32\"]\n[envs.prod]\nk8s_namespaces = [\"prod\", \"prod-*\"]\n"
        ),
    );
    let agent = start_agent(&policy, &tree, &pin, AgentOptions::ephemeral());
    install_hook(&pod, &pin, &[]);
    let net = pod.network("k8s", 0);
    let app = pod.container("api");
    // The env annotation is written by the pod's authors: the namespace
    // decides, not it.
    let out = run_in(
        &pod,
        &app,
        &net.name,
        &["io.kubernetes.pod.namespace=prod-x", "envguard.env=dev"],
        false,
        &["/bin/busybox", "nc", "-w", "2", &dev_ip, "8080"],
        "podman run",
    );
    assert_eperm(&out, "the prod-x container's connect to dev");
    let v = violation_to(&agent, &dev_ip);
    assert_eq!(v["source"]["env"], "prod", "{v}");
    assert_eq!(v["source"]["env_from"], "cgroup", "{v}");
    assert_eq!(v["destination"]["env"], "dev", "{v}");
    assert_eq!(v["source"]["container"]["id"], app.id().as_str(), "{v}");

    let stray = pod.container("stray");
    let out = run_in(
        &pod,
        &stray,
        "none",
        &["io.kubernetes.pod.namespace=kube-system"],
        false,
        &["/bin/busybox", "true"],
        "podman run",
    );
    assert!(
        !out.status.success(),
        "a namespace that maps to no env is refused (fail closed)"
    );
    let log = std::fs::read_to_string(pod.hook_log()).unwrap_or_default();
    assert!(
        log.contains("k8s namespace \"kube-system\" maps to no env"),
        "the agent says why: {log}"
    );
    agent.stop();
}

/// Scenario A: `dev-network` and `production-network`; a database listener
/// on production-network labelled prod; an app on dev-network labelled dev
/// is refused at connect, and the violation names both sides' envs, the
/// app container and its process; an app on production-network labelled
/// prod reaches the database; with the pair switched to audit, a dev app
/// reaches it too and is reported. The policy has env names and allow rules
/// only: no CIDRs, no cgroups. (The database's env comes from its
/// address: the endpoints feature.)
#[test]
fn scenario_a_dev_app_cannot_reach_the_prod_database() {
    let tree = CgroupTree::create();
    let pin = PinRoot::new();
    let pod = Pod::new(&tree);
    let policy = TempFile::new(
        "envguard-oci",
        ".toml",
        "mode = \"enforce\"\n[envs.dev]\n[envs.prod]\n\n[[allow]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"443/tcp\"]\n",
    );
    let agent = start_agent(&policy, &tree, &pin, AgentOptions::ephemeral());
    install_hook(&pod, &pin, &[]);
    let dev_net = pod.network("dev-network", 0);
    let prod_net = pod.network("production-network", 1);
    let db = pod.container("database");
    let out = run_in(
        &pod,
        &db,
        &prod_net.name,
        &["envguard.env=prod"],
        true,
        &[
            "/bin/busybox",
            "sh",
            "-c",
            "/bin/busybox nc -ll -p 5432 -e /bin/busybox echo db-ok",
        ],
        "podman run (database)",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let db_ip = db.ip();
    assert!(!db_ip.is_empty(), "the database has an address");
    // The listener is up before anyone connects (no sleep: poll its socket).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let o = db.exec(&["/bin/busybox", "netstat", "-ltn"]);
        let listening = String::from_utf8_lossy(&o.stdout).into_owned();
        if listening.contains(":5432") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the database never listened: netstat {listening:?} {:?}; logs {:?}",
            stderr(&o),
            output(pod.podman().args(["logs", &db.name]), "podman logs")
        );
    }

    // The agent learns the database's address as a prod endpoint at its
    // next holder pass (every 500 ms): wait for it in `status`.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let st = agent.status();
        let learnt = st["endpoints"].as_array().is_some_and(|e| {
            e.iter()
                .any(|e| e["address"] == db_ip.as_str() && e["env"] == "prod")
        });
        if learnt {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the database's address {db_ip} never became a prod endpoint: {}",
            st["endpoints"]
        );
    }

    let prod_app = pod.container("prod-app");
    let out = run_in(
        &pod,
        &prod_app,
        &prod_net.name,
        &["envguard.env=prod"],
        false,
        &["/bin/busybox", "nc", "-w", "3", &db_ip, "5432"],
        "podman run (prod app)",
    );
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("db-ok"),
        "the prod app reaches the database: {} {:?} {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );

    let dev_app = pod.container("dev-app");
    let out = run_in(
        &pod,
        &dev_app,
        &dev_net.name,
        &["envguard.env=dev"],
        false,
        &["/bin/busybox", "nc", "-w", "3", &db_ip, "5432"],
        "podman run (dev app)",
    );
    assert_eperm(&out, "the dev app connecting to the prod database");
    let v = violation_to(&agent, &db_ip);
    assert_eq!(v["verdict"], "denied", "{v}");
    assert_eq!(v["direction"], "egress", "{v}");
    assert_eq!(v["source"]["env"], "dev", "{v}");
    assert_eq!(v["source"]["env_from"], "cgroup", "{v}");
    assert_eq!(v["source"]["container"]["id"], dev_app.id().as_str(), "{v}");
    assert_eq!(
        v["source"]["container"]["name"],
        dev_app.name.as_str(),
        "{v}"
    );
    assert_eq!(v["destination"]["env"], "prod", "{v}");
    assert_eq!(v["destination"]["env_from"], "endpoint", "{v}");
    assert_eq!(v["destination"]["ip"], db_ip.as_str(), "{v}");
    assert_eq!(v["destination"]["port"], 5432, "{v}");
    assert_eq!(
        v["rule"], "default:cross-env (no allow rule for dev -> prod)",
        "{v}"
    );
    assert_eq!(v["process"]["comm"], "busybox", "{v}");
    assert!(v["process"]["pid"].as_u64().is_some_and(|p| p > 0), "{v}");

    // Audit mode for the pair: the same flow goes through, and is reported.
    agent
        .cli(&["mode", "audit", "--from", "dev", "--to", "prod"], None)
        .assert_ok("mode audit dev -> prod");
    let from = agent.len();
    let audited_app = pod.container("dev-app-audited");
    let out = run_in(
        &pod,
        &audited_app,
        &dev_net.name,
        &["envguard.env=dev"],
        false,
        &["/bin/busybox", "nc", "-w", "3", &db_ip, "5432"],
        "podman run (dev app, audit)",
    );
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("db-ok"),
        "in audit mode the dev app reaches the database: {} {:?} {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    let (_, v) = agent.wait_for(
        "the audited dev -> prod database flow",
        EVENT_TIMEOUT,
        |v| {
            v["kind"] == "violation"
                && v["destination"]["ip"] == db_ip.as_str()
                && v["seq"].as_u64().is_some_and(|s| s as usize >= from)
        },
    );
    assert_eq!(v["verdict"], "audited", "{v}");
    assert_eq!(v["mode"], "audit", "{v}");
    assert_eq!(v["source"]["env"], "dev", "{v}");
    assert_eq!(
        v["source"]["container"]["id"],
        audited_app.id().as_str(),
        "{v}"
    );
    assert_eq!(v["destination"]["env"], "prod", "{v}");
    assert_eq!(v["destination"]["env_from"], "endpoint", "{v}");
    agent.stop();
}

fn gid_of(group: &str) -> u32 {
    let text = std::fs::read_to_string("/etc/group").expect("read /etc/group");
    text.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&group)).then(|| f.get(2)?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no group {group:?} in /etc/group (the test needs it)"))
}

/// A `sleep` killed on drop.
struct Sleeper(std::process::Child);

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `envguard oci-hook --pin-root PIN` with `state` on stdin, as root or
/// (with `as_gid`) as nobody in that group.
fn run_hook(pin: &PinRoot, state: &str, as_gid: Option<u32>) -> std::process::Output {
    use std::io::Write as _;
    let bin = envguard_tests::sys::envguard_bin();
    let mut cmd = match as_gid {
        None => std::process::Command::new(&bin),
        Some(gid) => {
            let mut c = std::process::Command::new("setpriv");
            c.args([
                "--reuid",
                "65534",
                "--regid",
                &gid.to_string(),
                "--clear-groups",
                "--",
            ])
            .arg(&bin);
            c
        }
    };
    let mut child = cmd
        .args(["oci-hook", "--pin-root"])
        .arg(pin.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run envguard oci-hook");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(state.as_bytes())
        .expect("write the state");
    child.wait_with_output().expect("wait for the hook")
}

/// Registering changes who is in which env: a member of the control group
/// (who may read `status`) is refused, root is not.
#[test]
fn only_root_may_register() {
    let nogroup = gid_of("nogroup");
    let tree = CgroupTree::create();
    tree.mkdir("c");
    let pin = PinRoot::new();
    let policy = TempFile::new(
        "envguard-oci",
        ".toml",
        "mode = \"enforce\"\n[envs.dev]\n[envs.prod]\n",
    );
    let agent = start_agent(
        &policy,
        &tree,
        &pin,
        AgentOptions::ephemeral().control_group("nogroup"),
    );
    let sleeper = Sleeper(
        std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("start sleep"),
    );
    std::fs::write(
        tree.abs("c").join("cgroup.procs"),
        sleeper.0.id().to_string(),
    )
    .expect("move sleep into the test's cgroup");
    let state = format!(
        r#"{{"ociVersion":"1.0.2","id":"forged","status":"creating","pid":{},"bundle":"","annotations":{{"envguard.env":"prod"}}}}"#,
        sleeper.0.id()
    );
    let out = run_hook(&pin, &state, Some(nogroup));
    assert!(
        !out.status.success() && stderr(&out).contains("permission denied: register"),
        "a control-group member may not register: {} {}",
        out.status,
        stderr(&out)
    );
    assert!(registered(&agent).is_empty(), "{:?}", registered(&agent));
    let out = run_hook(&pin, &state, None);
    assert!(out.status.success(), "root registers: {}", stderr(&out));
    let listed = registered(&agent);
    assert!(
        listed.len() == 1
            && listed[0]["container"]["id"] == "forged"
            && listed[0]["env"] == "prod"
            && listed[0]["cgroup"] == tree.rel("c").as_str()
            && listed[0]["cgroup_id"] == tree.id("c"),
        "{listed:?}"
    );
    drop(sleeper);
    agent.stop();
}

/// A same-host peer in a registered container is named on its side too: a
/// dev container sharing a prod container's network namespace
/// (`--network container:…`) connects to its listener on 127.0.0.1, and the
/// violation's destination (env from the listening socket) carries the prod
/// container.
#[test]
fn a_same_host_peer_container_is_named() {
    let tree = CgroupTree::create();
    let pin = PinRoot::new();
    let pod = Pod::new(&tree);
    let policy = TempFile::new(
        "envguard-oci",
        ".toml",
        "mode = \"enforce\"\n[envs.dev]\n[envs.prod]\n",
    );
    let agent = start_agent(&policy, &tree, &pin, AgentOptions::ephemeral());
    install_hook(&pod, &pin, &[]);
    let db = pod.container("db");
    let out = run_in(
        &pod,
        &db,
        "none",
        &["envguard.env=prod"],
        true,
        &[
            "/bin/busybox",
            "nc",
            "-ll",
            "-p",
            "5432",
            "-e",
            "/bin/busybox",
            "true",
        ],
        "podman run (db)",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let o = db.exec(&["/bin/busybox", "netstat", "-ltn"]);
        if String::from_utf8_lossy(&o.stdout).contains(":5432") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the db never listened: {:?} {:?}",
            String::from_utf8_lossy(&o.stdout),
            stderr(&o)
        );
    }
    let app = pod.container("app");
    let out = run_in(
        &pod,
        &app,
        &format!("container:{}", db.name),
        &["envguard.env=dev"],
        false,
        &["/bin/busybox", "nc", "-w", "2", "127.0.0.1", "5432"],
        "podman run (app)",
    );
    assert_eperm(
        &out,
        "the dev container connecting to prod's loopback listener",
    );
    let v = violation_to(&agent, "127.0.0.1");
    assert_eq!(v["source"]["env"], "dev", "{v}");
    assert_eq!(v["source"]["container"]["name"], app.name.as_str(), "{v}");
    assert_eq!(v["destination"]["env"], "prod", "{v}");
    assert_eq!(v["destination"]["env_from"], "socket", "{v}");
    assert_eq!(v["destination"]["container"]["id"], db.id().as_str(), "{v}");
    assert_eq!(
        v["destination"]["container"]["name"],
        db.name.as_str(),
        "{v}"
    );
    agent.stop();
}
