//! Runtime modes through the control socket (`envguard mode`).
//!
//! - Toggle under traffic: a dev→prod connect loop and a prod→prod loop run
//!   at 200/s while the global mode goes enforce → audit → enforce → audit
//!   with `envguard mode`. Every attempt that runs entirely between one
//!   command's return and the next command's start has the outcome of the
//!   mode in force (EPERM in enforce, connect + echo in audit), the first
//!   attempt after each return included; the kernel's record of every
//!   attempt carries that mode; a probe started right after each return
//!   sees it too; the prod→prod loop never fails; each change is one
//!   `mode_change` record naming the client (uid 0, its pid, `envguard`).
//! - Per-pair modes: `[[pair_mode]]` dev→staging audit while dev→prod stays
//!   enforced, then `envguard mode audit --from dev --to prod` and `mode
//!   enforce --from dev --to staging` at runtime, each pair's traffic,
//!   records and `status` (`mode`, `mode_source`, matrix) following; an
//!   unknown env is refused and changes nothing.
//! - A flow's answers keep its pair's mode: with `dev -> prod` audited and
//!   `prod -> dev` enforced, TCP and UDP flows dev -> prod in both ways (a
//!   local dev client to a prod site, a dev site to a local prod server),
//!   IPv4 and IPv6, are established, and their servers answer (a UDP
//!   server from an unconnected socket, which the sendmsg hook judges).
//!   After a reload the server speaks first, so the first packet judged
//!   under the new policy is an answer. It arrives, and is reported as the
//!   flow it answers (dev -> prod, audited, the flow's direction). Once
//!   `dev -> prod` is enforced, a UDP server's datagram to its dev peer is
//!   judged as prod -> dev: refused and reported.
//! - Break-glass: `mode audit --from dev --to prod --for 2s` shows as a
//!   pending revert in `status` and reverts on time with a `mode_change`
//!   `reason: "expired"`, after which dev→prod is refused again; a timed
//!   override on top of an untimed one reverts to the untimed one.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use envguard_tests::attack::{Attacker, Interactive};
use envguard_tests::control::{assert_fields, assert_header, matrix, pair};
use envguard_tests::event::rfc3339_ns;
use envguard_tests::process::{LoopAttempt, loop_attempts};
use envguard_tests::{
    AgentOptions, Client, ConnectLoop, Family, Lab, Mode, PolicyExtras, Proto, Site, client_addr,
};
use serde_json::{Value, json};

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");
const EGATTACK: &str = env!("CARGO_BIN_EXE_egattack");
const RATE: u32 = 200;
const WAIT: Duration = Duration::from_secs(10);

fn at(site: Site, port: u16) -> SocketAddr {
    SocketAddr::new(site.addr(Family::V4), port)
}

fn any() -> IpAddr {
    Ipv6Addr::UNSPECIFIED.into()
}

fn count(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no count {field:?} in {v}"))
}

/// Waits until the loop made `more` attempts after its latest progress line.
fn advance(lp: &ConnectLoop, more: u64) {
    let now = lp.latest().map_or(0, |v| count(&v, "attempts"));
    lp.wait_attempts(now + more, WAIT);
}

fn assert_connects(lab: &Lab, client: Client, dst: SocketAddr, why: &str) -> u32 {
    let r = lab.probe(client, Proto::Tcp, dst, 3000);
    assert!(
        r.ok,
        "{client:?} -> tcp {dst} must connect {why}; probe said {}",
        r.raw
    );
    r.pid
}

fn assert_refused(lab: &Lab, client: Client, dst: SocketAddr, why: &str) -> u32 {
    let r = lab.probe(client, Proto::Tcp, dst, 1500);
    assert!(
        r.is_refused(),
        "{client:?} -> tcp {dst} must be refused with EPERM {why}; probe said {}",
        r.raw
    );
    r.pid
}

/// The violation record of the probe process `pid`, checked for the mode
/// it was judged in and the pair.
fn assert_violation(lab: &Lab, pid: u32, mode: Mode, src: &str, dst: &str, why: &str) {
    let (_, ev) = lab.agent().wait_for(why, WAIT, |e| {
        e["kind"] == "violation" && e["process"]["pid"] == pid
    });
    assert_fields(
        &ev,
        why,
        &[
            ("mode", mode.name().into()),
            ("verdict", mode.verdict().into()),
            ("source.env", src.into()),
            ("destination.env", dst.into()),
        ],
    );
}

/// The `mode_change` record the client run `cli_pid` caused.
fn mode_change_of(lab: &Lab, cli_pid: u32, what: &str) -> Value {
    lab.agent()
        .wait_for(what, WAIT, |e| {
            e["kind"] == "mode_change" && e["actor"]["pid"] == cli_pid
        })
        .1
}

/// Checks a `mode_change` caused by a root client `cli_pid`.
fn assert_requested_change(
    rec: &Value,
    boot_id: &Value,
    cli_pid: u32,
    scope: &str,
    from: Mode,
    to: Mode,
    what: &str,
) {
    assert_header(rec, "mode_change", boot_id, what);
    assert_fields(
        rec,
        what,
        &[
            ("actor.uid", 0.into()),
            ("actor.pid", cli_pid.into()),
            ("actor.comm", "envguard".into()),
            ("scope", scope.into()),
            ("from", from.name().into()),
            ("to", to.name().into()),
            ("reason", "request".into()),
        ],
    );
}

#[test]
fn global_mode_toggles_under_traffic() {
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    lab.serve(&lab.remote_place(), Proto::Tcp, &[any()], 9000);
    lab.spawn_agent(&AgentOptions::ephemeral());
    let boot_id = lab.agent().ready_line()["boot_id"].clone();
    let dst = at(Site::Prod, 9000);

    let dev = lab.connect_loop(Client::Dev, dst, RATE);
    let prd = lab.connect_loop(Client::Prod, dst, RATE);
    dev.wait_attempts(40, WAIT);
    prd.wait_attempts(40, WAIT);

    // (mode now in force, the command that set it)
    let mut phases: Vec<(Mode, Option<envguard_tests::CliRun>)> = vec![(Mode::Enforce, None)];
    for to in [Mode::Audit, Mode::Enforce, Mode::Audit] {
        let from = phases.last().expect("a phase").0;
        let r = lab.cli(&["mode", to.name()]);
        r.assert_ok(&format!("mode {}", to.name()));
        // A probe started right after the command returned.
        let why = format!("right after `envguard mode {}` returned", to.name());
        let pid = match to {
            Mode::Audit => assert_connects(&lab, Client::Dev, dst, &why),
            Mode::Enforce => assert_refused(&lab, Client::Dev, dst, &why),
        };
        assert_violation(&lab, pid, to, "dev", "prod", &why);
        assert_eq!(
            r.stdout.trim(),
            format!("global: {} -> {}", from.name(), to.name()),
            "what `envguard mode {}` prints",
            to.name()
        );
        let rec = mode_change_of(&lab, r.pid, &format!("mode {}", to.name()));
        assert_requested_change(&rec, &boot_id, r.pid, "global", from, to, "mode_change");
        assert_eq!(rec["expires_at"], Value::Null, "an untimed change: {rec}");
        phases.push((to, Some(r)));
        advance(&dev, 40);
        advance(&prd, 10);
    }
    let d = dev.finish();
    let p = prd.finish();

    // The prod -> prod loop never failed.
    assert!(
        count(&p, "attempts") >= 100 && count(&p, "ok") == count(&p, "attempts"),
        "prod -> prod is allowed in both modes: every attempt must connect and echo while the mode changes; \
         got {} ok of {} ({} EPERM, {} other: {})",
        count(&p, "ok"),
        count(&p, "attempts"),
        count(&p, "eperm"),
        count(&p, "other"),
        p["errors"]
    );

    // Windows [returned, next started] in which each mode was in force.
    let mut windows: Vec<(Mode, u64, u64)> = Vec::new();
    for (i, (mode, cmd)) in phases.iter().enumerate() {
        let from = cmd.as_ref().map_or(0, |c| c.returned_ns);
        let to = phases
            .get(i + 1)
            .and_then(|(_, c)| c.as_ref())
            .map_or(u64::MAX, |c| c.started_ns);
        windows.push((*mode, from, to));
    }
    let want = |m: Mode| match m {
        Mode::Enforce => 'e',
        Mode::Audit => 'o',
    };
    let attempts = loop_attempts(&d);
    assert_eq!(attempts.len() as u64, count(&d, "attempts"));
    let phase_of = |a: &LoopAttempt| {
        windows
            .iter()
            .find(|(_, from, to)| a.at_ns >= *from && a.done_ns <= *to)
            .map(|(m, ..)| *m)
    };
    let mut wrong = Vec::new();
    let mut transitional = Vec::new();
    for (i, a) in attempts.iter().enumerate() {
        match phase_of(a) {
            Some(m) if a.outcome != want(m) => wrong.push(format!(
                "attempt {i} ({a:?}) ran entirely in {} mode but its outcome is {:?}",
                m.name(),
                a.outcome
            )),
            Some(_) => {}
            // Overlapping a change, any outcome is one of the two modes'
            // (a connection let through in audit whose packets the new
            // enforce mode drops fails after connecting, or times out).
            None => transitional.push(a.outcome),
        }
    }
    assert!(
        wrong.is_empty(),
        "dev -> prod attempts must have the outcome of the mode in force:\n  {}\nloop errors: {}",
        wrong.join("\n  "),
        d["errors"]
    );
    // The first attempt started after each command returned.
    let mut after_ms = Vec::new();
    for (mode, cmd) in &phases[1..] {
        let cmd = cmd.as_ref().expect("a command");
        let (i, first) = attempts
            .iter()
            .enumerate()
            .find(|(_, a)| a.at_ns >= cmd.returned_ns)
            .unwrap_or_else(|| panic!("no dev -> prod attempt after `mode {}`", mode.name()));
        assert_eq!(
            (phase_of(first), first.outcome),
            (Some(*mode), want(*mode)),
            "the first dev -> prod attempt started after `envguard mode {}` returned (attempt {i}, {first:?}) \
             must see the new mode",
            mode.name()
        );
        after_ms.push((first.at_ns - cmd.returned_ns) as f64 / 1e6);
    }

    // The kernel's view: one connect4 record per attempt, in order, each
    // with the mode of its window.
    let pid = count(&d, "pid");
    let n = attempts.len();
    let of_loop = |l: &[Value]| -> Vec<Value> {
        l.iter()
            .filter(|e| e["kind"] == "violation" && e["process"]["pid"] == pid)
            .cloned()
            .collect()
    };
    let lines = lab
        .agent()
        .wait_lines(WAIT, |l| of_loop(l).len() >= n)
        .unwrap_or_else(|l| l);
    let recs = of_loop(&lines);
    assert_eq!(
        recs.len(),
        n,
        "every dev -> prod attempt is one violation record (dedup is off)"
    );
    for (i, (a, rec)) in attempts.iter().zip(&recs).enumerate() {
        if let Some(m) = phase_of(a) {
            assert_fields(
                rec,
                &format!("the record of attempt {i} ({a:?}), in {} mode", m.name()),
                &[
                    ("mode", m.name().into()),
                    ("verdict", m.verdict().into()),
                    ("hook", "connect4".into()),
                ],
            );
        }
    }

    let st = lab.status();
    assert_fields(
        &st,
        "status after the changes",
        &[("mode", "audit".into()), ("mode_source", "runtime".into())],
    );
    // The agent's own share of a switch: a raw request's round trip (the
    // kernel map is updated before the answer is written).
    let t = std::time::Instant::now();
    let v = envguard_tests::control::raw_request(
        lab.agent().control_socket(),
        b"{\"cmd\":\"mode\",\"mode\":\"enforce\"}\n".to_vec(),
        WAIT,
    );
    let raw_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(v["ok"], true, "a raw mode request: {v}");
    let pid = assert_refused(
        &lab,
        Client::Dev,
        dst,
        "right after a raw mode request was answered",
    );
    assert_violation(
        &lab,
        pid,
        Mode::Enforce,
        "dev",
        "prod",
        "after the raw mode request",
    );
    let rtt: Vec<String> = phases[1..]
        .iter()
        .map(|(_, c)| format!("{:.1}", c.as_ref().expect("a command").elapsed_ms()))
        .collect();
    eprintln!(
        "mode toggle under load: dev->prod {} attempts at {:.0}/s ({} overlapped a change: {:?}), \
         prod->prod {}/{} ok; `envguard mode` round trips (start to exit) {} ms; \
         first attempt after each return started {:?} ms later; a raw mode request's round trip {raw_ms:.2} ms",
        n,
        d["rate"].as_f64().unwrap_or(f64::NAN),
        transitional.len(),
        transitional,
        count(&p, "ok"),
        count(&p, "attempts"),
        rtt.join(", "),
        after_ms
    );
}

#[test]
fn pair_modes_from_the_policy_and_at_runtime() {
    let extras = PolicyExtras::dev_to_staging_audited();
    let mut lab = Lab::with_policy(EGPROBE, Mode::Enforce, &extras);
    lab.serve(&lab.remote_place(), Proto::Tcp, &[any()], 9000);
    lab.spawn_agent(&AgentOptions::ephemeral());
    let boot_id = lab.agent().ready_line()["boot_id"].clone();
    let (staging, prod, dev) = (
        at(Site::Staging, 9000),
        at(Site::Prod, 9000),
        at(Site::Dev, 9000),
    );

    // From the policy: dev -> staging audited, dev -> prod enforced.
    let pid = assert_connects(&lab, Client::Dev, staging, "([[pair_mode]] audit)");
    assert_violation(&lab, pid, Mode::Audit, "dev", "staging", "dev -> staging");
    let pid = assert_refused(&lab, Client::Dev, prod, "(global enforce)");
    assert_violation(&lab, pid, Mode::Enforce, "dev", "prod", "dev -> prod");
    let st = lab.status();
    assert_fields(
        &st,
        "status",
        &[("mode", "enforce".into()), ("mode_source", "policy".into())],
    );
    let want_pair = |st: &Value, from: &str, to: &str, mode: &str, source: &str, decision: &str| {
        assert_fields(
            pair(st, from, to),
            &format!("status pair {from} -> {to}"),
            &[
                ("mode", mode.into()),
                ("mode_source", source.into()),
                ("decision", decision.into()),
            ],
        );
    };
    want_pair(&st, "dev", "staging", "audit", "policy", "audit");
    want_pair(&st, "dev", "prod", "enforce", "global", "deny");
    want_pair(&st, "staging", "dev", "enforce", "global", "deny");

    // At runtime: dev -> prod audited, the other direction still enforced.
    let r = lab.cli(&["mode", "audit", "--from", "dev", "--to", "prod"]);
    r.assert_ok("mode audit --from dev --to prod");
    assert_eq!(r.stdout.trim(), "dev->prod: enforce -> audit");
    let rec = mode_change_of(&lab, r.pid, "mode audit --from dev --to prod");
    assert_requested_change(
        &rec,
        &boot_id,
        r.pid,
        "dev->prod",
        Mode::Enforce,
        Mode::Audit,
        "pair mode_change",
    );
    let pid = assert_connects(&lab, Client::Dev, prod, "(dev->prod audit at runtime)");
    assert_violation(&lab, pid, Mode::Audit, "dev", "prod", "dev -> prod");
    let pid = assert_refused(&lab, Client::Prod, dev, "(prod->dev keeps the global mode)");
    assert_violation(&lab, pid, Mode::Enforce, "prod", "dev", "prod -> dev");
    assert_refused(
        &lab,
        Client::Dev,
        at(Site::Shared, 9000),
        "(dev->shared keeps the global mode)",
    );
    // A runtime mode beats the policy's pair mode.
    let r = lab.cli(&["mode", "enforce", "--from", "dev", "--to", "staging"]);
    r.assert_ok("mode enforce --from dev --to staging");
    let rec = mode_change_of(&lab, r.pid, "mode enforce --from dev --to staging");
    assert_requested_change(
        &rec,
        &boot_id,
        r.pid,
        "dev->staging",
        Mode::Audit,
        Mode::Enforce,
        "pair mode_change",
    );
    let pid = assert_refused(
        &lab,
        Client::Dev,
        staging,
        "(dev->staging enforce at runtime)",
    );
    assert_violation(&lab, pid, Mode::Enforce, "dev", "staging", "dev -> staging");

    let st = lab.status();
    assert_fields(
        &st,
        "status",
        &[("mode", "enforce".into()), ("mode_source", "policy".into())],
    );
    want_pair(&st, "dev", "prod", "audit", "runtime", "audit");
    want_pair(&st, "dev", "staging", "enforce", "runtime", "deny");
    want_pair(&st, "prod", "dev", "enforce", "global", "deny");
    let human = lab.cli(&["status"]);
    human.assert_ok("status");
    let m = matrix(&human.stdout);
    for ((from, to), cell) in [
        (("dev", "prod"), "audit*"),
        (("dev", "staging"), "deny*"),
        (("prod", "dev"), "deny"),
        (("dev", "dev"), "allow"),
        (("dev", "shared"), "ports"),
    ] {
        assert_eq!(
            m.get(&(from.to_owned(), to.to_owned())).map(String::as_str),
            Some(cell),
            "status matrix cell {from} -> {to}:\n{}",
            human.stdout
        );
    }

    // An unknown env is refused and changes nothing.
    let mark = lab.agent().len();
    let r = lab.cli(&["mode", "audit", "--from", "dev", "--to", "nowhere"]);
    r.assert_failed("mode audit --from dev --to nowhere");
    assert!(
        r.stderr.contains("nowhere"),
        "the refusal must name the unknown env: {}",
        r.describe()
    );
    // A sentinel change: no mode_change may precede its record.
    let s = lab.cli(&["mode", "enforce", "--from", "prod", "--to", "dev"]);
    s.assert_ok("mode enforce --from prod --to dev");
    let (at_sentinel, _) = lab.agent().wait_for("the sentinel mode change", WAIT, |e| {
        e["kind"] == "mode_change" && e["actor"]["pid"] == s.pid
    });
    let stray: Vec<Value> = lab
        .agent()
        .lines(mark..at_sentinel)
        .into_iter()
        .filter(|e| e["kind"] == "mode_change")
        .collect();
    assert!(
        stray.is_empty(),
        "a refused mode command must emit no mode_change: {stray:?}"
    );
}

/// One flow whose server speaks first on demand.
struct PushedFlow {
    what: String,
    server: Interactive,
    client: Interactive,
    /// The flow's record after the reload: its hook, direction, source
    /// and destination addresses.
    hook: &'static str,
    direction: &'static str,
    source: SocketAddr,
    destination: SocketAddr,
}

impl PushedFlow {
    /// `server_at` listens at `dst`; `client_at` connects to it (UDP: sends
    /// it a datagram) from `bind` if given. Returns once the server has its
    /// peer, with the client's address: the flow's source.
    fn establish(
        attacker: &Attacker,
        proto: Proto,
        (server_at, client_at): (&envguard_tests::Place, &envguard_tests::Place),
        dst: SocketAddr,
        bind: Option<IpAddr>,
        what: &str,
    ) -> (Interactive, Interactive, SocketAddr) {
        let (ip, port) = (dst.ip().to_string(), dst.port().to_string());
        let server =
            attacker.interactive(server_at, None, &["push-serve", proto.name(), &ip, &port]);
        assert_eq!(server.next()["ready"], json!(true), "{what}: server ready");
        let src = bind.map(|b| b.to_string());
        let mut args = vec!["await", proto.name(), ip.as_str(), port.as_str()];
        args.extend(src.as_deref());
        let client = attacker.interactive(client_at, None, &args);
        let connected = client.next();
        assert_eq!(
            connected["connected"], "ok",
            "{what}: dev -> prod is audited: {connected}"
        );
        let source = connected["local"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("{what}: no local address in {connected}"));
        assert!(
            server.next()["accepted"].is_string(),
            "{what}: the server has its peer"
        );
        (server, client, source)
    }

    /// The first violation record at or after line `mark` from this flow's
    /// hook to `port`.
    fn record(&self, lab: &Lab, mark: usize, port: u16) -> Value {
        lab.agent()
            .wait_for(&self.what, WAIT, |e| {
                e["kind"] == "violation"
                    && e["seq"].as_u64().is_some_and(|s| s as usize >= mark)
                    && e["hook"] == self.hook
                    && e["destination"]["port"] == port
            })
            .1
    }

    /// The server speaks; the client must hear it.
    fn push(&mut self, when: &str) {
        self.client.send("wait");
        self.server.send("push");
        assert_eq!(
            self.server.next(),
            json!({"pushed": "sent"}),
            "{} ({when}): the server answers an audited flow",
            self.what
        );
        assert_eq!(
            self.client.next(),
            json!({"received": "echo"}),
            "{} ({when}): the answer of an audited flow must arrive",
            self.what
        );
    }
}

#[test]
fn a_flows_answers_keep_its_pair_mode_after_a_reload() {
    let extras = PolicyExtras {
        tables: "[[pair_mode]]\nfrom = \"dev\"\nto = \"prod\"\nmode = \"audit\"\n".into(),
        ..Default::default()
    };
    let mut lab = Lab::with_policy(EGPROBE, Mode::Enforce, &extras);
    let attacker = Attacker::new(EGATTACK);
    lab.start_agent();
    let (remote, dev, prod) = (
        lab.remote_place(),
        lab.client_place(Client::Dev),
        lab.client_place(Client::Prod),
    );
    let mut flows = Vec::new();
    for (i, proto) in [Proto::Tcp, Proto::Udp].into_iter().enumerate() {
        for (j, fam) in Family::ALL.into_iter().enumerate() {
            let port = 9100 + 10 * i as u16 + 2 * j as u16;
            let p = proto.name();
            // A local dev client to a prod site: the answer enters the client.
            let to_site = SocketAddr::new(Site::Prod.addr(fam), port);
            let what = format!("local dev client -> prod site {p} {to_site}");
            let (server, client, source) = PushedFlow::establish(
                &attacker,
                proto,
                (&remote, &dev),
                to_site,
                Some(client_addr(fam)),
                &what,
            );
            flows.push(PushedFlow {
                what,
                server,
                client,
                hook: "skb_ingress",
                direction: "egress",
                source,
                destination: to_site,
            });
            // A dev site to a local prod server: the answer leaves the
            // server, which (UDP) sends it from an unconnected socket.
            let to_local = SocketAddr::new(client_addr(fam), port + 1);
            let what = format!("dev site -> local prod server {p} {to_local}");
            let (server, client, source) = PushedFlow::establish(
                &attacker,
                proto,
                (&prod, &remote),
                to_local,
                Some(Site::Dev.addr(fam)),
                &what,
            );
            flows.push(PushedFlow {
                what,
                server,
                client,
                hook: match (proto, fam) {
                    (Proto::Tcp, _) => "skb_egress",
                    (Proto::Udp, Family::V4) => "sendmsg4",
                    (Proto::Udp, Family::V6) => "sendmsg6",
                },
                direction: "ingress",
                source,
                destination: to_local,
            });
        }
    }
    for f in &mut flows {
        f.push("under the policy that let it in");
    }

    // A new policy generation (the same policy): every flow is judged again
    // at its next packet, here the server's.
    let mark = lab.agent().len();
    lab.cli(&["reload"]).assert_ok("reload");
    for f in &mut flows {
        f.push("first after a reload");
    }
    for f in &flows {
        let ev = f.record(&lab, mark, f.destination.port());
        assert_fields(
            &ev,
            &format!("{}: the answer's record after the reload", f.what),
            &[
                ("verdict", "audited".into()),
                ("mode", "audit".into()),
                ("direction", f.direction.into()),
                ("source.env", "dev".into()),
                ("source.ip", f.source.ip().to_string().into()),
                ("source.port", f.source.port().into()),
                ("destination.env", "prod".into()),
                ("destination.ip", f.destination.ip().to_string().into()),
                (
                    "rule",
                    "default:cross-env (no allow rule for dev -> prod)".into(),
                ),
            ],
        );
    }

    // The audit ends: an answer is no longer let out on the strength of
    // the flow it answers. A UDP server sending to its dev peer is judged
    // as prod -> dev, refused and reported.
    lab.cli(&["mode", "enforce", "--from", "dev", "--to", "prod"])
        .assert_ok("mode enforce --from dev --to prod");
    let mark = lab.agent().len();
    for f in flows.iter_mut().filter(|f| f.hook.starts_with("sendmsg")) {
        f.server.send("push");
        assert_eq!(
            f.server.next(),
            json!({"pushed": "refused"}),
            "{}: once dev -> prod is enforced, prod may not send to dev",
            f.what
        );
        let ev = f.record(&lab, mark, f.source.port());
        assert_fields(
            &ev,
            &format!("{}: the refused answer's record", f.what),
            &[
                ("verdict", "denied".into()),
                ("mode", "enforce".into()),
                ("direction", "egress".into()),
                ("source.env", "prod".into()),
                ("destination.env", "dev".into()),
                ("destination.ip", f.source.ip().to_string().into()),
            ],
        );
    }
}

#[test]
fn break_glass_reverts_on_time() {
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    lab.serve(&lab.remote_place(), Proto::Tcp, &[any()], 9000);
    lab.spawn_agent(&AgentOptions::ephemeral());
    let agent_pid = lab.agent().pid();
    let boot_id = lab.agent().ready_line()["boot_id"].clone();
    let (prod, dev) = (at(Site::Prod, 9000), at(Site::Dev, 9000));

    // prod -> dev: an untimed runtime audit, then a timed enforce on top.
    lab.cli(&["mode", "audit", "--from", "prod", "--to", "dev"])
        .assert_ok("mode audit --from prod --to dev");
    let over = lab.cli(&[
        "mode", "enforce", "--from", "prod", "--to", "dev", "--for", "2s",
    ]);
    over.assert_ok("mode enforce --from prod --to dev --for 2s");
    let r = lab.cli(&[
        "mode", "audit", "--from", "dev", "--to", "prod", "--for", "2s",
    ]);
    r.assert_ok("mode audit --from dev --to prod --for 2s");
    let requested = mode_change_of(&lab, r.pid, "mode audit --for 2s");
    assert_requested_change(
        &requested,
        &boot_id,
        r.pid,
        "dev->prod",
        Mode::Enforce,
        Mode::Audit,
        "timed mode_change",
    );
    let expires_at = requested["expires_at"]
        .as_str()
        .unwrap_or_else(|| panic!("a timed change has an expires_at: {requested}"))
        .to_owned();
    let requested_ns = rfc3339_ns(requested["time"].as_str().unwrap_or_default())
        .unwrap_or_else(|| panic!("bad time: {requested}"));
    let expires_ns =
        rfc3339_ns(&expires_at).unwrap_or_else(|| panic!("bad expires_at: {requested}"));
    let ahead_ms = (expires_ns - requested_ns) as f64 / 1e6;
    assert!(
        (1990.0..=2100.0).contains(&ahead_ms),
        "expires_at must be 2 s after the change; it is {ahead_ms:.0} ms: {requested}"
    );
    assert_eq!(
        r.stdout.trim(),
        format!("dev->prod: enforce -> audit until {expires_at}"),
        "what `envguard mode --for` prints"
    );

    // Meanwhile: dev -> prod passes, prod -> dev is refused; status shows both reverts.
    let pid = assert_connects(&lab, Client::Dev, prod, "(audit for 2 s)");
    assert_violation(
        &lab,
        pid,
        Mode::Audit,
        "dev",
        "prod",
        "dev -> prod during break-glass",
    );
    assert_refused(&lab, Client::Prod, dev, "(enforce for 2 s)");
    let st = lab.status();
    let mut pending: Vec<Value> = st["pending_reverts"]
        .as_array()
        .unwrap_or_else(|| panic!("status without pending_reverts: {st}"))
        .clone();
    pending.sort_by_key(|p| p["scope"].as_str().unwrap_or_default().to_owned());
    assert_eq!(pending.len(), 2, "two pending reverts: {st}");
    assert_eq!(
        pending[0],
        json!({"scope": "dev->prod", "mode": "audit", "reverts_to": "policy", "expires_at": expires_at}),
        "the pending revert of dev->prod"
    );
    assert_fields(
        &pending[1],
        "the pending revert of prod->dev",
        &[
            ("scope", "prod->dev".into()),
            ("mode", "enforce".into()),
            ("reverts_to", "audit".into()),
        ],
    );
    assert_fields(
        pair(&st, "dev", "prod"),
        "status pair dev -> prod",
        &[("mode", "audit".into()), ("mode_source", "runtime".into())],
    );
    let human = lab.cli(&["status"]);
    human.assert_ok("status");
    // The human view shows the time of day of the revert (it is minutes away).
    let clock = expires_at
        .split_once('T')
        .map(|(_, t)| format!("{}Z", &t[..8]))
        .expect("RFC 3339 expires_at");
    assert!(
        human
            .stdout
            .lines()
            .any(|l| l.starts_with("pending") && l.contains("dev->prod") && l.contains(&clock)),
        "the human status must show the pending revert of dev->prod until {clock}:\n{}",
        human.stdout
    );

    // The revert: on time, as a record, in the kernel.
    let expired = |scope: &'static str| {
        move |e: &Value| {
            e["kind"] == "mode_change" && e["reason"] == "expired" && e["scope"] == scope
        }
    };
    let (_, rec) = lab.agent().wait_for(
        "the expiry of dev->prod",
        Duration::from_secs(6),
        expired("dev->prod"),
    );
    let pid = assert_refused(
        &lab,
        Client::Dev,
        prod,
        "right after the break-glass expired",
    );
    assert_violation(
        &lab,
        pid,
        Mode::Enforce,
        "dev",
        "prod",
        "dev -> prod after expiry",
    );
    assert_header(&rec, "mode_change", &boot_id, "expiry");
    assert_fields(
        &rec,
        "the expiry of dev->prod",
        &[
            ("actor.pid", agent_pid.into()),
            ("from", "audit".into()),
            ("to", "enforce".into()),
            ("expires_at", Value::Null),
        ],
    );
    assert!(
        rec["actor"]["comm"].as_str().is_some_and(|c| !c.is_empty())
            && (rec["actor"]["uid"].is_null() || rec["actor"]["uid"] == 0),
        "the agent itself is the actor of an expiry: {rec}"
    );
    let at_ns = rfc3339_ns(rec["time"].as_str().unwrap_or_default())
        .unwrap_or_else(|| panic!("bad time: {rec}"));
    let late_ms = (at_ns - expires_ns) as f64 / 1e6;
    assert!(
        (0.0..1000.0).contains(&late_ms),
        "the revert must happen at expires_at ({expires_at}), not before and within a second; \
         it happened {late_ms:.0} ms after: {rec}"
    );
    let (_, back) = lab.agent().wait_for(
        "the expiry of prod->dev",
        Duration::from_secs(6),
        expired("prod->dev"),
    );
    assert_fields(
        &back,
        "the expiry of prod->dev",
        &[("from", "enforce".into()), ("to", "audit".into())],
    );
    assert_connects(
        &lab,
        Client::Prod,
        dev,
        "(back to its untimed runtime audit)",
    );

    let st = lab.status();
    assert_eq!(
        st["pending_reverts"],
        json!([]),
        "no pending revert left: {st}"
    );
    assert_fields(
        pair(&st, "dev", "prod"),
        "status pair dev -> prod after the revert",
        &[("mode", "enforce".into()), ("mode_source", "global".into())],
    );
    assert_fields(
        pair(&st, "prod", "dev"),
        "status pair prod -> dev after the revert",
        &[("mode", "audit".into()), ("mode_source", "runtime".into())],
    );
    eprintln!("break-glass --for 2s reverted {late_ms:.1} ms after expires_at");
}
