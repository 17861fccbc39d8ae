//! The egress truth table: local clients in each cgroup of the test's tree
//! against remote servers in each env, for every protocol/port, in enforce
//! and audit mode, once per destination address kind (IPv4, IPv6, and
//! IPv4-mapped IPv6 from an AF_INET6 socket, which must be judged and
//! reported as IPv4) so the tests run in parallel.
//!
//! Expected verdicts (V = violation, . = allowed), ports in [`REMOTE_PORTS`]
//! order: 53/tcp 8080/tcp 9000/tcp 53/udp 9000/udp.
//!
//! ```text
//! client \ server   prod    dev     shared  world
//! host (untagged)   .....   .....   .....   .....
//! prod              .....   VVVVV   ..V.V   .....
//! dev               VVVVV   .....   ..V.V   .....
//! dev/late          VVVVV   .....   ..V.V   .....
//! ```
//!
//! Every case is also put to the shared decision (`envguard_common::decide`,
//! which the kernel's programs run over their maps) through `envguard explain
//! --policy`: it must give the table's verdict, and for each violation the
//! kernel's event must carry the same `rule` label, `verdict` and `mode`.

use std::net::{IpAddr, SocketAddr};

use envguard_tests::lab::REMOTE_PORTS;
use envguard_tests::{Case, Client, Family, Lab, Mode, Proto, Site};

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");

/// The table above, one row per `Client::ALL`, one block per `Site::ALL`.
const TABLE: [[&str; 4]; 4] = [
    [".....", ".....", ".....", "....."],
    [".....", "VVVVV", "..V.V", "....."],
    ["VVVVV", ".....", "..V.V", "....."],
    ["VVVVV", ".....", "..V.V", "....."],
];

/// How the client addresses the remote site.
#[derive(Clone, Copy, Debug)]
enum Dst {
    V4,
    V6,
    /// `::ffff:a.b.c.d` from an AF_INET6 socket (hooks connect6/sendmsg6).
    V4Mapped,
}

fn case(lab: &Lab, dst: Dst, client: Client, site: Site, proto: Proto, port: u16) -> Case {
    let dst = dst_addr(dst, site, port);
    lab.egress_case(client, proto, dst, site.env(), site.env_from())
}

fn dst_addr(dst: Dst, site: Site, port: u16) -> SocketAddr {
    let ip = match dst {
        Dst::V4 => site.addr(Family::V4),
        Dst::V6 => site.addr(Family::V6),
        Dst::V4Mapped => match site.addr(Family::V4) {
            IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
            IpAddr::V6(_) => unreachable!("site IPv4 address"),
        },
    };
    SocketAddr::new(ip, port)
}

fn truth_table(mode: Mode, dst: Dst) {
    let mut lab = Lab::new(EGPROBE, mode);
    lab.serve_remote_sites();
    lab.start_agent();

    let mut cases = Vec::new();
    let mut shared = Vec::new();
    for (row, client) in Client::ALL.into_iter().enumerate() {
        for (col, site) in Site::ALL.into_iter().enumerate() {
            for (i, (proto, port)) in REMOTE_PORTS.into_iter().enumerate() {
                let case = case(&lab, dst, client, site, proto, port);
                let want = TABLE[row][col].as_bytes()[i] == b'V';
                assert_eq!(
                    case.violation.is_some(),
                    want,
                    "test table disagrees with the policy model: {}",
                    case.desc
                );
                let e = lab.explain_egress(client, proto, dst_addr(dst, site, port));
                assert_eq!(
                    e["decision"] == "violation",
                    want,
                    "the shared decision disagrees with the table: {}: {e}",
                    case.desc
                );
                if !want {
                    assert_eq!(e["mode"]["verdict"], "allowed", "{}: {e}", case.desc);
                }
                cases.push(case);
                shared.push(e);
            }
        }
    }
    let events = lab.run_cases(&cases);
    lab.stop_agent();

    // The kernel's violations, exactly those the shared decision names, with
    // its rule label, verdict and mode.
    let violating = shared.iter().filter(|e| e["decision"] == "violation");
    assert_eq!(events.len(), violating.count());
    for (i, ev) in &events {
        let (e, desc) = (&shared[*i], &cases[*i].desc);
        assert_eq!(
            ev["rule"], e["rule"]["label"],
            "{desc}: rule, kernel vs shared"
        );
        assert_eq!(
            ev["verdict"], e["mode"]["verdict"],
            "{desc}: verdict, kernel vs shared"
        );
        assert_eq!(
            ev["mode"], e["mode"]["mode"],
            "{desc}: mode, kernel vs shared"
        );
    }

    if mode == Mode::Enforce {
        lab.assert_detached(&case(&lab, dst, Client::Dev, Site::Prod, Proto::Tcp, 9000));
        lab.assert_detached(&case(
            &lab,
            dst,
            Client::DevLate,
            Site::Prod,
            Proto::Udp,
            9000,
        ));
    }
}

#[test]
fn enforce_ipv4() {
    truth_table(Mode::Enforce, Dst::V4);
}

#[test]
fn enforce_ipv6() {
    truth_table(Mode::Enforce, Dst::V6);
}

#[test]
fn enforce_ipv4_mapped() {
    truth_table(Mode::Enforce, Dst::V4Mapped);
}

#[test]
fn audit_ipv4() {
    truth_table(Mode::Audit, Dst::V4);
}

#[test]
fn audit_ipv6() {
    truth_table(Mode::Audit, Dst::V6);
}

#[test]
fn audit_ipv4_mapped() {
    truth_table(Mode::Audit, Dst::V4Mapped);
}
