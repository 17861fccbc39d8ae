//! IPv6 extension headers at the packet hooks (issue 9, item 10). A local
//! server in the `prod` cgroup listens on `[::]:7200` in the client netns;
//! remote peers in the server netns, bound to a site's IPv6 address, connect
//! to it with a destination-options or a hop-by-hop header (one PadN option,
//! `egprobe connect --ipv6-dstopts` / `--ipv6-hopopts`) on every packet
//! they send, so the TCP header is not right after the fixed IPv6 header.
//!
//! The dev peer's flow must be judged like any other inbound TCP flow: in
//! enforce mode dropped at `skb_ingress` (the connect times out), in audit
//! mode connected; either way one `violation` record with hook
//! `skb_ingress`, proto `tcp`, the peer's address and port, envs dev → prod
//! and the server's port. A prod peer with the same header connects with no
//! record, and nothing is counted as unparsable.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use envguard_tests::agent::dump_lines;
use envguard_tests::event::is_violation;
use envguard_tests::lab::{EVENT_TIMEOUT, INBOUND_TIMEOUT_MS};
use envguard_tests::process::run_json;
use envguard_tests::{Client, Endpoint, Expected, Family, Lab, Mode, Proto, Site, client_addr};
use serde_json::Value;

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");
const PORT: u16 = 7200;
const HEADERS: [&str; 2] = ["--ipv6-dstopts", "--ipv6-hopopts"];

/// A remote peer bound to `site`'s IPv6 address connecting to `dst` with
/// the extension header `header`; the probe's report.
fn connect_with(lab: &Lab, site: Site, dst: SocketAddr, header: &str) -> Value {
    let args: Vec<String> = [
        "connect",
        "tcp",
        &dst.ip().to_string(),
        &dst.port().to_string(),
        "--timeout-ms",
        &INBOUND_TIMEOUT_MS.to_string(),
        "--bind",
        &site.addr(Family::V6).to_string(),
        header,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    run_json(EGPROBE.as_ref(), &lab.remote_place(), &args)
}

fn ext_headers_inbound(mode: Mode) {
    let mut lab = Lab::new(EGPROBE, mode);
    let any: IpAddr = Ipv6Addr::UNSPECIFIED.into();
    lab.serve(&lab.client_place(Client::Prod), Proto::Tcp, &[any], PORT);
    lab.start_agent();
    let dst = SocketAddr::new(client_addr(Family::V6), PORT);
    let prod_peer = Site::Prod.addr(Family::V6).to_string();

    for header in HEADERS {
        let mark = lab.agent().len();
        let r = connect_with(&lab, Site::Prod, dst, header);
        assert!(
            r["ok"] == true,
            "prod peer {prod_peer} -> prod server {dst} with {header}: allowed (same env), so it must connect; probe said {r}"
        );

        let desc = format!("dev peer -> prod server {dst} with {header}");
        let r = connect_with(&lab, Site::Dev, dst, header);
        match mode {
            Mode::Enforce => assert!(
                r["ok"] == false && r["errno"] == libc::ETIMEDOUT && r["stage"] == "connect",
                "{desc}: violates the policy in enforce mode, so skb_ingress must drop the SYN \
                 (connect times out); probe said {r}"
            ),
            Mode::Audit => assert!(
                r["ok"] == true,
                "{desc}: audit mode never blocks, so it must connect; probe said {r}"
            ),
        }
        let local: SocketAddr = r["local"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{desc}: the probe did not report its bound address: {r}"));
        let (at, ev) = lab.agent().wait_for(&desc, EVENT_TIMEOUT, |e| {
            is_violation(e)
                && e["direction"] == "ingress"
                && e["source"]["ip"] == local.ip().to_string()
                && e["source"]["port"] == local.port()
        });
        Expected {
            mode,
            direction: "ingress",
            hook: "skb_ingress",
            proto: "tcp",
            source: Endpoint {
                ip: Some(local.ip()),
                port: Some(local.port()),
                env: "dev",
                env_from: "cidr",
            },
            destination: Endpoint {
                ip: Some(dst.ip()),
                port: Some(PORT),
                env: "prod",
                env_from: "cgroup",
            },
            pid: None,
            comm: None,
            uid: None,
            cgroup_id: lab.cg.id(Client::Prod.sub()),
            cgroup: lab.cg.rel(Client::Prod.sub()),
        }
        .assert_matches(&ev, &desc);
        // The prod peer went first: a record of its flow would precede.
        let stray: Vec<Value> = lab
            .agent()
            .lines(mark..at)
            .into_iter()
            .filter(|e| is_violation(e) || e["kind"] == "unparsable_packets")
            .collect();
        assert!(
            stray.is_empty(),
            "prod peer with {header}: no record expected before the dev peer's:\n{}",
            dump_lines(&stray)
        );
    }

    // Counters are reported by the agent's housekeeping: give it a round.
    std::thread::sleep(Duration::from_millis(1500));
    let lines = lab.agent().lines(0..lab.agent().len());
    let unparsable: Vec<Value> = lines
        .iter()
        .filter(|e| e["kind"] == "unparsable_packets")
        .cloned()
        .collect();
    assert!(
        unparsable.is_empty(),
        "packets with a destination-options or hop-by-hop header must be parsed, not counted as unparsable:\n{}",
        dump_lines(&unparsable)
    );
    lab.stop_agent();
}

#[test]
fn ext_headers_inbound_enforce() {
    ext_headers_inbound(Mode::Enforce);
}

#[test]
fn ext_headers_inbound_audit() {
    ext_headers_inbound(Mode::Audit);
}
