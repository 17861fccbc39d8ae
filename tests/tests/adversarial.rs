//! The adversarial suite: what a workload that *tries* to get around
//! envguard does, one test per bypass (issue "Hold against a hostile
//! workload"). Each attack runs from the `dev` cgroup — as uid 65534 where
//! the attack needs no privilege — against `prod`, and must be refused and
//! reported in enforce mode, and reported in audit mode.
//!
//! Policy: the standard one (prod and dev by cgroup and CIDR) plus
//! `[[allow]] from = "prod" to = "dev" ports = ["53/udp"]`.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use envguard_tests::{
    Client, Lab, Mode, Netns, PolicyExtras, Proto, Site, agent::AgentOptions, attack::Attacker,
    control::assert_fields, event::is_violation, netns::Family, sys,
};
use serde_json::{Value, json};

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");
const EGATTACK: &str = env!("CARGO_BIN_EXE_egattack");
/// The unprivileged attacker.
const NOBODY: u32 = 65534;
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn lab(mode: Mode) -> Lab {
    Lab::with_policy(
        EGPROBE,
        mode,
        &PolicyExtras {
            allow: "[[allow]]\nfrom = \"prod\"\nto = \"dev\"\nports = [\"53/udp\"]\n".into(),
            ..Default::default()
        },
    )
}

/// The refusal a mode gives an attempt the policy forbids at a socket hook.
fn refused_or_through(mode: Mode, through: &str) -> &str {
    if mode == Mode::Enforce {
        "refused"
    } else {
        through
    }
}

/// Waits (5 s at most) for the first violation record at or after line
/// `from` that `pred` accepts; returns its index and the record.
fn violation_after(
    lab: &Lab,
    from: usize,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> (usize, Value) {
    let find = |lines: &[Value]| {
        lines
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, v)| is_violation(v) && pred(v))
            .map(|(i, v)| (i, v.clone()))
    };
    match lab
        .agent()
        .wait_lines(Duration::from_secs(5), |lines| find(lines).is_some())
    {
        Ok(lines) => find(&lines).expect("found"),
        Err(lines) => panic!(
            "{what}: no violation record after line {from}; the agent printed:\n{}",
            envguard_tests::agent::dump_lines(&lines)
        ),
    }
}

fn count_violations(lab: &Lab, from: usize, pred: impl Fn(&Value) -> bool) -> usize {
    let agent = lab.agent();
    agent
        .lines(from..agent.len())
        .iter()
        .filter(|v| is_violation(v) && pred(v))
        .count()
}

// 1. Same-host table hijack: dev binds prod's UDP address itself
// (SO_REUSEADDR), closes it, and sends again.
fn same_host_hijack(mode: Mode) {
    let mut lab = lab(mode);
    let attacker = Attacker::new(EGATTACK);
    lab.start_agent();
    let port = "7401";
    let _prod = attacker.serve(
        &lab.client_place(Client::Prod),
        None,
        &["udp-serve", "127.0.0.1", port],
    );
    let mark = lab.agent().len();
    let r = attacker.run(
        &lab.client_place(Client::Dev),
        Some(NOBODY),
        &["hijack", "127.0.0.1", port],
    );
    let through = refused_or_through(mode, "echo");
    assert_eq!(
        r,
        json!({"before": through, "rebind": "bound", "after_rebind": through}),
        "an unprivileged dev process rebinding prod's address must not change prod's env"
    );
    let want = [
        ("hook", json!("sendmsg4")),
        ("verdict", json!(mode.verdict())),
        ("source.env", json!("dev")),
        ("source.env_from", json!("cgroup")),
        ("destination.env", json!("prod")),
        ("destination.env_from", json!("socket")),
        ("destination.port", json!(7401)),
        ("proto", json!("udp")),
    ];
    let pred = |v: &Value| v["destination"]["port"] == 7401;
    let (i, first) = violation_after(&lab, mark, "the first datagram's violation", pred);
    assert_fields(&first, "the datagram before the rebind", &want);
    let (_, second) = violation_after(&lab, i + 1, "the datagram after the rebind", |v| pred(v));
    assert_fields(&second, "the datagram after the rebind", &want);
    lab.stop_agent();
}

#[test]
fn hijack_of_a_same_host_address_enforce() {
    same_host_hijack(Mode::Enforce);
}

#[test]
fn hijack_of_a_same_host_address_audit() {
    same_host_hijack(Mode::Audit);
}

/// An extra namespace holding the client's own address (198.18.100.2),
/// reachable from the server namespace while a /32 route points at it.
struct Impostor {
    ns: Netns,
    server_ns: String,
    server_if: String,
}

impl Impostor {
    fn create(server_ns: &str) -> Impostor {
        let ns = Netns::create("ega");
        let suffix = ns.name().trim_start_matches("ega");
        let (iif, sif) = (format!("ea{suffix}"), format!("eb{suffix}"));
        sys::ip(&[
            "-n",
            ns.name(),
            "link",
            "add",
            &iif,
            "type",
            "veth",
            "peer",
            "name",
            &sif,
            "netns",
            server_ns,
        ]);
        sys::ip(&[
            "-n",
            ns.name(),
            "addr",
            "add",
            "198.18.100.2/32",
            "dev",
            &iif,
        ]);
        sys::ip(&["-n", ns.name(), "link", "set", &iif, "up"]);
        sys::ip(&["-n", server_ns, "link", "set", &sif, "up"]);
        sys::ip(&[
            "-n",
            ns.name(),
            "route",
            "add",
            "198.18.0.0/15",
            "dev",
            &iif,
        ]);
        Impostor {
            ns,
            server_ns: server_ns.to_owned(),
            server_if: sif,
        }
    }

    /// Sends the server namespace's traffic for 198.18.100.2 here (`true`)
    /// or back to the real client namespace.
    fn route(&self, here: bool) {
        let verb = if here { "add" } else { "del" };
        sys::ip(&[
            "-n",
            &self.server_ns,
            "route",
            verb,
            "198.18.100.2/32",
            "dev",
            &self.server_if,
        ]);
    }
}

impl Drop for Impostor {
    fn drop(&mut self) {
        if let Err(e) = sys::try_ip(&["-n", &self.server_ns, "link", "del", &self.server_if]) {
            eprintln!("envguard-tests: cleanup: {e}");
        }
    }
}

// 2. Verdict-cache poisoning from another network namespace: a dev listener
// on prod's address in a namespace of its own accepts (dev_ip, S) first;
// then the real dev peer connects from the same (dev_ip, S) to prod.
fn inbound_poisoning(mode: Mode) {
    let mut lab = lab(mode);
    let attacker = Attacker::new(EGATTACK);
    let impostor = Impostor::create(lab.topo.server.name());
    lab.start_agent();
    let any: IpAddr = Ipv4Addr::UNSPECIFIED.into();
    let prod = lab.client_place(Client::Prod);
    lab.serve(&prod, Proto::Tcp, &[any], 7402);
    let mut impostor_place = lab.client_place(Client::Dev);
    impostor_place.netns = Some(impostor.ns.name().to_owned());
    let _fake = attacker.serve(
        &impostor_place,
        Some(NOBODY),
        &["tcp-serve-close", "198.18.100.2", "7402"],
    );
    let peer = lab.remote_place();
    let dev_ip = Site::Dev.addr(Family::V4).to_string();
    let connect = || {
        attacker.run(
            &peer,
            None,
            &["tcp-from", &dev_ip, "40402", "198.18.100.2", "7402"],
        )["outcome"]
            .clone()
    };
    impostor.route(true);
    assert_eq!(
        connect(),
        json!("echo"),
        "dev peer to the dev listener in the impostor namespace (dev -> dev, allowed)"
    );
    impostor.route(false);
    let mark = lab.agent().len();
    let want = if mode == Mode::Enforce {
        "timeout"
    } else {
        "echo"
    };
    assert_eq!(
        connect(),
        json!(want),
        "the same (dev_ip, port) to the real prod listener must be judged on its own"
    );
    let (_, v) = violation_after(&lab, mark, "dev peer -> prod listener", |v| {
        v["destination"]["port"] == 7402 && v["source"]["port"] == 40402
    });
    assert_fields(
        &v,
        "dev peer -> prod listener",
        &[
            ("hook", json!("skb_ingress")),
            ("direction", json!("ingress")),
            ("verdict", json!(mode.verdict())),
            ("source.env", json!("dev")),
            ("source.env_from", json!("cidr")),
            ("source.ip", json!(dev_ip)),
            ("destination.env", json!("prod")),
            ("destination.env_from", json!("cgroup")),
            ("destination.ip", json!("198.18.100.2")),
        ],
    );
    lab.stop_agent();
}

#[test]
fn inbound_decision_of_another_namespace_enforce() {
    inbound_poisoning(Mode::Enforce);
}

#[test]
fn inbound_decision_of_another_namespace_audit() {
    inbound_poisoning(Mode::Audit);
}

// 3. Stateless reverse fallback: with prod -> dev 53/udp allowed, a dev peer
// sending *from* port 53 must not reach a prod UDP socket.
fn reply_lookalike(mode: Mode) {
    let mut lab = lab(mode);
    let attacker = Attacker::new(EGATTACK);
    lab.start_agent();
    let any: IpAddr = Ipv4Addr::UNSPECIFIED.into();
    lab.serve(&lab.client_place(Client::Prod), Proto::Udp, &[any], 7403);
    let dev_ip = Site::Dev.addr(Family::V4).to_string();
    let _dns = attacker.serve(&lab.remote_place(), None, &["udp-serve", &dev_ip, "53"]);

    // The real thing: prod asks dev's DNS; the answer comes back.
    let asked = attacker.run(
        &lab.client_place(Client::Prod),
        None,
        &["udp-from", "0.0.0.0", "0", &dev_ip, "53"],
    );
    assert_eq!(
        asked["outcome"], "echo",
        "prod -> dev 53/udp and its answer"
    );

    let mark = lab.agent().len();
    let r = attacker.run(
        &lab.remote_place(),
        None,
        &["udp-from", &dev_ip, "53", "198.18.100.2", "7403"],
    );
    let want = if mode == Mode::Enforce {
        "timeout"
    } else {
        "echo"
    };
    assert_eq!(
        r["outcome"], want,
        "a datagram from dev port 53 to a prod socket that never asked is inbound dev -> prod"
    );
    let (_, v) = violation_after(&lab, mark, "dev:53 -> prod:7403", |v| {
        v["destination"]["port"] == 7403
    });
    assert_fields(
        &v,
        "dev:53 -> prod:7403",
        &[
            ("hook", json!("skb_ingress")),
            ("proto", json!("udp")),
            ("verdict", json!(mode.verdict())),
            ("source.env", json!("dev")),
            ("source.port", json!(53)),
            ("destination.env", json!("prod")),
        ],
    );
    lab.stop_agent();
}

#[test]
fn reply_lookalike_datagram_enforce() {
    reply_lookalike(Mode::Enforce);
}

#[test]
fn reply_lookalike_datagram_audit() {
    reply_lookalike(Mode::Audit);
}

/// Probes dev -> 127.0.0.1:port until refused (3 s at most); returns how
/// long it took.
fn until_refused(lab: &Lab, port: u16) -> Duration {
    let start = Instant::now();
    loop {
        let r = lab.probe(
            Client::Dev,
            Proto::Tcp,
            SocketAddr::new(LOCALHOST, port),
            500,
        );
        if r.is_refused() {
            return start.elapsed();
        }
        assert!(
            r.ok,
            "dev -> 127.0.0.1:{port} neither connected nor was refused: {}",
            r.raw
        );
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "a listener held by prod was still reachable from dev after 3 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// 4a. A socket's env is its holder's: a listener bound outside any env,
// then held only by a process moved into prod.
#[test]
fn listener_handed_to_prod_takes_prod_env() {
    let mut lab = lab(Mode::Enforce);
    let attacker = Attacker::new(EGATTACK);
    lab.start_agent();
    let prod_dir = lab.cg.abs("prod").display().to_string();
    let _moved = attacker.serve(
        &lab.client_place(Client::Host),
        None,
        &["listen-then-move", "127.0.0.1", "7404", &prod_dir],
    );
    let mark = lab.agent().len();
    let window = until_refused(&lab, 7404);
    eprintln!("adversarial: listener moved into prod refused to dev after {window:?}");
    let (_, v) = violation_after(&lab, mark, "dev -> listener held by prod", |v| {
        v["destination"]["port"] == 7404 && v["verdict"] == "denied"
    });
    assert_fields(
        &v,
        "dev -> listener held by prod",
        &[
            ("hook", json!("connect4")),
            ("source.env", json!("dev")),
            ("destination.env", json!("prod")),
            ("destination.env_from", json!("socket")),
        ],
    );
    let r = lab.probe(
        Client::Prod,
        Proto::Tcp,
        SocketAddr::new(LOCALHOST, 7404),
        1000,
    );
    assert!(r.ok, "prod -> its own listener must connect: {}", r.raw);
    lab.stop_agent();
}

// 4b. A socket held by processes of two envs is reported.
#[test]
fn listener_held_by_two_envs_is_reported() {
    let mut lab = lab(Mode::Enforce);
    let attacker = Attacker::new(EGATTACK);
    lab.start_agent();
    let dev_dir = lab.cg.abs("dev").display().to_string();
    let shared = attacker.serve(
        &lab.client_place(Client::Prod),
        None,
        &["share-listener", "127.0.0.1", "7405", &dev_dir],
    );
    let parent = shared.pid();
    let (_, rec) = lab
        .agent()
        .wait_for("socket_shared", Duration::from_secs(3), |v| {
            v["kind"] == "socket_shared"
                && v["pids"]
                    .as_array()
                    .is_some_and(|p| p.contains(&json!(parent)))
        });
    let envs: Vec<&str> = rec["envs"]
        .as_array()
        .expect("envs")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let mut sorted = envs.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, ["dev", "prod"], "holders' envs: {rec}");
    let prod_at = envs.iter().position(|e| *e == "prod").expect("prod");
    assert_eq!(
        rec["pids"][prod_at],
        json!(parent),
        "prod's holder pid: {rec}"
    );
    assert_eq!(
        rec["env"], "prod",
        "it keeps the env it was created in: {rec}"
    );
    assert!(rec["inode"].as_u64().is_some_and(|i| i > 0), "{rec}");
    assert!(rec["cookie"].as_u64().is_some_and(|c| c > 0), "{rec}");
    lab.stop_agent();
}

/// A dev process (uid 65534) holding a TCP connection to a prod server on
/// 127.0.0.1:`port`, its first exchange done; `what` says why it may connect.
fn established_dev_to_prod(
    lab: &mut Lab,
    attacker: &Attacker,
    port: u16,
    what: &str,
) -> envguard_tests::attack::Interactive {
    lab.serve(
        &lab.client_place(Client::Prod),
        Proto::Tcp,
        &[LOCALHOST],
        port,
    );
    let hold = attacker.interactive(
        &lab.client_place(Client::Dev),
        Some(NOBODY),
        &["tcp-hold", "127.0.0.1", &port.to_string()],
    );
    assert_eq!(hold.next(), json!({"connected": "echo"}), "{what}");
    hold
}

/// The record of an established dev -> prod flow cut at a packet hook.
fn assert_cut_and_reported(lab: &Lab, mark: usize, port: u16, what: &str) {
    // The audited record of the flow's start may be printed after `mark`:
    // look for the one judged in enforce mode.
    let (_, v) = violation_after(lab, mark, what, |v| {
        v["destination"]["port"] == port && v["mode"] == "enforce"
    });
    assert_fields(
        &v,
        what,
        &[
            ("verdict", json!("denied")),
            ("mode", json!("enforce")),
            ("source.env", json!("dev")),
            ("destination.env", json!("prod")),
            ("destination.env_from", json!("socket")),
        ],
    );
    assert!(
        matches!(v["hook"].as_str(), Some("skb_egress" | "skb_ingress")),
        "{what}: judged again at a packet hook: {v}"
    );
}

// 6. Audit -> enforce reaches an established same-host TCP flow at its
// next packet.
#[test]
fn mode_switch_reaches_established_loopback_flow() {
    let mut lab = lab(Mode::Audit);
    let attacker = Attacker::new(EGATTACK);
    lab.start_agent();
    let mut hold = established_dev_to_prod(&mut lab, &attacker, 7406, "audit lets it connect");
    hold.send("x");
    assert_eq!(hold.next(), json!({"exchange": "echo"}), "and exchange");
    // Marked before the switch: the first packet judged in the new mode may
    // be the client's delayed ACK of that echo, before the next send.
    let mark = lab.agent().len();
    lab.cli(&["mode", "enforce", "--from", "dev", "--to", "prod"])
        .assert_ok("mode enforce dev -> prod");
    hold.send("x");
    assert_eq!(
        hold.next(),
        json!({"exchange": "timeout"}),
        "after the pair switched to enforce, the established dev -> prod flow must stop"
    );
    // Refused, and reported as refused: the flow is judged again in its new mode.
    assert_cut_and_reported(&lab, mark, 7406, "the established flow, now denied");
    lab.cli(&["mode", "audit", "--from", "dev", "--to", "prod"])
        .assert_ok("mode audit dev -> prod");
    lab.stop_agent();
}

// Raw sockets: a dev process with CAP_NET_RAW hand-builds a UDP datagram to a
// prod address; the packet hook judges what the socket hooks never saw.
#[test]
fn raw_socket_datagram_is_judged_at_the_packet_hook() {
    let mut lab = lab(Mode::Enforce);
    let attacker = Attacker::new(EGATTACK);
    lab.start_agent();
    let prod_ip = Site::Prod.addr(Family::V4).to_string();
    let mark = lab.agent().len();
    let r = attacker.run(
        &lab.client_place(Client::Dev),
        None,
        &["raw-udp", &prod_ip, "9000"],
    );
    assert_eq!(r["outcome"], "refused", "raw dev -> prod datagram: {r}");
    let (_, v) = violation_after(&lab, mark, "raw dev -> prod", |v| {
        v["destination"]["port"] == 9000
    });
    assert_fields(
        &v,
        "raw dev -> prod",
        &[
            ("hook", json!("skb_egress")),
            ("proto", json!("udp")),
            ("verdict", json!("denied")),
            ("source.env", json!("dev")),
            ("destination.env", json!("prod")),
            ("destination.ip", json!(prod_ip)),
        ],
    );
    assert_eq!(
        count_violations(&lab, mark, |v| v["destination"]["port"] == 9000),
        1,
        "one datagram, one record"
    );
    lab.stop_agent();
}

// A reload that forbids an established same-host flow reaches it at its
// next packet, as it does for flows through a device.
#[test]
fn reload_reaches_established_loopback_flow() {
    let allow = "[[allow]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"7407/tcp\"]\n";
    let mut lab = Lab::with_policy(
        EGPROBE,
        Mode::Enforce,
        &PolicyExtras {
            allow: allow.into(),
            ..Default::default()
        },
    );
    let attacker = Attacker::new(EGATTACK);
    lab.start_agent();
    let mut hold = established_dev_to_prod(&mut lab, &attacker, 7407, "allowed by the rule");
    // Marked before the reload: the first packet judged under the new policy
    // may be the client's delayed ACK, before the next send.
    let mark = lab.agent().len();
    lab.set_policy(&PolicyExtras::default());
    lab.cli(&["reload"]).assert_ok("reload without the rule");
    hold.send("x");
    assert_eq!(
        hold.next(),
        json!({"exchange": "timeout"}),
        "the rule is gone: the established dev -> prod flow must stop"
    );
    assert_cut_and_reported(
        &lab,
        mark,
        7407,
        "the established flow under the new policy",
    );
    lab.stop_agent();
}

// 4c. A peer's decision taken while the socket had its old env does not
// outlive the change: a dev UDP socket that talked to a host socket is cut off
// once that socket's holder moves into prod.
#[test]
fn cached_allow_to_a_relabelled_socket_does_not_survive() {
    let mut lab = lab(Mode::Enforce);
    let attacker = Attacker::new(EGATTACK);
    lab.start_agent();
    let prod_dir = lab.cg.abs("prod").display().to_string();
    let mut server = attacker.interactive(
        &lab.client_place(Client::Host),
        None,
        &["udp-serve-move", "127.0.0.1", "7408", &prod_dir],
    );
    assert_eq!(server.next()["ready"], json!(true), "server ready");
    let mut dev = attacker.interactive(
        &lab.client_place(Client::Dev),
        Some(NOBODY),
        &["udp-hold", "127.0.0.1", "7408"],
    );
    dev.send("x");
    assert_eq!(
        dev.next(),
        json!({"exchange": "echo"}),
        "dev -> host is allowed"
    );
    let mark = lab.agent().len();
    server.send("move");
    assert_eq!(
        server.next(),
        json!({"moved": true}),
        "the holder moved into prod"
    );
    let start = Instant::now();
    loop {
        dev.send("x");
        let r = dev.next();
        if r == json!({"exchange": "refused"}) {
            break;
        }
        assert_eq!(
            r,
            json!({"exchange": "echo"}),
            "neither delivered nor refused"
        );
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "dev's cached allow to the socket outlived its move into prod by 3 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "adversarial: dev's datagrams refused {:?} after the holder moved",
        start.elapsed()
    );
    let (_, v) = violation_after(&lab, mark, "dev -> relabelled socket", |v| {
        v["destination"]["port"] == 7408
    });
    assert_fields(
        &v,
        "dev -> relabelled socket",
        &[
            ("hook", json!("sendmsg4")),
            ("verdict", json!("denied")),
            ("source.env", json!("dev")),
            ("destination.env", json!("prod")),
            ("destination.env_from", json!("socket")),
        ],
    );
    lab.stop_agent();
}

// 11. The same-host lookup at connect()/sendmsg() asks the caller's own
// namespace which socket would receive the destination's address and port.
// A workload can make it answer with a socket of its own for an address that
// is not local: a wildcard listener on the port, or one bound to the remote
// address itself with IP_FREEBIND (no privilege needed). That answer vouches
// for nothing once the packets leave the host: they are judged again by their
// address at the packet hook, refused and reported.
#[test]
fn own_decoy_socket_does_not_make_a_remote_address_same_host() {
    for mode in [Mode::Enforce, Mode::Audit] {
        let mut lab = lab(mode);
        lab.serve_remote_sites();
        let attacker = Attacker::new(EGATTACK);
        // Every attempt its own record: the cases share a flow's key.
        lab.spawn_agent(&AgentOptions::ephemeral().dedup_interval("0"));
        let prod_ip = Site::Prod.addr(Family::V4).to_string();
        for (proto, bind) in [
            ("tcp", "0.0.0.0"),
            ("udp", "0.0.0.0"),
            ("tcp", prod_ip.as_str()),
            ("udp", prod_ip.as_str()),
        ] {
            let what = format!(
                "{mode:?}: dev {proto} to prod {prod_ip}:9000 with a decoy of its own at {bind}:9000"
            );
            let mark = lab.agent().len();
            let r = attacker.run(
                &lab.client_place(Client::Dev),
                Some(NOBODY),
                &["decoy", proto, bind, &prod_ip, "9000"],
            );
            assert_eq!(r["decoy"], "bound", "{what}: {r}");
            // The socket hook takes the decoy for the destination and lets
            // the call through; the first packet leaving the host is judged
            // by its address and dropped: a TCP connect then times out, and
            // a UDP send fails with EPERM (the kernel's answer to a packet
            // the cgroup egress hook drops).
            let outcome = match (mode, proto) {
                (Mode::Enforce, "tcp") => "timeout",
                (Mode::Enforce, _) => "refused",
                (Mode::Audit, _) => "echo",
            };
            let verdict = if mode == Mode::Enforce {
                "denied"
            } else {
                "audited"
            };
            assert_eq!(r["outcome"], outcome, "{what}: {r}");
            let (_, v) = violation_after(&lab, mark, &what, |v| {
                v["destination"]["port"] == 9000 && v["proto"] == proto
            });
            assert_fields(
                &v,
                &what,
                &[
                    ("hook", json!("skb_egress")),
                    ("verdict", json!(verdict)),
                    ("source.env", json!("dev")),
                    ("destination.env", json!("prod")),
                    ("destination.env_from", json!("cidr")),
                    ("destination.ip", json!(prod_ip)),
                ],
            );
        }
        lab.stop_agent();
    }
}

// The socket hooks keep decisions by (caller's env, remote address, port,
// protocol) in DECIDE_CACHE, which every workload's connections fill. What
// dev's connections put there must not decide for prod, and what any policy
// put there must not outlive it: prod is refused where dev was just allowed
// to the same destination, and dev is refused there once a reload takes the
// rule away.
#[test]
fn a_cached_decision_is_the_callers_env_and_policys_only() {
    let mut lab = Lab::with_policy(
        EGPROBE,
        Mode::Enforce,
        &PolicyExtras {
            allow: "[[allow]]\nfrom = \"dev\"\nto = \"shared\"\nports = [\"9000/tcp\"]\n".into(),
            ..Default::default()
        },
    );
    lab.serve_remote_sites();
    lab.start_agent();
    let dst = SocketAddr::new(Site::Shared.addr(Family::V4), 9000);
    for round in 0..2 {
        let r = lab.probe(Client::Dev, Proto::Tcp, dst, 3000);
        assert!(
            r.ok,
            "dev -> shared:9000 is allowed (round {round}): {}",
            r.raw
        );
    }
    lab.check_violation(&lab.remote_case(Client::Prod, Site::Shared, Family::V4, Proto::Tcp, 9000));
    lab.set_policy(&PolicyExtras::default());
    lab.cli(&["reload"])
        .assert_ok("reload without the dev -> shared:9000 rule");
    lab.check_violation(&lab.remote_case(Client::Dev, Site::Shared, Family::V4, Proto::Tcp, 9000));
    lab.stop_agent();
}

// Two ways to open a TCP connection that are not a plain TCP socket's
// `connect()`: TCP Fast Open (`sendto(MSG_FASTOPEN)`, its first data in the
// SYN, no `connect()` call) and a Multipath TCP socket (`IPPROTO_MPTCP`,
// which needs no privilege). Each is judged all the same: refused with
// EPERM in enforce mode, let through in audit mode, and reported once by the
// connect hook either way.
fn tcp_variants(mode: Mode) {
    let mut lab = lab(mode);
    let attacker = Attacker::new(EGATTACK);
    lab.serve_remote_sites();
    lab.start_agent();
    for how in ["tfo", "mptcp"] {
        for fam in Family::ALL {
            let what = format!("{how} {fam:?} dev -> prod");
            let dst = Site::Prod.addr(fam);
            let mark = lab.agent().len();
            let r = attacker.run(
                &lab.client_place(Client::Dev),
                Some(NOBODY),
                &[how, &dst.to_string(), "9000"],
            );
            assert_eq!(
                r,
                json!({"outcome": refused_or_through(mode, "echo")}),
                "{what}"
            );
            let (_, v) = violation_after(&lab, mark, &what, |v| {
                v["destination"]["ip"] == dst.to_string()
            });
            assert_fields(
                &v,
                &what,
                &[
                    (
                        "hook",
                        json!(if fam == Family::V4 {
                            "connect4"
                        } else {
                            "connect6"
                        }),
                    ),
                    ("proto", json!("tcp")),
                    ("verdict", json!(mode.verdict())),
                    ("direction", json!("egress")),
                    ("source.env", json!("dev")),
                    ("destination.env", json!("prod")),
                    ("destination.port", json!(9000)),
                ],
            );
            assert_eq!(
                count_violations(&lab, mark, |v| v["destination"]["ip"] == dst.to_string()),
                1,
                "{what}: one connection, one record"
            );
        }
    }
    lab.stop_agent();
}

#[test]
fn tcp_fast_open_and_multipath_tcp_enforce() {
    tcp_variants(Mode::Enforce);
}

#[test]
fn tcp_fast_open_and_multipath_tcp_audit() {
    tcp_variants(Mode::Audit);
}

// Protocols the socket hooks do not judge, which any user may send: UDP-Lite,
// and ICMP echo from a ping socket (allowed here by the test's own
// namespace's `ping_group_range`; the prod site's kernel answers an echo
// request that reaches it). They are judged at the packet hook, by their
// envs alone (no port rule names them): dropped in enforce mode, let
// through in audit mode (the echo comes back), with one record each.
fn packet_hook_protocols(mode: Mode) {
    let mut lab = lab(mode);
    let attacker = Attacker::new(EGATTACK);
    let ns = lab.topo.client.name().to_owned();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns, "sysctl", "-qw"])
        .arg(format!("net.ipv4.ping_group_range=0 {NOBODY}"))
        .output()
        .unwrap_or_else(|e| panic!("running sysctl in {ns}: {e}"));
    assert!(
        out.status.success(),
        "allowing ping sockets in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    lab.start_agent();
    for fam in Family::ALL {
        let dst = Site::Prod.addr(fam).to_string();
        let icmp = if fam == Family::V4 { "icmp" } else { "icmpv6" };
        // What the sender sees of the drop: EPERM, except from an ICMPv6
        // ping socket, whose `sendto` does not pass the drop on: its request
        // just never gets a reply.
        let ping_refused = if fam == Family::V4 {
            "refused"
        } else {
            "timeout"
        };
        let cases = match mode {
            Mode::Enforce => [("udplite", "136", "refused"), ("ping", icmp, ping_refused)],
            Mode::Audit => [("udplite", "136", "sent"), ("ping", icmp, "echo")],
        };
        for (how, proto, outcome) in cases {
            let what = format!("{how} {fam:?} dev -> prod");
            let mark = lab.agent().len();
            let mut args = vec![how, dst.as_str()];
            if how == "udplite" {
                args.push("9000");
            }
            let r = attacker.run(&lab.client_place(Client::Dev), Some(NOBODY), &args);
            assert_eq!(r, json!({"outcome": outcome}), "{what}");
            let (_, v) = violation_after(&lab, mark, &what, |v| v["destination"]["ip"] == dst);
            assert_fields(
                &v,
                &what,
                &[
                    ("hook", json!("skb_egress")),
                    ("proto", json!(proto)),
                    ("verdict", json!(mode.verdict())),
                    ("direction", json!("egress")),
                    ("source.env", json!("dev")),
                    ("destination.env", json!("prod")),
                ],
            );
            assert_eq!(
                count_violations(&lab, mark, |v| v["destination"]["ip"] == dst),
                1,
                "{what}: one datagram, one record"
            );
        }
    }
    lab.stop_agent();
}

#[test]
fn udplite_and_ping_sockets_are_judged_at_the_packet_hook_enforce() {
    packet_hook_protocols(Mode::Enforce);
}

#[test]
fn udplite_and_ping_sockets_are_judged_at_the_packet_hook_audit() {
    packet_hook_protocols(Mode::Audit);
}

// A raw socket (CAP_NET_RAW) sends a hand-made UDP datagram over loopback to
// a prod UDP server: no socket hook sees it, and its source port (40000)
// names another prod socket, so the receiving side would take it for that
// socket's datagram. It is judged at the sender's packet hook by the
// sender's env: refused (never delivered) in enforce mode, delivered in
// audit mode, reported once either way.
fn raw_loopback(mode: Mode) {
    let mut lab = lab(mode);
    let attacker = Attacker::new(EGATTACK);
    lab.start_agent();
    let prod = lab.client_place(Client::Prod);
    let server = attacker.interactive(&prod, None, &["push-serve", "udp", "127.0.0.1", "7420"]);
    assert_eq!(server.next()["ready"], json!(true), "prod server ready");
    let decoy = attacker.interactive(&prod, None, &["push-serve", "udp", "127.0.0.1", "40000"]);
    assert_eq!(
        decoy.next()["ready"],
        json!(true),
        "prod socket at the source ready"
    );
    let mark = lab.agent().len();
    let r = attacker.run(
        &lab.client_place(Client::Dev),
        None,
        &["raw-udp", "127.0.0.1", "7420"],
    );
    let (outcome, delivered) = match mode {
        Mode::Enforce => ("refused", None),
        Mode::Audit => ("sent", Some(json!({"accepted": "127.0.0.1:40000"}))),
    };
    assert_eq!(
        r,
        json!({"outcome": outcome}),
        "raw dev -> prod over loopback"
    );
    assert_eq!(
        server.next_within(Duration::from_secs(1)),
        delivered,
        "what the prod server received"
    );
    let what = "raw dev -> prod over loopback";
    let (_, v) = violation_after(&lab, mark, what, |v| v["destination"]["port"] == 7420);
    assert_fields(
        &v,
        what,
        &[
            ("hook", json!("skb_egress")),
            ("proto", json!("udp")),
            ("verdict", json!(mode.verdict())),
            ("direction", json!("egress")),
            ("source.env", json!("dev")),
            ("source.env_from", json!("cgroup")),
            ("source.port", json!(40000)),
            ("destination.env", json!("prod")),
            ("destination.env_from", json!("socket")),
            ("destination.ip", json!("127.0.0.1")),
        ],
    );
    assert_eq!(
        count_violations(&lab, mark, |v| v["destination"]["port"] == 7420),
        1,
        "one datagram, one record"
    );
    lab.stop_agent();
}

#[test]
fn raw_socket_datagram_over_loopback_enforce() {
    raw_loopback(Mode::Enforce);
}

#[test]
fn raw_socket_datagram_over_loopback_audit() {
    raw_loopback(Mode::Audit);
}

// A prod UDP socket may answer a peer the packet hooks let in, never one
// they refused: a dev site's datagram to a local prod server is dropped in
// enforce mode (its refusal recorded against the server's socket, fresh),
// and the server's own datagram to that dev peer is then judged as
// prod -> dev: refused and reported, under that policy and, with the
// refusal stale, after a reload.
#[test]
fn a_refused_peer_is_not_answered() {
    let mut lab = lab(Mode::Enforce);
    let attacker = Attacker::new(EGATTACK);
    lab.start_agent();
    let server_at = envguard_tests::client_addr(Family::V4).to_string();
    let peer_at = Site::Dev.addr(Family::V4).to_string();
    let mut server = attacker.interactive(
        &lab.client_place(Client::Prod),
        None,
        &["push-serve", "udp", &server_at, "7431", &peer_at, "7432"],
    );
    assert_eq!(server.next()["ready"], json!(true), "prod server ready");
    // With only prod processes in it, the client namespace's addresses become
    // prod endpoints at the agent's next pass, which makes every cached
    // decision stale. Once that has happened, nothing else changes the
    // policy generation until the reload below, so the first answer meets
    // the refusal still fresh.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = lab.status();
        let learnt = st["endpoints"].as_array().is_some_and(|e| {
            e.iter()
                .any(|e| e["address"] == server_at.as_str() && e["env"] == "prod")
        });
        if learnt {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{server_at} never became a prod endpoint: {}",
            st["endpoints"]
        );
    }
    let mark = lab.agent().len();
    let r = attacker.run(
        &lab.remote_place(),
        None,
        &["udp-from", &peer_at, "7432", &server_at, "7431"],
    );
    assert_eq!(r, json!({"outcome": "timeout"}), "dev site -> prod server");
    let (_, v) = violation_after(&lab, mark, "the dev datagram", |v| {
        v["hook"] == "skb_ingress" && v["destination"]["port"] == 7431
    });
    assert_fields(&v, "the dev datagram", &[("verdict", json!("denied"))]);
    for when in ["under the policy that refused it", "after a reload"] {
        if when == "after a reload" {
            lab.cli(&["reload"]).assert_ok("reload");
        }
        let mark = lab.agent().len();
        server.send("push");
        assert_eq!(
            server.next(),
            json!({"pushed": "refused"}),
            "prod -> the refused dev peer ({when})"
        );
        let what = format!("the prod server's datagram to dev ({when})");
        let (_, v) = violation_after(&lab, mark, &what, |v| {
            v["hook"] == "sendmsg4" && v["destination"]["port"] == 7432
        });
        assert_fields(
            &v,
            &what,
            &[
                ("verdict", json!("denied")),
                ("direction", json!("egress")),
                ("source.env", json!("prod")),
                ("destination.env", json!("dev")),
                ("destination.ip", json!(peer_at)),
            ],
        );
    }
    lab.stop_agent();
}
