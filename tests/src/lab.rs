//! `Lab`: everything one agent test uses — cgroup tree, topology, policy
//! file, echo servers, agent — and the case runner.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::agent::{Agent, AgentOptions, dump_lines};
use crate::cgroup::CgroupTree;
use crate::event::{Endpoint, Expected, is_violation};
use crate::netns::{Family, Site, Topology, client_addr};
use crate::pin::{Footprint, PinRoot};
use crate::policy::{Mode, PolicyExtras, TempFile, standard_policy_with, violates};
use crate::process::{ConnectLoop, Place, Probe, ProbeResult, Proto, Server};
use crate::sys;

/// How long to wait for a violation event after the probe returned.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Probe timeout for cases expected to connect.
pub const CONNECT_TIMEOUT_MS: u32 = 3000;
/// Probe timeout for inbound cases, whose violating connections time out.
pub const INBOUND_TIMEOUT_MS: u32 = 1500;

/// The (protocol, port) pairs of the remote echo servers: 53 is allowed to
/// `shared` for both protocols, 8080/tcp is inside the allowed 8000-8100/tcp,
/// 9000 is allowed nowhere.
pub const REMOTE_PORTS: [(Proto, u16); 5] = [
    (Proto::Tcp, 53),
    (Proto::Tcp, 8080),
    (Proto::Tcp, 9000),
    (Proto::Udp, 53),
    (Proto::Udp, 9000),
];

/// Where a local process runs: a cgroup of the test's tree (all in the
/// client netns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    /// The tree's root (the agent's attach point), in no env: `host`.
    Host,
    Prod,
    Dev,
    /// `dev/late`, created only after the agent printed `policy_loaded`.
    DevLate,
}

impl Client {
    pub const ALL: [Client; 4] = [Client::Host, Client::Prod, Client::Dev, Client::DevLate];

    /// Sub-path in the cgroup tree.
    pub fn sub(self) -> &'static str {
        match self {
            Client::Host => "",
            Client::Prod => "prod",
            Client::Dev => "dev",
            Client::DevLate => "dev/late",
        }
    }

    /// The env the agent must attribute this cgroup to.
    pub fn env(self) -> &'static str {
        match self {
            Client::Host => "host",
            Client::Prod => "prod",
            Client::Dev | Client::DevLate => "dev",
        }
    }
}

/// Which hook must catch a violating case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// A local process's connect()/sendto(): connect4/6, sendmsg4/6.
    Egress,
    /// A remote peer's packets to a local server: skb_ingress.
    Ingress,
}

/// What a violating case must produce.
#[derive(Clone, Debug)]
pub struct Violation {
    pub side: Side,
    /// Env and cgroup (sub-path in the tree) of the local socket.
    pub local_env: &'static str,
    pub local_cgroup: &'static str,
    /// Env of the remote address and how the agent must have found it.
    pub remote_env: &'static str,
    pub remote_env_from: &'static str,
}

/// One probe and what the policy says about it.
#[derive(Clone, Debug)]
pub struct Case {
    pub desc: String,
    pub probe: Probe,
    /// `None`: allowed (must connect, no event).
    pub violation: Option<Violation>,
}

/// See the module docs. Field order is drop order: the agent is stopped
/// first, then whatever it left under its pin root is removed (`envguard
/// detach`, then the directory), then the servers are killed, then the veth
/// and namespaces are deleted, then the cgroup tree and the policy file are
/// removed.
pub struct Lab {
    agent: Option<Agent>,
    pin: PinRoot,
    servers: Vec<Server>,
    pub topo: Topology,
    pub cg: CgroupTree,
    policy: TempFile,
    egprobe: PathBuf,
    pub mode: Mode,
    /// What the policy file was last written with (by this lab).
    extras: std::sync::Mutex<PolicyExtras>,
}

impl Lab {
    /// Creates the cgroup tree (`prod`, `dev`), the topology and the policy
    /// file. `egprobe` is `env!("CARGO_BIN_EXE_egprobe")` of the test.
    pub fn new(egprobe: &str, mode: Mode) -> Lab {
        Lab::with_policy(egprobe, mode, &PolicyExtras::default())
    }

    /// [`Lab::new`] with additions to the standard policy.
    pub fn with_policy(egprobe: &str, mode: Mode, extras: &PolicyExtras) -> Lab {
        sys::require_root();
        sys::require_ip();
        let egprobe = PathBuf::from(egprobe);
        assert!(
            egprobe.is_file(),
            "the egprobe helper is missing at {}",
            egprobe.display()
        );
        let cg = CgroupTree::create();
        cg.mkdir("prod");
        cg.mkdir("dev");
        let policy = TempFile::new(
            "envguard-policy",
            ".toml",
            &standard_policy_with(mode, &cg.rel(""), extras),
        );
        let topo = Topology::create();
        Lab {
            agent: None,
            pin: PinRoot::new(),
            servers: Vec::new(),
            topo,
            cg,
            policy,
            egprobe,
            mode,
            extras: std::sync::Mutex::new(extras.clone()),
        }
    }

    pub fn policy_path(&self) -> &Path {
        self.policy.path()
    }

    /// Rewrites the policy file (same mode) for the next agent, or for the
    /// running one's next reload.
    pub fn set_policy(&self, extras: &PolicyExtras) {
        self.policy.rewrite(&self.policy_text(extras));
        *self.extras.lock().unwrap_or_else(|p| p.into_inner()) = extras.clone();
    }

    /// The standard policy for this lab's tree and mode, with `extras`.
    pub fn policy_text(&self, extras: &PolicyExtras) -> String {
        standard_policy_with(self.mode, &self.cg.rel(""), extras)
    }

    /// Writes `contents` as the policy file, as is (e.g. a broken one).
    pub fn write_policy_raw(&self, contents: &str) {
        self.policy.rewrite(contents);
    }

    /// Runs `envguard ARGS...` against the running agent (see [`Agent::cli`]).
    pub fn cli(&self, args: &[&str]) -> crate::control::CliRun {
        self.agent().cli(args, None)
    }

    /// `envguard status --json` of the running agent.
    pub fn status(&self) -> serde_json::Value {
        self.agent().status()
    }

    /// The pin root every agent of this lab uses.
    pub fn pin_root(&self) -> &PinRoot {
        &self.pin
    }

    /// What the agent has in the kernel now (see [`PinRoot::footprint`]).
    pub fn footprint(&self) -> Footprint {
        self.pin.footprint(&self.cg.abs(""), self.cg.id(""))
    }

    pub fn egprobe(&self) -> &Path {
        &self.egprobe
    }

    /// Starts an ephemeral agent (`--detach-on-exit`) on the tree's root,
    /// waits for `policy_loaded`, then creates `dev/late`.
    pub fn start_agent(&mut self) {
        self.spawn_agent(&AgentOptions::ephemeral());
        self.mkdir_late();
    }

    /// Starts an agent on the tree's root and the lab's pin root with
    /// `opts` and waits for its `policy_loaded`.
    pub fn spawn_agent(&mut self, opts: &AgentOptions) -> &Agent {
        assert!(self.agent.is_none(), "agent already started");
        let mut opts = opts.clone();
        if opts.envs.is_none() {
            opts.envs = Some(self.extras.lock().unwrap_or_else(|p| p.into_inner()).envs());
        }
        self.agent.insert(Agent::start(
            self.policy.path(),
            &self.cg.rel(""),
            self.mode,
            self.pin.path(),
            &opts,
        ))
    }

    /// SIGKILLs the agent (its pinned enforcement stays) and reaps it.
    pub fn kill_agent(&mut self) {
        self.agent.take().expect("the agent is not running").kill();
    }

    /// The running agent, taken out of the lab (e.g. to stop it with another
    /// signal).
    pub fn take_agent(&mut self) -> Agent {
        self.agent.take().expect("the agent is not running")
    }

    /// Creates the `dev/late` cgroup.
    pub fn mkdir_late(&self) {
        self.cg.mkdir(Client::DevLate.sub());
    }

    pub fn agent(&self) -> &Agent {
        self.agent
            .as_ref()
            .expect("the agent is not running (call start_agent)")
    }

    /// Stops the agent, asserting a clean exit (see [`Agent::stop`]).
    pub fn stop_agent(&mut self) {
        self.agent.take().expect("the agent is not running").stop();
    }

    /// A local process in `client`'s cgroup, in the client netns.
    pub fn client_place(&self, client: Client) -> Place {
        Place {
            netns: Some(self.topo.client.name().to_owned()),
            cgroup: Some(self.cg.abs(client.sub())),
        }
    }

    /// A remote host: the server netns, in the test runner's own cgroup
    /// (outside the agent's attach point).
    pub fn remote_place(&self) -> Place {
        Place {
            netns: Some(self.topo.server.name().to_owned()),
            cgroup: None,
        }
    }

    /// Starts an echo server (killed when the lab is dropped); returns its pid.
    pub fn serve(&mut self, place: &Place, proto: Proto, addrs: &[IpAddr], port: u16) -> u32 {
        let s = Server::spawn(&self.egprobe, place, proto, addrs, port);
        let pid = s.pid();
        self.servers.push(s);
        pid
    }

    /// Pids of the servers started so far.
    pub fn server_pids(&self) -> Vec<u32> {
        self.servers.iter().map(Server::pid).collect()
    }

    /// Echo servers for every remote site and [`REMOTE_PORTS`]: TCP
    /// dual-stack on `[::]`, UDP bound to each site address (so replies come
    /// from the address the client sent to).
    pub fn serve_remote_sites(&mut self) {
        let place = self.remote_place();
        let any: IpAddr = std::net::Ipv6Addr::UNSPECIFIED.into();
        for (proto, port) in REMOTE_PORTS {
            match proto {
                Proto::Tcp => self.serve(&place, proto, &[any], port),
                Proto::Udp => self.serve(&place, proto, &Site::all_addrs(), port),
            };
        }
    }

    /// A local `client` connecting to `dst`, whose env the agent must find
    /// as `remote_env` via `remote_env_from`; violating iff the policy says so.
    pub fn egress_case(
        &self,
        client: Client,
        proto: Proto,
        dst: SocketAddr,
        remote_env: &'static str,
        remote_env_from: &'static str,
    ) -> Case {
        let violation =
            violates(client.env(), remote_env, proto, dst.port()).then_some(Violation {
                side: Side::Egress,
                local_env: client.env(),
                local_cgroup: client.sub(),
                remote_env,
                remote_env_from,
            });
        Case {
            desc: format!(
                "{client:?} client ({}) -> {remote_env} {} {dst}",
                self.cg.rel(client.sub()),
                proto.name()
            ),
            probe: Probe {
                place: self.client_place(client),
                proto,
                dst,
                bind: None,
                timeout_ms: CONNECT_TIMEOUT_MS,
            },
            violation,
        }
    }

    /// A local `client` connecting to a remote site.
    pub fn remote_case(
        &self,
        client: Client,
        site: Site,
        fam: Family,
        proto: Proto,
        port: u16,
    ) -> Case {
        self.egress_case(
            client,
            proto,
            SocketAddr::new(site.addr(fam), port),
            site.env(),
            site.env_from(),
        )
    }

    /// A remote peer at `src` (server netns, bound to that site's address)
    /// connecting over TCP to a local server in `server`'s cgroup listening
    /// on the client netns's veth address, port `port`.
    pub fn inbound_case(&self, src: Site, fam: Family, server: Client, port: u16) -> Case {
        let dst = SocketAddr::new(client_addr(fam), port);
        let violation = violates(src.env(), server.env(), Proto::Tcp, port).then_some(Violation {
            side: Side::Ingress,
            local_env: server.env(),
            local_cgroup: server.sub(),
            remote_env: src.env(),
            remote_env_from: src.env_from(),
        });
        Case {
            desc: format!(
                "{} peer {} -> local {:?} server tcp {dst}",
                src.env(),
                src.addr(fam),
                server
            ),
            probe: Probe {
                place: self.remote_place(),
                proto: Proto::Tcp,
                dst,
                bind: Some(src.addr(fam)),
                timeout_ms: INBOUND_TIMEOUT_MS,
            },
            violation,
        }
    }

    /// Runs a probe and returns its report.
    pub fn run(&self, probe: &Probe) -> ProbeResult {
        probe.run(&self.egprobe)
    }

    /// Runs one probe from `client` to `dst` (timeout `timeout_ms`).
    pub fn probe(
        &self,
        client: Client,
        proto: Proto,
        dst: SocketAddr,
        timeout_ms: u32,
    ) -> ProbeResult {
        self.run(&Probe {
            place: self.client_place(client),
            proto,
            dst,
            bind: None,
            timeout_ms,
        })
    }

    /// Starts a TCP connect loop from `client` to `dst` at `rate` per
    /// second (at most 60 s; [`ConnectLoop::finish`] ends it).
    pub fn connect_loop(&self, client: Client, dst: SocketAddr, rate: u32) -> ConnectLoop {
        ConnectLoop::start(
            &self.egprobe,
            &self.client_place(client),
            dst,
            rate,
            Duration::from_secs(60),
        )
    }

    /// Runs a batch of cases against the running agent:
    /// 1. every allowed case, each of which must connect;
    /// 2. the first violating case as the sentinel: its outcome and event
    ///    are checked, and no violation event may precede it after step 1
    ///    began (events are reserved in order in the agent's ring buffer,
    ///    so an allowed case's event would have come first);
    /// 3. every other violating case: outcome and event.
    ///
    /// Returns each violating case's event, in `cases` order.
    pub fn run_cases(&self, cases: &[Case]) -> Vec<(usize, serde_json::Value)> {
        let agent = self.agent();
        let (allowed, violating): (Vec<&Case>, Vec<&Case>) =
            cases.iter().partition(|c| c.violation.is_none());
        assert!(
            !violating.is_empty(),
            "a batch needs a violating case to serve as the sentinel"
        );
        let mark = agent.len();
        for case in &allowed {
            let r = self.run(&case.probe);
            assert!(
                r.ok,
                "{}: allowed by the policy, so it must connect; probe said {}",
                case.desc, r.raw
            );
        }
        let sentinel = violating[0];
        let (at, sentinel_event) = self.check_violation(sentinel);
        let mut events = vec![(at, sentinel_event)];
        let stray: Vec<_> = agent
            .lines(mark..at)
            .into_iter()
            .filter(is_violation)
            .collect();
        assert!(
            stray.is_empty(),
            "allowed cases produced violation events (they precede the event of the sentinel case {}):\n{}allowed cases:\n  {}",
            sentinel.desc,
            dump_lines(&stray),
            allowed
                .iter()
                .map(|c| c.desc.as_str())
                .collect::<Vec<_>>()
                .join("\n  ")
        );
        for case in &violating[1..] {
            events.push(self.check_violation(case));
        }
        // Back in `cases` order.
        let mut by_case = Vec::new();
        let mut next = events.into_iter();
        for (i, case) in cases.iter().enumerate() {
            if case.violation.is_some()
                && let Some((_, ev)) = next.next()
            {
                by_case.push((i, ev));
            }
        }
        by_case
    }

    /// The shared decision (`envguard_common::decide`, the function the
    /// kernel runs) on this lab's policy file, asked through `envguard
    /// explain --policy FILE --json` (offline: no agent): for a local
    /// `client` to `dst` on `proto`.
    pub fn explain_egress(
        &self,
        client: Client,
        proto: Proto,
        dst: SocketAddr,
    ) -> serde_json::Value {
        let args: Vec<String> = vec![
            "explain".into(),
            "--policy".into(),
            self.policy.path().display().to_string(),
            "--from".into(),
            self.cg.rel(client.sub()),
            "--to".into(),
            dst.ip().to_string(),
            "--port".into(),
            format!("{}/{}", dst.port(), proto.name()),
            "--json".into(),
        ];
        let run = crate::control::run_cli(&args, None);
        assert!(
            run.status.is_some_and(|s| s.success()),
            "envguard {}: {:?}\n{}",
            args.join(" "),
            run.status,
            run.stderr
        );
        serde_json::from_str(run.stdout.trim())
            .unwrap_or_else(|e| panic!("envguard explain printed no JSON ({e}): {}", run.stdout))
    }

    /// Runs one violating case; checks its outcome for the mode and its
    /// event field by field. Returns the event's line index and the event.
    pub fn check_violation(&self, case: &Case) -> (usize, serde_json::Value) {
        let v = case
            .violation
            .as_ref()
            .expect("check_violation on an allowed case");
        let r = self.run(&case.probe);
        let (errno, stage) = match (v.side, case.probe.proto) {
            (Side::Egress, Proto::Tcp) => (libc::EPERM, "connect"),
            (Side::Egress, Proto::Udp) => (libc::EPERM, "send"),
            (Side::Ingress, _) => (libc::ETIMEDOUT, "connect"),
        };
        match self.mode {
            Mode::Enforce => assert!(
                !r.ok && r.errno == Some(errno) && r.stage.as_deref() == Some(stage),
                "{}: violates the policy in enforce mode, so {stage} must fail with errno {errno} ({}); probe said {}",
                case.desc,
                std::io::Error::from_raw_os_error(errno),
                r.raw
            ),
            Mode::Audit => assert!(
                r.ok,
                "{}: audit mode never blocks, so it must connect; probe said {}",
                case.desc, r.raw
            ),
        }
        let expected = self.expected_event(case, v, &r);
        let (at, ev) = match v.side {
            Side::Egress => self.agent().wait_for(&case.desc, EVENT_TIMEOUT, |e| {
                is_violation(e) && e["process"]["pid"] == r.pid
            }),
            Side::Ingress => {
                let src = expected.source.clone();
                self.agent().wait_for(&case.desc, EVENT_TIMEOUT, |e| {
                    is_violation(e)
                        && e["direction"] == "ingress"
                        && e["source"]["ip"] == src.ip.map(|i| i.to_string()).unwrap_or_default()
                        && e["source"]["port"] == src.port.unwrap_or(0)
                })
            }
        };
        expected.assert_matches(&ev, &case.desc);
        (at, ev)
    }

    fn expected_event(&self, case: &Case, v: &Violation, r: &ProbeResult) -> Expected {
        let dst = case.probe.dst;
        let v4 = dst.is_ipv4();
        let local_cgroup = self.cg.rel(v.local_cgroup);
        let cgroup_id = self.cg.id(v.local_cgroup);
        match v.side {
            Side::Egress => Expected {
                mode: self.mode,
                direction: "egress",
                // An AF_INET6 socket sending to an IPv4-mapped address runs
                // connect6 for TCP (before tcp_v4_connect) but only sendmsg4
                // for UDP (udpv6_sendmsg hands it to udp_sendmsg first).
                hook: match (case.probe.proto, v4, dst.ip().to_canonical().is_ipv4()) {
                    (Proto::Tcp, true, _) => "connect4",
                    (Proto::Tcp, false, _) => "connect6",
                    (Proto::Udp, _, true) => "sendmsg4",
                    (Proto::Udp, _, false) => "sendmsg6",
                },
                proto: case.probe.proto.name(),
                // At connect/sendmsg time the source may not be bound yet.
                source: Endpoint {
                    ip: None,
                    port: None,
                    env: v.local_env,
                    env_from: "cgroup",
                },
                destination: Endpoint {
                    ip: Some(dst.ip().to_canonical()),
                    port: Some(dst.port()),
                    env: v.remote_env,
                    env_from: v.remote_env_from,
                },
                pid: Some(r.pid),
                comm: Some("egprobe"),
                // SAFETY: geteuid has no preconditions.
                uid: Some(unsafe { libc::geteuid() }),
                cgroup_id,
                cgroup: local_cgroup,
            },
            Side::Ingress => {
                let local = r.local.unwrap_or_else(|| {
                    panic!(
                        "{}: the probe did not report its bound address: {}",
                        case.desc, r.raw
                    )
                });
                Expected {
                    mode: self.mode,
                    direction: "ingress",
                    hook: "skb_ingress",
                    proto: case.probe.proto.name(),
                    source: Endpoint {
                        ip: Some(local.ip().to_canonical()),
                        port: Some(local.port()),
                        env: v.remote_env,
                        env_from: v.remote_env_from,
                    },
                    destination: Endpoint {
                        ip: Some(dst.ip().to_canonical()),
                        port: Some(dst.port()),
                        env: v.local_env,
                        env_from: "cgroup",
                    },
                    pid: None,
                    comm: None,
                    uid: None,
                    cgroup_id,
                    cgroup: local_cgroup,
                }
            }
        }
    }

    /// After [`Lab::stop_agent`]: the programs must be detached, so a case
    /// that was violating now connects.
    pub fn assert_detached(&self, case: &Case) {
        assert!(
            self.agent.is_none(),
            "assert_detached needs the agent stopped"
        );
        let r = self.run(&case.probe);
        assert!(
            r.ok,
            "{}: after the agent stopped its programs must be detached and this must connect; probe said {}",
            case.desc, r.raw
        );
        let pins = self.pin.pins();
        assert!(
            pins.is_empty(),
            "an agent run with --detach-on-exit left pins after it stopped: {pins:?}"
        );
    }
}
