//! Container endpoints: network namespaces made by the test, whose processes
//! are of one env, give their addresses that env (`env_from: "endpoint"`)
//! with no CIDR in the policy for them.
//!
//! ```text
//!   netns P (prod)                                netns D (dev)
//!   prod echo server, [::]:9000                   dev echo server, [::]:9001+ (keeps D "dev")
//!   pe-<pid>-<n> <========== veth ==========>    de-<pid>-<n>
//!     198.19.N.1/24, 2001:db8:e0:N::1/64            198.19.N.2/24, 2001:db8:e0:N::2/64
//! ```
//!
//! Both ends of the veth are born inside the namespaces, which have no
//! other interface and no route out: no packet of these tests reaches the
//! host's namespace or leaves the machine. `198.19.N.0/24` and
//! `2001:db8:e0:N::/64` are in no CIDR of the policy (`world` without
//! endpoints: the standard policy lets `dev → world` through, so a refusal
//! can only come from the endpoint). The agent runs in the test runner's
//! (host) namespace, and its cgroup hooks see the namespaces' processes
//! because they are in its cgroup tree.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use envguard_tests::{
    AgentOptions, CgroupTree, Client, Family, Lab, Mode, Netns, Place, PolicyExtras, Probe, Proto,
    Server, Site, attack::Attacker, sys,
};
use serde_json::Value;

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");
const EGATTACK: &str = env!("CARGO_BIN_EXE_egattack");
const NOBODY: u32 = 65534;
const PORT: u16 = 9000;
const KEEPER_PORT: u16 = 9001;
/// Learning or forgetting an endpoint takes one holder pass (500 ms) plus
/// the work; this is the bound the tests wait for, not a speed claim.
const LEARN_TIMEOUT: Duration = Duration::from_secs(10);
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A per-test subnet number (1..=250), from the pid and a counter.
fn subnet() -> u8 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    ((std::process::id().wrapping_mul(7).wrapping_add(n * 31)) % 250 + 1) as u8
}

fn addr(fam: Family, net: u8, host: u8) -> IpAddr {
    match fam {
        Family::V4 => Ipv4Addr::new(198, 19, net, host).into(),
        Family::V6 => Ipv6Addr::new(0x2001, 0xdb8, 0xe0, net as u16, 0, 0, 0, host as u16).into(),
    }
}

fn add_addr(ns: &str, dev: &str, a: IpAddr) {
    match a {
        IpAddr::V4(_) => sys::ip(&[
            "-n",
            ns,
            "-4",
            "addr",
            "add",
            &format!("{a}/24"),
            "dev",
            dev,
        ]),
        IpAddr::V6(_) => sys::ip(&[
            "-n",
            ns,
            "-6",
            "addr",
            "add",
            &format!("{a}/64"),
            "dev",
            dev,
            "nodad",
        ]),
    }
}

fn del_addr(ns: &str, dev: &str, a: IpAddr) {
    let len = if a.is_ipv4() { 24 } else { 64 };
    sys::ip(&["-n", ns, "addr", "del", &format!("{a}/{len}"), "dev", dev]);
}

/// The test's namespaces and the processes inside them. Field order is drop
/// order: the processes go before their namespaces.
struct Spaces {
    servers: Vec<Server>,
    ns: Vec<Netns>,
}

impl Spaces {
    fn new() -> Spaces {
        sys::require_ip();
        Spaces {
            servers: Vec::new(),
            ns: Vec::new(),
        }
    }

    fn netns(&mut self, prefix: &str) -> String {
        let ns = Netns::create(prefix);
        let name = ns.name().to_owned();
        self.ns.push(ns);
        name
    }

    /// A veth pair from `a` (`a_if`) to `b` (`b_if`), both ends born inside
    /// the namespaces, up.
    fn link(&self, a: &str, a_if: &str, b: &str, b_if: &str) {
        sys::ip(&[
            "-n", a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b,
        ]);
        sys::ip(&["-n", a, "link", "set", a_if, "up"]);
        sys::ip(&["-n", b, "link", "set", b_if, "up"]);
    }

    /// An echo server (TCP, `[::]:PORT`) at `place`; returns its index.
    fn serve(&mut self, place: &Place) -> usize {
        self.serve_on(place, PORT)
    }

    /// A process that only makes its namespace someone's: it listens on
    /// another port than the one probed, since a wildcard listener on the
    /// probed port in the prober's own namespace would be taken for the
    /// destination (the same-host socket lookup matches it).
    fn keep(&mut self, place: &Place) -> usize {
        // A port of its own each, as several may share a namespace.
        self.serve_on(place, KEEPER_PORT + self.servers.len() as u16)
    }

    fn serve_on(&mut self, place: &Place, port: u16) -> usize {
        let any: IpAddr = Ipv6Addr::UNSPECIFIED.into();
        self.servers.push(Server::spawn(
            &PathBuf::from(EGPROBE),
            place,
            Proto::Tcp,
            &[any],
            port,
        ));
        self.servers.len() - 1
    }
}

/// The inode of a process's network namespace.
fn netns_inode(pid: u32) -> u64 {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/ns/net: {e}"));
    link.to_str()
        .and_then(|s| s.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok())
        .unwrap_or_else(|| panic!("unexpected netns link {link:?}"))
}

/// The endpoint `status` shows for `a`, if any.
fn endpoint(lab: &Lab, a: IpAddr) -> Option<Value> {
    let status = lab.status();
    let list = status["endpoints"]
        .as_array()
        .unwrap_or_else(|| panic!("status without endpoints: {status}"));
    list.iter()
        .find(|e| e["address"].as_str() == Some(&a.to_string()))
        .cloned()
}

/// Waits until `status` shows `a` with env `env` (`None`: not at all);
/// returns how long that took and the entry.
fn wait_endpoint(lab: &Lab, a: IpAddr, env: Option<&str>) -> (Duration, Option<Value>) {
    let start = Instant::now();
    loop {
        let e = endpoint(lab, a);
        let now = e
            .as_ref()
            .map(|e| e["env"].as_str().unwrap_or("").to_owned());
        if now.as_deref() == env {
            return (start.elapsed(), e);
        }
        assert!(
            start.elapsed() < LEARN_TIMEOUT,
            "endpoint {a}: wanted env {env:?}, status still says {e:?} after {LEARN_TIMEOUT:?}; agent stderr:\n{}",
            lab.agent().stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn probe(place: &Place, dst: IpAddr, timeout_ms: u32) -> envguard_tests::ProbeResult {
    Probe {
        place: place.clone(),
        proto: Proto::Tcp,
        dst: SocketAddr::new(dst, PORT),
        bind: None,
        timeout_ms,
    }
    .run(&PathBuf::from(EGPROBE))
}

/// The first violation after line `from` with this hook and destination.
fn violation(lab: &Lab, from: usize, hook: &str, dst: IpAddr) -> Value {
    let ip = dst.to_string();
    lab.agent()
        .wait_for(&format!("a {hook} violation to {ip}"), EVENT_TIMEOUT, |v| {
            v["kind"] == "violation"
                && v["hook"].as_str().is_some_and(|h| h.starts_with(hook))
                && v["destination"]["ip"].as_str() == Some(ip.as_str())
                && v["seq"].as_u64().unwrap_or(0) as usize >= from
        })
        .1
}

fn assert_side(v: &Value, side: &str, env: &str, env_from: &str) {
    assert_eq!(v[side]["env"], env, "{side}.env of {v}");
    assert_eq!(v[side]["env_from"], env_from, "{side}.env_from of {v}");
}

/// Lines received so far (the next record's seq is at least this).
fn mark(lab: &Lab) -> usize {
    lab.agent().len()
}

/// The lab with its policy: the standard one (its CIDRs are elsewhere),
/// `dev` also listing a cgroup of a second tree outside the agent's attach
/// point, whose processes' connect() the agent does not see: peers whose
/// packets only the receiving side judges.
fn lab_with_outside(mode: Mode) -> (Lab, CgroupTree) {
    let mut lab = Lab::new(EGPROBE, mode);
    let outside = CgroupTree::create();
    outside.mkdir("dev");
    let text = lab.policy_text(&PolicyExtras::default());
    let dev_line = format!("cgroups = [\"{}\"]", lab.cg.rel("dev"));
    assert!(text.contains(&dev_line), "standard policy changed: {text}");
    let text = text.replace(
        &dev_line,
        &format!(
            "cgroups = [\"{}\", \"{}\"]",
            lab.cg.rel("dev"),
            outside.rel("dev")
        ),
    );
    lab.write_policy_raw(&text);
    lab.spawn_agent(&AgentOptions::ephemeral());
    (lab, outside)
}

struct Pair {
    p: String,
    d: String,
    d_if: String,
    net: u8,
    prod_server: usize,
}

/// Netns P with a prod server, netns D with a dev server, linked.
fn prod_and_dev(lab: &Lab, sp: &mut Spaces) -> Pair {
    let net = subnet();
    let p = sp.netns("egp");
    let d = sp.netns("egd");
    let suffix = p.trim_start_matches("egp").to_owned();
    let (p_if, d_if) = (format!("pe{suffix}"), format!("de{suffix}"));
    sp.link(&p, &p_if, &d, &d_if);
    for fam in Family::ALL {
        add_addr(&p, &p_if, addr(fam, net, 1));
        add_addr(&d, &d_if, addr(fam, net, 2));
    }
    let prod_server = sp.serve(&Place {
        netns: Some(p.clone()),
        cgroup: Some(lab.cg.abs("prod")),
    });
    sp.keep(&Place {
        netns: Some(d.clone()),
        cgroup: Some(lab.cg.abs("dev")),
    });
    Pair {
        p,
        d,
        d_if,
        net,
        prod_server,
    }
}

fn dev_in(lab: &Lab, ns: &str) -> Place {
    Place {
        netns: Some(ns.to_owned()),
        cgroup: Some(lab.cg.abs("dev")),
    }
}

#[test]
fn enforce_dev_to_prod_endpoint_is_refused_and_the_prod_listener_judges_dev_peers() {
    let (lab, outside) = lab_with_outside(Mode::Enforce);
    let mut sp = Spaces::new();
    let pair = prod_and_dev(&lab, &mut sp);
    let p_inode = netns_inode(sp.servers[pair.prod_server].pid());
    for fam in Family::ALL {
        let (took, e) = wait_endpoint(&lab, addr(fam, pair.net, 1), Some("prod"));
        let e = e.expect("an endpoint");
        assert_eq!(e["netns"], p_inode, "netns of {e}");
        assert!(
            e["since"].as_str().is_some_and(|s| s.ends_with('Z')),
            "since of {e}"
        );
        eprintln!(
            "endpoints: {} learnt as prod {took:?} after the check started",
            addr(fam, pair.net, 1)
        );
        wait_endpoint(&lab, addr(fam, pair.net, 2), Some("dev"));
    }
    // The human status lists them too, within 80 columns.
    let human = lab.cli(&["status"]);
    human.assert_ok("envguard status");
    for fam in Family::ALL {
        let a = addr(fam, pair.net, 1).to_string();
        let line = human
            .stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(a.as_str()))
            .unwrap_or_else(|| panic!("envguard status does not list {a}:\n{}", human.stdout));
        assert!(
            line.contains(" prod ") && line.contains(&format!("netns {p_inode}")),
            "status line for {a}: {line:?}"
        );
        assert!(line.chars().count() <= 80, "status line too wide: {line:?}");
    }
    // `explain` asks the agent, which answers as the kernel judges: the
    // learnt endpoint's env, not the CIDRs'.
    for fam in Family::ALL {
        let dst = addr(fam, pair.net, 1).to_string();
        let dev_cgroup = lab.cg.rel("dev");
        let port = format!("{PORT}/tcp");
        let r = lab.cli(&[
            "explain",
            "--from",
            &dev_cgroup,
            "--to",
            &dst,
            "--port",
            &port,
            "--json",
        ]);
        r.assert_ok("envguard explain");
        let e: Value = serde_json::from_str(r.stdout.trim())
            .unwrap_or_else(|err| panic!("explain --json printed no JSON ({err}): {}", r.stdout));
        assert_eq!(e["to"]["env"], "prod", "explain's destination: {e}");
        assert_eq!(
            e["to"]["env_from"], "endpoint",
            "explain's destination: {e}"
        );
        assert_eq!(e["decision"], "violation", "{e}");
        assert_eq!(e["mode"]["effect"], "refused", "{e}");
    }
    for fam in Family::ALL {
        let dst = addr(fam, pair.net, 1);
        // A dev process's connect: refused at connect().
        let from = mark(&lab);
        let r = probe(&dev_in(&lab, &pair.d), dst, 3000);
        assert!(r.is_refused(), "dev -> prod endpoint {dst}: {}", r.raw);
        let v = violation(&lab, from, "connect", dst);
        assert_eq!(v["verdict"], "denied", "{v}");
        assert_eq!(v["direction"], "egress", "{v}");
        assert_side(&v, "source", "dev", "cgroup");
        assert_side(&v, "destination", "prod", "endpoint");
        assert_eq!(v["process"]["pid"], r.pid, "{v}");

        // A dev peer whose connect() the agent does not see: the prod
        // listener's skb_ingress judges it by its address's endpoint env.
        let from = mark(&lab);
        let peer = Place {
            netns: Some(pair.d.clone()),
            cgroup: Some(outside.abs("dev")),
        };
        let r = probe(&peer, dst, 1500);
        assert!(
            !r.ok && !r.is_refused(),
            "dev peer -> prod listener {dst} must time out (dropped at ingress): {}",
            r.raw
        );
        let v = violation(&lab, from, "skb_ingress", dst);
        assert_eq!(v["verdict"], "denied", "{v}");
        assert_eq!(v["direction"], "ingress", "{v}");
        assert_side(&v, "source", "dev", "endpoint");
        assert_side(&v, "destination", "prod", "cgroup");
        assert_eq!(v["source"]["ip"], addr(fam, pair.net, 2).to_string(), "{v}");
    }
    drop(sp);
    drop(lab);
    drop(outside);
}

#[test]
fn audit_dev_to_prod_endpoint_is_reported_and_connects() {
    let (lab, _outside) = lab_with_outside(Mode::Audit);
    let mut sp = Spaces::new();
    let pair = prod_and_dev(&lab, &mut sp);
    for fam in Family::ALL {
        wait_endpoint(&lab, addr(fam, pair.net, 1), Some("prod"));
        wait_endpoint(&lab, addr(fam, pair.net, 2), Some("dev"));
    }
    for fam in Family::ALL {
        let dst = addr(fam, pair.net, 1);
        let from = mark(&lab);
        let r = probe(&dev_in(&lab, &pair.d), dst, 3000);
        assert!(r.ok, "dev -> prod endpoint {dst} in audit: {}", r.raw);
        let v = violation(&lab, from, "connect", dst);
        assert_eq!(v["verdict"], "audited", "{v}");
        assert_side(&v, "source", "dev", "cgroup");
        assert_side(&v, "destination", "prod", "endpoint");
        // The listener's side saw the same flow arrive from a dev endpoint.
        let v = violation(&lab, from, "skb_ingress", dst);
        assert_eq!(v["verdict"], "audited", "{v}");
        assert_side(&v, "source", "dev", "endpoint");
    }
}

#[test]
fn a_namespace_of_host_and_prod_processes_or_of_two_envs_claims_nothing() {
    let (lab, _outside) = lab_with_outside(Mode::Enforce);
    let mut sp = Spaces::new();
    let pair = prod_and_dev(&lab, &mut sp);
    let dst: Vec<IpAddr> = Family::ALL.iter().map(|&f| addr(f, pair.net, 1)).collect();
    for &a in &dst {
        wait_endpoint(&lab, a, Some("prod"));
    }
    // A process of no env (the tree's root: `host`) joins P: P's addresses
    // are no one's; dev's connect() to them is judged as to `world`, which
    // the policy allows (the prod listener still drops the SYN: its peer's
    // address is a dev endpoint).
    sp.keep(&Place {
        netns: Some(pair.p.clone()),
        cgroup: Some(lab.cg.abs("")),
    });
    for &a in &dst {
        let (took, _) = wait_endpoint(&lab, a, None);
        eprintln!("endpoints: {a} forgotten {took:?} after a host process joined its namespace");
        let from = mark(&lab);
        let r = probe(&dev_in(&lab, &pair.d), a, 1500);
        assert!(
            !r.ok && !r.is_refused(),
            "dev -> {a} (no endpoint: world at connect, dropped at the listener): {}",
            r.raw
        );
        let v = violation(&lab, from, "skb_ingress", a);
        assert_side(&v, "source", "dev", "endpoint");
        assert_side(&v, "destination", "prod", "cgroup");
        assert!(
            !lab.agent().lines(from..usize::MAX).iter().any(|l| {
                l["hook"].as_str().is_some_and(|h| h.starts_with("connect"))
                    && l["destination"]["ip"] == a.to_string()
            }),
            "dev's connect() to {a} was reported although {a} is no endpoint"
        );
    }
    // A dev process joins too: a namespace of two envs is host-like as
    // well, no conflict. An address added to D afterwards showing up proves
    // a pass saw the join.
    let from = mark(&lab);
    sp.keep(&dev_in(&lab, &pair.p));
    let late = addr(Family::V4, pair.net, 3);
    add_addr(&pair.d, &pair.d_if, late);
    wait_endpoint(&lab, late, Some("dev"));
    for &a in &dst {
        assert_eq!(
            endpoint(&lab, a),
            None,
            "{a} claimed by a namespace of two envs"
        );
    }
    assert!(
        !lab.agent()
            .lines(from..lab.agent().len())
            .iter()
            .any(|v| v["kind"] == "endpoint_conflict"),
        "a namespace of two envs is no conflict"
    );
}

#[test]
fn an_address_claimed_by_dev_and_prod_namespaces_is_a_conflict_refused_to_both() {
    let (lab, _outside) = lab_with_outside(Mode::Enforce);
    let mut sp = Spaces::new();
    let pair = prod_and_dev(&lab, &mut sp);
    // Netns S: a dev process, and P's addresses on a veth pair of its own.
    let s = sp.netns("egx");
    let suffix = s.trim_start_matches("egx").to_owned();
    let (s_a, s_b) = (format!("xa{suffix}"), format!("xb{suffix}"));
    sys::ip(&[
        "-n", &s, "link", "add", &s_a, "type", "veth", "peer", "name", &s_b,
    ]);
    sys::ip(&["-n", &s, "link", "set", &s_a, "up"]);
    sys::ip(&["-n", &s, "link", "set", &s_b, "up"]);
    for fam in Family::ALL {
        wait_endpoint(&lab, addr(fam, pair.net, 1), Some("prod"));
    }
    let from = mark(&lab);
    let squatter = sp.keep(&dev_in(&lab, &s));
    for fam in Family::ALL {
        add_addr(&s, &s_a, addr(fam, pair.net, 1));
    }
    let inodes = {
        let mut v = vec![
            netns_inode(sp.servers[pair.prod_server].pid()),
            netns_inode(sp.servers[squatter].pid()),
        ];
        v.sort();
        v
    };
    for fam in Family::ALL {
        let a = addr(fam, pair.net, 1);
        let (took, _) = wait_endpoint(&lab, a, Some("endpoint-conflict"));
        eprintln!("endpoints: {a} in conflict {took:?} after the dev namespace claimed it");
        let (_, rec) =
            lab.agent()
                .wait_for(&format!("endpoint_conflict for {a}"), EVENT_TIMEOUT, |v| {
                    v["kind"] == "endpoint_conflict"
                        && v["address"] == a.to_string()
                        && v["seq"].as_u64().unwrap_or(0) as usize >= from
                });
        let mut envs: Vec<&str> = rec["envs"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        envs.sort();
        assert_eq!(envs, ["dev", "prod"], "{rec}");
        assert_eq!(rec["netns"], serde_json::json!(inodes), "{rec}");
        assert_eq!(rec["pids"].as_array().map(Vec::len), Some(2), "{rec}");
        // The stricter side: the dev claim does not make the address dev's;
        // dev's flows to it are refused as to no env's...
        let m = mark(&lab);
        let r = probe(&dev_in(&lab, &pair.d), a, 3000);
        assert!(r.is_refused(), "dev -> conflicted {a}: {}", r.raw);
        let v = violation(&lab, m, "connect", a);
        assert_side(&v, "destination", "endpoint-conflict", "endpoint");
        // ... and prod's too: nobody trusts an address two envs claim.
        let m = mark(&lab);
        let prod_in_d = Place {
            netns: Some(pair.d.clone()),
            cgroup: Some(lab.cg.abs("prod")),
        };
        let r = probe(&prod_in_d, a, 3000);
        assert!(r.is_refused(), "prod -> conflicted {a}: {}", r.raw);
        let v = violation(&lab, m, "connect", a);
        assert_side(&v, "source", "prod", "cgroup");
        assert_side(&v, "destination", "endpoint-conflict", "endpoint");
    }
    // The squatter leaves: the address is prod's again.
    for fam in Family::ALL {
        del_addr(&s, &s_a, addr(fam, pair.net, 1));
    }
    for fam in Family::ALL {
        wait_endpoint(&lab, addr(fam, pair.net, 1), Some("prod"));
    }
}

#[test]
fn addresses_are_learnt_and_forgotten_as_they_and_the_processes_come_and_go() {
    let (lab, _outside) = lab_with_outside(Mode::Enforce);
    let mut sp = Spaces::new();
    let pair = prod_and_dev(&lab, &mut sp);
    for fam in Family::ALL {
        wait_endpoint(&lab, addr(fam, pair.net, 2), Some("dev"));
    }
    // An address added to D: learnt; removed: forgotten.
    for fam in Family::ALL {
        let a = addr(fam, pair.net, 7);
        add_addr(&pair.d, &pair.d_if, a);
        let (learn, _) = wait_endpoint(&lab, a, Some("dev"));
        del_addr(&pair.d, &pair.d_if, a);
        let (forget, _) = wait_endpoint(&lab, a, None);
        eprintln!(
            "endpoints: {a} learnt in {learn:?} after ip addr add, forgotten in {forget:?} after ip addr del"
        );
    }
    // P's only process exits: P's addresses are forgotten, and dev reaches
    // them as `world` again (nothing listens there: refused by the peer,
    // not by the agent).
    drop(sp.servers.remove(pair.prod_server));
    for fam in Family::ALL {
        let a = addr(fam, pair.net, 1);
        let (forget, _) = wait_endpoint(&lab, a, None);
        eprintln!("endpoints: {a} forgotten {forget:?} after its namespace's last process exited");
        let r = probe(&dev_in(&lab, &pair.d), a, 3000);
        assert!(
            !r.ok && r.errno == Some(libc::ECONNREFUSED),
            "dev -> {a} after its namespace emptied: {}",
            r.raw
        );
    }
}

#[test]
fn a_reload_keeps_the_endpoints_in_force() {
    let (lab, outside) = lab_with_outside(Mode::Enforce);
    let mut sp = Spaces::new();
    let pair = prod_and_dev(&lab, &mut sp);
    let dst = addr(Family::V4, pair.net, 1);
    wait_endpoint(&lab, dst, Some("prod"));
    let (_, before) = wait_endpoint(&lab, addr(Family::V6, pair.net, 1), Some("prod"));
    // The same policy with a comment more: a new revision, written into the
    // other slot, whose endpoint table must be filled before it is active.
    let text = std::fs::read_to_string(lab.policy_path()).expect("reading the policy");
    lab.write_policy_raw(&format!("{text}\n# reloaded\n"));
    let from = mark(&lab);
    lab.agent().sighup();
    lab.agent()
        .wait_for("policy_loaded after SIGHUP", EVENT_TIMEOUT, |v| {
            v["kind"] == "policy_loaded" && v["seq"].as_u64().unwrap_or(0) as usize >= from
        });
    // At once. (The reload's own holder pass runs before `policy_loaded`
    // and would repair a table the reload left out, so this checks the
    // outcome, not that the slot was filled before it was made active.)
    let r = probe(&dev_in(&lab, &pair.d), dst, 3000);
    assert!(
        r.is_refused(),
        "dev -> prod endpoint {dst} right after a reload: {}",
        r.raw
    );
    let v = violation(&lab, from, "connect", dst);
    assert_side(&v, "destination", "prod", "endpoint");
    let after = endpoint(&lab, addr(Family::V6, pair.net, 1)).expect("endpoint after reload");
    assert_eq!(
        after["since"],
        before.expect("endpoint")["since"],
        "a reload that changes nothing keeps since"
    );
    drop(sp);
    drop(lab);
    drop(outside);
}

/// An unprivileged dev workload makes a user and network namespace of its
/// own (no privilege needed) and puts addresses on it that it does not own:
/// prod's remote address (which it would then reach as "dev"), and a prod
/// container's address (which would turn into a conflict, refused to prod's
/// own peers). Only namespaces of the agent's user namespace, which only root
/// makes and wires, claim addresses: these claim nothing.
#[test]
fn a_namespace_of_an_unprivileged_user_namespace_claims_nothing() {
    let (mut lab, _outside) = lab_with_outside(Mode::Enforce);
    lab.serve_remote_sites();
    let mut sp = Spaces::new();
    let pair = prod_and_dev(&lab, &mut sp);
    let container = addr(Family::V4, pair.net, 1);
    wait_endpoint(&lab, container, Some("prod"));
    let remote = Site::Prod.addr(Family::V4);
    let attacker = Attacker::new(EGATTACK);
    let dev = lab.client_place(Client::Dev);
    let claims: Vec<_> = [remote, container]
        .iter()
        .map(|a| {
            let c = attacker.interactive(&dev, Some(NOBODY), &["claim", &a.to_string()]);
            assert_eq!(
                c.next(),
                serde_json::json!({"claimed": a.to_string()}),
                "the attacker's namespace holds {a}"
            );
            c
        })
        .collect();
    // A pass after the claims: an address added to a real dev namespace
    // now shows up.
    let late = addr(Family::V4, pair.net, 3);
    add_addr(&pair.d, &pair.d_if, late);
    wait_endpoint(&lab, late, Some("dev"));
    assert_eq!(
        endpoint(&lab, remote),
        None,
        "prod's remote address must not become an endpoint"
    );
    assert_eq!(
        endpoint(&lab, container).map(|e| e["env"].clone()),
        Some(serde_json::json!("prod")),
        "the prod container's address stays prod's, not a conflict"
    );
    assert!(
        !lab.agent()
            .lines(0..lab.agent().len())
            .iter()
            .any(|v| v["kind"] == "endpoint_conflict"),
        "no endpoint_conflict"
    );
    // And dev is still refused prod's remote address, judged by its CIDR.
    let from = mark(&lab);
    let r = probe(&dev, remote, 3000);
    assert!(r.is_refused(), "dev -> prod {remote}: {}", r.raw);
    let v = violation(&lab, from, "connect", remote);
    assert_side(&v, "source", "dev", "cgroup");
    assert_side(&v, "destination", "prod", "cidr");
    drop(claims);
    lab.stop_agent();
}
