//! Scenario B: traffic that crosses the host without a local socket, judged
//! at the tc hooks of the interfaces the policy lists.
//!
//! A router namespace (the agent runs inside it, see `envguard_tests::router`)
//! with hosts behind its veths: a "VM" behind `tapdev0` (listed in dev's
//! `interfaces = ["tapdev*"]`), a prod service behind `prod0` (prod by CIDR),
//! a shared service behind `shared0` (shared by CIDR), and an unlisted
//! `other0`. Only `* -> shared` is allowed: the VM's flows to prod are
//! dropped at `tc_ingress` of `tapdev0` and reported with the interface; its
//! flows to shared pass, and so do their replies (shared -> dev is allowed by
//! no rule: only the flow state recorded by the VM's judged request lets
//! them back).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use envguard_tests::process::{Place, Probe, ProbeResult, Server};
use envguard_tests::router::{Host, Router};
use envguard_tests::{Agent, AgentOptions, CgroupTree, Family, Mode, PinRoot, Proto, TempFile};
use serde_json::{Value, json};

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");
const EGATTACK: &str = env!("CARGO_BIN_EXE_egattack");
const PROD_PORT: u16 = 5432;
const SHARED_PORT: u16 = 8080;
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

fn policy(mode: Mode) -> String {
    format!(
        r#"mode = "{}"

[envs.dev]
interfaces = ["tapdev*"]

[envs.prod]
cidrs = ["198.18.2.0/24", "2001:db8:2::/64"]

[envs.shared]
cidrs = ["198.18.3.0/24", "2001:db8:3::/64"]

[[allow]]
from = "*"
to = "shared"
"#,
        mode.name()
    )
}

/// The router, its hosts and their servers; fields drop in order (servers,
/// hosts, router).
struct Scene {
    _servers: Vec<Server>,
    vm: Host,
    prod: Host,
    shared: Host,
    other: Host,
    router: Router,
    cgroups: CgroupTree,
    policy: TempFile,
    egprobe: PathBuf,
}

impl Scene {
    fn new(mode: Mode) -> Scene {
        envguard_tests::sys::require_root();
        let router = Router::create();
        let vm = router.host(1, "tapdev0");
        let prod = router.host(2, "prod0");
        let shared = router.host(3, "shared0");
        let other = router.host(4, "other0");
        let egprobe = PathBuf::from(EGPROBE);
        let mut servers = Vec::new();
        for (host, port) in [(&prod, PROD_PORT), (&shared, SHARED_PORT)] {
            let place = Place {
                netns: Some(host.ns.name().to_owned()),
                cgroup: None,
            };
            let addrs: Vec<IpAddr> = Family::ALL.iter().map(|&f| host.addr(f)).collect();
            for proto in [Proto::Tcp, Proto::Udp] {
                servers.push(Server::spawn(&egprobe, &place, proto, &addrs, port));
            }
        }
        Scene {
            _servers: servers,
            vm,
            prod,
            shared,
            other,
            router,
            cgroups: CgroupTree::create(),
            policy: TempFile::new("egtc-policy", ".toml", &policy(mode)),
            egprobe,
        }
    }

    fn agent(&self, mode: Mode, pin: &PinRoot, opts: AgentOptions) -> Agent {
        let opts = AgentOptions {
            binary: Some(self.router.agent_binary().to_owned()),
            envs: Some(vec!["dev".into(), "prod".into(), "shared".into()]),
            ..opts
        };
        Agent::start(
            self.policy.path(),
            &self.cgroups.rel(""),
            mode,
            pin.path(),
            &opts,
        )
    }

    fn probe(&self, from: &Host, proto: Proto, to: &Host, fam: Family, port: u16) -> ProbeResult {
        self.probe_within(from, proto, to, fam, port, 1500)
    }

    /// A probe expected to get through: room for a lost first packet (a
    /// SYN retransmitted after 1 s while a fresh veth resolves its
    /// neighbour), and no slower when it passes at once.
    fn probe_ok(
        &self,
        from: &Host,
        proto: Proto,
        to: &Host,
        fam: Family,
        port: u16,
    ) -> ProbeResult {
        self.probe_within(from, proto, to, fam, port, 5000)
    }

    fn probe_within(
        &self,
        from: &Host,
        proto: Proto,
        to: &Host,
        fam: Family,
        port: u16,
        timeout_ms: u32,
    ) -> ProbeResult {
        Probe {
            place: Place {
                netns: Some(from.ns.name().to_owned()),
                cgroup: None,
            },
            proto,
            dst: SocketAddr::new(to.addr(fam), port),
            bind: None,
            timeout_ms,
        }
        .run(&self.egprobe)
    }
}

/// The violation from `from` (at `interface`) to `to` on `proto`.
fn wait_violation(
    agent: &Agent,
    from: &Host,
    to: &Host,
    fam: Family,
    proto: Proto,
    port: u16,
) -> Value {
    let (src, dst) = (from.addr(fam).to_string(), to.addr(fam).to_string());
    agent
        .wait_for(
            &format!("tc violation {src} -> {dst}:{port}/{}", proto.name()),
            EVENT_TIMEOUT,
            |v| {
                v["kind"] == "violation"
                    && v["hook"] == "tc_ingress"
                    && v["source"]["ip"] == json!(src)
                    && v["destination"]["ip"] == json!(dst)
                    && v["destination"]["port"] == json!(port)
                    && v["proto"] == proto.name()
            },
        )
        .1
}

/// Field by field: a dev -> prod flow judged at `tc_ingress` of `ifname`.
/// A flow of the scene: (from, to, family, protocol).
type Flow<'a> = (&'a Host, &'a Host, Family, Proto);

fn assert_tc_violation(
    v: &Value,
    mode: Mode,
    ifname: &str,
    (from, to, fam, proto): Flow<'_>,
    src_port: Option<u16>,
) {
    let want = |path: &str, got: &Value, expected: Value| {
        assert_eq!(*got, expected, "{path} of {v}");
    };
    want("mode", &v["mode"], json!(mode.name()));
    want("verdict", &v["verdict"], json!(mode.verdict()));
    want("direction", &v["direction"], json!("ingress"));
    want("hook", &v["hook"], json!("tc_ingress"));
    want("interface", &v["interface"], json!(ifname));
    want("proto", &v["proto"], json!(proto.name()));
    want(
        "source.ip",
        &v["source"]["ip"],
        json!(from.addr(fam).to_string()),
    );
    match src_port {
        Some(p) => want("source.port", &v["source"]["port"], json!(p)),
        None => assert!(
            v["source"]["port"].as_u64().is_some_and(|p| p > 0),
            "source.port of {v}"
        ),
    }
    want("source.env", &v["source"]["env"], json!("dev"));
    want(
        "source.env_from",
        &v["source"]["env_from"],
        json!("interface"),
    );
    want(
        "destination.ip",
        &v["destination"]["ip"],
        json!(to.addr(fam).to_string()),
    );
    want(
        "destination.port",
        &v["destination"]["port"],
        json!(PROD_PORT),
    );
    want("destination.env", &v["destination"]["env"], json!("prod"));
    want(
        "destination.env_from",
        &v["destination"]["env_from"],
        json!("cidr"),
    );
    want("process.pid", &v["process"]["pid"], Value::Null);
    want("process.comm", &v["process"]["comm"], Value::Null);
    want("process.uid", &v["process"]["uid"], Value::Null);
    want("process.cgroup_id", &v["process"]["cgroup_id"], json!(0));
    want("process.cgroup", &v["process"]["cgroup"], Value::Null);
    want(
        "rule",
        &v["rule"],
        json!("default:cross-env (no allow rule for dev -> prod)"),
    );
}

/// The VM's flows: to prod blocked (enforce) or passed (audit) and reported
/// at tc; to shared passed both ways, unreported.
fn check_flows(scene: &Scene, agent: &Agent, mode: Mode, vm: &Host, ifname: &str) {
    for fam in Family::ALL {
        for proto in [Proto::Tcp, Proto::Udp] {
            let r = scene.probe_ok(vm, proto, &scene.shared, fam, SHARED_PORT);
            assert!(
                r.ok,
                "{fam:?} {} from the VM to shared must pass both ways: {}",
                proto.name(),
                r.raw
            );
            let r = match mode {
                Mode::Enforce => scene.probe(vm, proto, &scene.prod, fam, PROD_PORT),
                Mode::Audit => scene.probe_ok(vm, proto, &scene.prod, fam, PROD_PORT),
            };
            match mode {
                Mode::Enforce => assert!(
                    !r.ok,
                    "{fam:?} {} from the VM to prod must be dropped: {}",
                    proto.name(),
                    r.raw
                ),
                Mode::Audit => assert!(
                    r.ok,
                    "{fam:?} {} from the VM to prod must pass in audit mode: {}",
                    proto.name(),
                    r.raw
                ),
            }
            let v = wait_violation(agent, vm, &scene.prod, fam, proto, PROD_PORT);
            assert_tc_violation(
                &v,
                mode,
                ifname,
                (vm, &scene.prod, fam, proto),
                r.local.map(|a| a.port()),
            );
        }
    }
    let lines = agent.lines(0..agent.len());
    let shared: Vec<&Value> = lines
        .iter()
        .filter(|v| {
            v["kind"] == "violation"
                && (v["destination"]["env"] == "shared" || v["source"]["env"] == "shared")
        })
        .collect();
    assert!(
        shared.is_empty(),
        "the VM's allowed flows to shared (and their replies) must not be reported: {shared:?}"
    );
}

/// The VM's UDP/IPv6 datagram to prod is dropped at tc and reported by the
/// restarted `agent`.
fn assert_dropped_and_reported_after_restart(scene: &Scene, agent: &Agent) {
    let r = scene.probe(&scene.vm, Proto::Udp, &scene.prod, Family::V6, PROD_PORT);
    assert!(!r.ok, "still dropped after the restart: {}", r.raw);
    let v = wait_violation(
        agent,
        &scene.vm,
        &scene.prod,
        Family::V6,
        Proto::Udp,
        PROD_PORT,
    );
    assert_tc_violation(
        &v,
        Mode::Enforce,
        "tapdev0",
        (&scene.vm, &scene.prod, Family::V6, Proto::Udp),
        r.local.map(|a| a.port()),
    );
}

fn tcx_pins(pin: &PinRoot) -> Vec<String> {
    let mut out: Vec<String> = pin
        .pins()
        .iter()
        .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
        .filter(|n| n.starts_with("tcx_"))
        .collect();
    out.sort();
    out
}

fn link_id(pin: &PinRoot, name: &str) -> u32 {
    let path = pin
        .pins()
        .into_iter()
        .find(|p| p.file_name().and_then(|n| n.to_str()) == Some(name))
        .unwrap_or_else(|| panic!("no pin {name} under {}", pin.path().display()));
    let fd = envguard_tests::bpf::obj_get(&path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    envguard_tests::bpf::link_info(&fd)
        .unwrap_or_else(|e| panic!("link info of {}: {e}", path.display()))
        .id
}

fn status_interfaces(agent: &Agent) -> Vec<Value> {
    agent.status()["interfaces"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn scenario_b(mode: Mode) {
    let scene = Scene::new(mode);
    let pin = PinRoot::new();
    let agent = scene.agent(mode, &pin, AgentOptions::ephemeral());
    check_flows(&scene, &agent, mode, &scene.vm, "tapdev0");

    // Only the listed interface has hooks.
    let idx = scene.vm.ifindex();
    assert_eq!(
        tcx_pins(&pin),
        [format!("tcx_{idx}_egress"), format!("tcx_{idx}_ingress")],
        "tcx links are pinned for the listed interface only"
    );
    assert_eq!(
        status_interfaces(&agent),
        [json!({"name": "tapdev0", "ifindex": idx, "env": "dev", "attach": "tcx"})],
        "status lists the listed interface and nothing else"
    );
    agent.stop();
}

#[test]
fn scenario_b_enforce() {
    scenario_b(Mode::Enforce);
}

#[test]
fn scenario_b_audit() {
    scenario_b(Mode::Audit);
}

/// Nothing is attached to the interfaces the policy does not list: their
/// forwarded flows are never judged at tc, whatever their envs (here a
/// world host reaching prod and shared, which no hook of the VM sees).
#[test]
fn unlisted_interfaces_get_nothing() {
    let scene = Scene::new(Mode::Enforce);
    let pin = PinRoot::new();
    let agent = scene.agent(Mode::Enforce, &pin, AgentOptions::ephemeral());
    for host in [&scene.other, &scene.prod, &scene.shared] {
        let idx = host.ifindex();
        assert!(
            !tcx_pins(&pin)
                .iter()
                .any(|p| p.starts_with(&format!("tcx_{idx}_"))),
            "{} is not listed, yet has tcx pins: {:?}",
            host.ifname,
            tcx_pins(&pin)
        );
        assert_eq!(
            scene.router.tcx_programs(&host.ifname),
            (vec![], vec![]),
            "{}: the kernel's tcx chains must be empty",
            host.ifname
        );
    }
    assert_eq!(
        scene.router.tcx_programs("tapdev0"),
        (vec!["tc_ingress".to_owned()], vec!["tc_egress".to_owned()]),
        "tapdev0 carries both programs"
    );
    // The world host behind other0 reaches prod: world -> prod is allowed
    // by the defaults, and nothing judges other0 anyway.
    let r = scene.probe(&scene.other, Proto::Tcp, &scene.prod, Family::V4, PROD_PORT);
    assert!(r.ok, "other0 -> prod: {}", r.raw);
    agent.stop();
}

/// A restarted agent adopts the pinned tcx links: the same links (same ids)
/// stay on the device, so there is no moment without the program, and the
/// flows stay enforced while no agent runs and after it is back.
#[test]
fn restart_adopts_tcx_links() {
    let scene = Scene::new(Mode::Enforce);
    let pin = PinRoot::new();
    let agent = scene.agent(Mode::Enforce, &pin, AgentOptions::pinned());
    let idx = scene.vm.ifindex();
    let names = [format!("tcx_{idx}_egress"), format!("tcx_{idx}_ingress")];
    assert_eq!(tcx_pins(&pin), names);
    let ids: Vec<u32> = names.iter().map(|n| link_id(&pin, n)).collect();
    agent.stop();

    // No agent: the pinned links keep enforcing.
    assert_eq!(
        tcx_pins(&pin),
        names,
        "the links stay pinned without an agent"
    );
    let r = scene.probe(&scene.vm, Proto::Tcp, &scene.prod, Family::V4, PROD_PORT);
    assert!(!r.ok, "dropped while no agent runs: {}", r.raw);

    let opts = AgentOptions {
        detach_on_exit: true,
        ..AgentOptions::pinned().adopting()
    };
    let agent = scene.agent(Mode::Enforce, &pin, opts);
    assert_eq!(agent.ready_line()["adopted"], json!(true));
    let after: Vec<u32> = names.iter().map(|n| link_id(&pin, n)).collect();
    assert_eq!(
        ids, after,
        "the restarted agent must adopt the same tcx links"
    );
    assert_dropped_and_reported_after_restart(&scene, &agent);
    let r = scene.probe(
        &scene.vm,
        Proto::Tcp,
        &scene.shared,
        Family::V4,
        SHARED_PORT,
    );
    assert!(r.ok, "VM -> shared after the restart: {}", r.raw);
    agent.stop();
    assert!(tcx_pins(&pin).is_empty(), "detached on exit");
}

/// The fallback of kernels without tcx (`--tc-attach clsact`, forced here
/// where tcx exists): one cls_bpf filter per direction, enforcing; they stay
/// while no agent runs; the next agent's filters replace them (one per
/// direction still, not one more per restart, and another pin root's
/// filter on the same device is left alone); detaching removes them.
#[test]
fn clsact_fallback_replaces_its_filters_and_detach_removes_them() {
    let scene = Scene::new(Mode::Enforce);
    let pin = PinRoot::new();
    let clsact = |opts: AgentOptions| AgentOptions {
        tc_attach: Some("clsact".into()),
        ..opts
    };
    let only_ours = |what: &str| -> (u64, u64) {
        let (ingress, egress) = scene.router.cls_bpf_filters("tapdev0");
        match (ingress.as_slice(), egress.as_slice()) {
            ([(i, iid)], [(e, eid)]) if i == "tc_ingress" && e == "tc_egress" => (*iid, *eid),
            _ => panic!(
                "{what}: tapdev0 must carry one cls_bpf filter per direction, tc_ingress and tc_egress; tc shows ingress {ingress:?}, egress {egress:?}"
            ),
        }
    };
    let agent = scene.agent(Mode::Enforce, &pin, clsact(AgentOptions::pinned()));
    let idx = scene.vm.ifindex();
    assert_eq!(
        status_interfaces(&agent),
        [json!({"name": "tapdev0", "ifindex": idx, "env": "dev", "attach": "clsact"})],
    );
    assert!(
        tcx_pins(&pin).is_empty(),
        "no tcx links: {:?}",
        tcx_pins(&pin)
    );
    assert_eq!(
        scene.router.tcx_programs("tapdev0"),
        (vec![], vec![]),
        "nothing on tcx"
    );
    let first = only_ours("the first agent");
    check_flows(&scene, &agent, Mode::Enforce, &scene.vm, "tapdev0");
    agent.stop();

    // No agent: the filters keep enforcing.
    assert_eq!(only_ours("no agent"), first, "the filters stay");
    let r = scene.probe(&scene.vm, Proto::Tcp, &scene.prod, Family::V4, PROD_PORT);
    assert!(!r.ok, "dropped while no agent runs: {}", r.raw);

    // Another agent of its own pin root on the same device: its filters
    // are not ours to remove, nor ours its.
    let other_pin = PinRoot::new();
    let other = scene.agent(Mode::Enforce, &other_pin, clsact(AgentOptions::ephemeral()));
    let (ingress, egress) = scene.router.cls_bpf_filters("tapdev0");
    assert_eq!(
        (ingress.len(), egress.len()),
        (2, 2),
        "two pin roots, two filters per direction: {ingress:?} {egress:?}"
    );
    other.stop();
    assert_eq!(
        only_ours("the other pin root's agent detached"),
        first,
        "detaching the other pin root removed only its own filters"
    );

    // The next agent of this pin root: its filters replace the first ones.
    let agent = scene.agent(
        Mode::Enforce,
        &pin,
        clsact(AgentOptions {
            detach_on_exit: true,
            ..AgentOptions::pinned().adopting()
        }),
    );
    let second = only_ours("the restarted agent");
    assert!(
        second.0 != first.0 && second.1 != first.1,
        "the restarted agent's own programs: {first:?} then {second:?}"
    );
    assert_dropped_and_reported_after_restart(&scene, &agent);
    agent.stop();
    assert_eq!(
        scene.router.cls_bpf_filters("tapdev0"),
        (vec![], vec![]),
        "detached on exit: no filter left"
    );
    let r = scene.probe_ok(&scene.vm, Proto::Tcp, &scene.prod, Family::V4, PROD_PORT);
    assert!(r.ok, "nothing enforces once detached: {}", r.raw);
}

/// An interface that appears while the agent runs and matches a listed
/// prefix gets the hooks (within the agent's one-second poll) and is
/// enforced; removing it removes its pins.
#[test]
fn late_interface_matching_a_prefix_is_attached() {
    let scene = Scene::new(Mode::Enforce);
    let pin = PinRoot::new();
    let agent = scene.agent(Mode::Enforce, &pin, AgentOptions::ephemeral());
    let created = Instant::now();
    let late = scene.router.host(5, "tapdev9");
    let idx = late.ifindex();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = status_interfaces(&agent);
        if now.iter().any(|i| i["name"] == "tapdev9") {
            assert!(
                now.contains(
                    &json!({"name": "tapdev9", "ifindex": idx, "env": "dev", "attach": "tcx"})
                ),
                "{now:?}"
            );
            // A figure for people, not an assertion (no timed assertions).
            eprintln!(
                "tapdev9 attached {:?} after its creation began (status polled every 20 ms)",
                created.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tapdev9 was not attached within 10 s; status interfaces: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    check_flows(&scene, &agent, Mode::Enforce, &late, "tapdev9");
    drop(late);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tcx_pins(&pin)
        .iter()
        .any(|p| p.starts_with(&format!("tcx_{idx}_")))
    {
        assert!(
            Instant::now() < deadline,
            "the pins of a removed interface must go: {:?}",
            tcx_pins(&pin)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.stop();
}

/// The attack the flow state must resist: a VM that routes a subnet of
/// its own (198.18.9.0/24, routed by the router to the VM, as for guests
/// nested in it) spoofs prod's address as the source of a packet to that
/// subnet, which the router sends back out of `tapdev0`. Judged as dev ->
/// dev that would be allowed, and its "reply" entry — 198.18.9.1:40000 ->
/// prod:5432 arriving through `tapdev0` — would then let the VM reach prod
/// from 198.18.9.1:40000 as if answering. The reverse-path check refuses to
/// judge (or record) a packet whose source does not route back through the
/// interface it came in by: the spoofed packet is unjudgeable (dropped in
/// enforce, passed in audit, counted), and the VM's later packet to prod is
/// judged as the new flow it is and reported. The router's own rp_filter is
/// off so that only envguard stands in the way.
fn spoofed_source_cannot_seed_a_reply(mode: Mode) {
    let scene = Scene::new(mode);
    for key in [
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
        "net.ipv4.conf.tapdev0.rp_filter=0",
    ] {
        scene.router.sysctl(key);
    }
    let r_ns = scene.router.ns.name();
    envguard_tests::sys::ip(&[
        "-n",
        r_ns,
        "route",
        "add",
        "198.18.9.0/24",
        "via",
        "198.18.1.2",
        "dev",
        "tapdev0",
    ]);
    let pin = PinRoot::new();
    let agent = scene.agent(mode, &pin, AgentOptions::ephemeral());
    let attacker = envguard_tests::attack::Attacker::new(EGATTACK);
    let vm_place = Place {
        netns: Some(scene.vm.ns.name().to_owned()),
        cgroup: None,
    };
    let vm_ns = scene.vm.ns.name();
    let prod = scene.prod.addr(Family::V4).to_string();
    // The VM takes prod's address and sends "from prod:5432".
    envguard_tests::sys::ip(&[
        "-n",
        vm_ns,
        "addr",
        "add",
        &format!("{prod}/32"),
        "dev",
        "eth0",
    ]);
    let seed = attacker.run(
        &vm_place,
        None,
        &["udp-from", &prod, "5432", "198.18.9.1", "40000"],
    );
    assert_eq!(seed["outcome"], "timeout", "the seeding packet: {seed}");
    agent.wait_for(
        "unparsable_packets: the spoofed packet was refused by the reverse-path check",
        EVENT_TIMEOUT,
        |v| v["kind"] == "unparsable_packets" && v["count"].as_u64().is_some_and(|c| c >= 1),
    );
    // Then uses the "reply" it hoped to have seeded.
    envguard_tests::sys::ip(&[
        "-n",
        vm_ns,
        "addr",
        "del",
        &format!("{prod}/32"),
        "dev",
        "eth0",
    ]);
    envguard_tests::sys::ip(&["-n", vm_ns, "addr", "add", "198.18.9.1/32", "dev", "eth0"]);
    let r = attacker.run(
        &vm_place,
        None,
        &["udp-from", "198.18.9.1", "40000", &prod, "5432"],
    );
    let want = match mode {
        Mode::Enforce => "timeout",
        Mode::Audit => "echo",
    };
    assert_eq!(r["outcome"], want, "the VM's datagram to prod: {r}");
    let v = agent
        .wait_for(
            "the VM's datagram to prod, judged as a new flow",
            EVENT_TIMEOUT,
            |v| {
                v["kind"] == "violation"
                    && v["hook"] == "tc_ingress"
                    && v["source"]["ip"] == "198.18.9.1"
                    && v["source"]["port"] == 40000
            },
        )
        .1;
    assert_eq!(v["verdict"], json!(mode.verdict()), "{v}");
    assert_eq!(v["interface"], "tapdev0", "{v}");
    assert_eq!(v["source"]["env"], "dev", "{v}");
    assert_eq!(v["source"]["env_from"], "interface", "{v}");
    assert_eq!(v["destination"]["ip"], json!(prod), "{v}");
    assert_eq!(v["destination"]["port"], 5432, "{v}");
    assert_eq!(v["destination"]["env"], "prod", "{v}");
    assert_eq!(v["proto"], "udp", "{v}");
    agent.stop();
}

#[test]
fn spoofed_source_cannot_seed_a_reply_enforce() {
    spoofed_source_cannot_seed_a_reply(Mode::Enforce);
}

#[test]
fn spoofed_source_cannot_seed_a_reply_audit() {
    spoofed_source_cannot_seed_a_reply(Mode::Audit);
}

/// Established flows across a mode switch and a reload: the VM's audited
/// connection to prod is cut at its next packet once the mode is switched to
/// enforce, with a `denied` record from `tc_ingress`; its connection to
/// shared keeps working after a reload in enforce mode (its entries are of
/// the old policy: the request is judged again, and the reply — shared ->
/// dev, which no rule allows — re-judges the flow it answers rather than
/// being judged as a flow of its own).
#[test]
fn mode_switch_and_reload_on_established_flows() {
    let scene = Scene::new(Mode::Audit);
    let pin = PinRoot::new();
    let agent = scene.agent(Mode::Audit, &pin, AgentOptions::ephemeral());
    let attacker = envguard_tests::attack::Attacker::new(EGATTACK);
    let vm_place = Place {
        netns: Some(scene.vm.ns.name().to_owned()),
        cgroup: None,
    };
    let (sh_ip, pr_ip) = (
        scene.shared.addr(Family::V4).to_string(),
        scene.prod.addr(Family::V4).to_string(),
    );
    let mut to_shared = attacker.interactive(
        &vm_place,
        None,
        &["tcp-hold", &sh_ip, &SHARED_PORT.to_string()],
    );
    assert_eq!(to_shared.next()["connected"], "echo", "VM -> shared");
    let mut to_prod = attacker.interactive(
        &vm_place,
        None,
        &["tcp-hold", &pr_ip, &PROD_PORT.to_string()],
    );
    assert_eq!(to_prod.next()["connected"], "echo", "VM -> prod, audited");

    agent
        .cli(&["mode", "enforce"], None)
        .assert_ok("envguard mode enforce");
    to_prod.send("again");
    let r = to_prod.next();
    assert_ne!(
        r["exchange"], "echo",
        "VM -> prod after the switch to enforce: {r}"
    );
    let v = agent
        .wait_for("the held connection to prod, denied", EVENT_TIMEOUT, |v| {
            v["kind"] == "violation" && v["hook"] == "tc_ingress" && v["verdict"] == "denied"
        })
        .1;
    assert_eq!(v["destination"]["ip"], json!(pr_ip), "{v}");
    assert_eq!(v["destination"]["port"], PROD_PORT, "{v}");
    assert_eq!(v["source"]["env_from"], "interface", "{v}");
    assert_eq!(v["interface"], "tapdev0", "{v}");

    scene
        .policy
        .rewrite(&format!("{}# reloaded\n", policy(Mode::Audit)));
    agent.cli(&["reload"], None).assert_ok("envguard reload");
    to_shared.send("again");
    assert_eq!(
        to_shared.next()["exchange"],
        "echo",
        "VM -> shared after the reload, in enforce mode"
    );
    let lines = agent.lines(0..agent.len());
    let shared: Vec<&Value> = lines
        .iter()
        .filter(|v| v["kind"] == "violation" && v["source"]["env"] == "shared")
        .collect();
    assert!(
        shared.is_empty(),
        "shared's replies must not be judged as flows of their own: {shared:?}"
    );
    agent.stop();
}

/// Flows that enter through an unlisted interface and leave through the
/// listed one are judged at `tc_egress`: prod (by CIDR, behind `prod0`) ->
/// the VM is dropped and reported with the VM's interface as the
/// destination's env; a world host (behind `other0`) reaches the VM (world ->
/// dev is allowed by the defaults) and the VM's answers go back by the flow
/// state that packet recorded.
#[test]
fn flows_into_a_listed_interface_are_judged_at_tc_egress() {
    const VM_PORT: u16 = 7000;
    let scene = Scene::new(Mode::Enforce);
    let vm_place = Place {
        netns: Some(scene.vm.ns.name().to_owned()),
        cgroup: None,
    };
    let addrs: Vec<IpAddr> = Family::ALL.iter().map(|&f| scene.vm.addr(f)).collect();
    let _server = Server::spawn(&scene.egprobe, &vm_place, Proto::Tcp, &addrs, VM_PORT);
    let pin = PinRoot::new();
    let agent = scene.agent(Mode::Enforce, &pin, AgentOptions::ephemeral());
    for fam in Family::ALL {
        let r = scene.probe(&scene.other, Proto::Tcp, &scene.vm, fam, VM_PORT);
        assert!(r.ok, "{fam:?} world -> VM must pass both ways: {}", r.raw);
        let r = scene.probe(&scene.prod, Proto::Tcp, &scene.vm, fam, VM_PORT);
        assert!(!r.ok, "{fam:?} prod -> VM must be dropped: {}", r.raw);
        let (src, dst) = (
            scene.prod.addr(fam).to_string(),
            scene.vm.addr(fam).to_string(),
        );
        let v = agent
            .wait_for(
                &format!("tc_egress violation {src} -> {dst}:{VM_PORT}"),
                EVENT_TIMEOUT,
                |v| {
                    v["kind"] == "violation"
                        && v["hook"] == "tc_egress"
                        && v["source"]["ip"] == json!(src)
                },
            )
            .1;
        let want = |path: &str, got: &Value, expected: Value| {
            assert_eq!(*got, expected, "{path} of {v}");
        };
        want("verdict", &v["verdict"], json!("denied"));
        want("direction", &v["direction"], json!("egress"));
        want("interface", &v["interface"], json!("tapdev0"));
        want("proto", &v["proto"], json!("tcp"));
        want("source.env", &v["source"]["env"], json!("prod"));
        want("source.env_from", &v["source"]["env_from"], json!("cidr"));
        if let Some(p) = r.local {
            want("source.port", &v["source"]["port"], json!(p.port()));
        }
        want("destination.ip", &v["destination"]["ip"], json!(dst));
        want(
            "destination.port",
            &v["destination"]["port"],
            json!(VM_PORT),
        );
        want("destination.env", &v["destination"]["env"], json!("dev"));
        want(
            "destination.env_from",
            &v["destination"]["env_from"],
            json!("interface"),
        );
        want(
            "rule",
            &v["rule"],
            json!("default:cross-env (no allow rule for prod -> dev)"),
        );
    }
    let lines = agent.lines(0..agent.len());
    let world: Vec<&Value> = lines
        .iter()
        .filter(|v| {
            v["kind"] == "violation"
                && (v["source"]["env"] == "world" || v["destination"]["env"] == "world")
        })
        .collect();
    assert!(world.is_empty(), "world <-> VM is allowed: {world:?}");
    agent.stop();
}

/// Bridged, not routed: the VM, prod and shared hosts are ports of one
/// bridge `br20` (the router has an address on it, so it routes that
/// subnet) and the VM's port `tapdev1` is listed. Frames bridged from the
/// VM to prod are dropped at `tc_ingress` of the port and reported; the
/// VM's flows to shared pass both ways (the replies, bridged back from
/// shared's port, find the flow state the VM's judged request recorded
/// under the bridge).
#[test]
fn bridged_flows_from_a_listed_port() {
    envguard_tests::sys::require_root();
    let router = Router::create();
    let br = router.bridge("br20", 20);
    let vm = router.bridged_host(&br, "tapdev1", 2);
    let prod = router.bridged_host(&br, "prodport", 3);
    let shared = router.bridged_host(&br, "sharedport", 4);
    let egprobe = PathBuf::from(EGPROBE);
    let mut servers = Vec::new();
    for (host, port) in [(&prod, PROD_PORT), (&shared, SHARED_PORT)] {
        let place = Place {
            netns: Some(host.ns.name().to_owned()),
            cgroup: None,
        };
        let addrs: Vec<IpAddr> = Family::ALL.iter().map(|&f| host.addr(f)).collect();
        for proto in [Proto::Tcp, Proto::Udp] {
            servers.push(Server::spawn(&egprobe, &place, proto, &addrs, port));
        }
    }
    let policy = TempFile::new(
        "egtc-policy",
        ".toml",
        &format!(
            r#"mode = "enforce"

[envs.dev]
interfaces = ["tapdev*"]

[envs.prod]
cidrs = ["{}/32", "{}/128"]

[envs.shared]
cidrs = ["{}/32", "{}/128"]

[[allow]]
from = "*"
to = "shared"
"#,
            prod.addr(Family::V4),
            prod.addr(Family::V6),
            shared.addr(Family::V4),
            shared.addr(Family::V6)
        ),
    );
    let cgroups = CgroupTree::create();
    let pin = PinRoot::new();
    let agent = Agent::start(
        policy.path(),
        &cgroups.rel(""),
        Mode::Enforce,
        pin.path(),
        &AgentOptions {
            binary: Some(router.agent_binary().to_owned()),
            envs: Some(vec!["dev".into(), "prod".into(), "shared".into()]),
            ..AgentOptions::ephemeral()
        },
    );
    let probe = |to: &Host, proto: Proto, fam: Family, port: u16| {
        Probe {
            place: Place {
                netns: Some(vm.ns.name().to_owned()),
                cgroup: None,
            },
            proto,
            dst: SocketAddr::new(to.addr(fam), port),
            bind: None,
            timeout_ms: 1500,
        }
        .run(&egprobe)
    };
    for fam in Family::ALL {
        for proto in [Proto::Tcp, Proto::Udp] {
            let r = probe(&shared, proto, fam, SHARED_PORT);
            assert!(
                r.ok,
                "{fam:?} {} VM -> shared across the bridge: {}",
                proto.name(),
                r.raw
            );
            let r = probe(&prod, proto, fam, PROD_PORT);
            assert!(
                !r.ok,
                "{fam:?} {} VM -> prod across the bridge must be dropped: {}",
                proto.name(),
                r.raw
            );
            let v = wait_violation(&agent, &vm, &prod, fam, proto, PROD_PORT);
            assert_tc_violation(
                &v,
                Mode::Enforce,
                "tapdev1",
                (&vm, &prod, fam, proto),
                r.local.map(|a| a.port()),
            );
        }
    }
    let lines = agent.lines(0..agent.len());
    let noise: Vec<&Value> = lines
        .iter()
        .filter(|v| {
            v["kind"] == "violation"
                && (v["destination"]["env"] == "shared" || v["source"]["env"] == "shared")
        })
        .collect();
    assert!(noise.is_empty(), "VM <-> shared is allowed: {noise:?}");
    agent.stop();
    drop(servers);
}
