//! Same host: in the client netns, servers in the `prod` cgroup on
//! 127.0.0.1:7100 and [::1]:7101 (TCP and UDP). The agent must find the
//! destination's env from the local socket (`env_from: "socket"`): clients
//! in `dev` and `dev/late` violate, clients in `prod` and untagged ones
//! (`host`) do not.
//!
//! Each mode runs twice: with the servers bound after the agent printed
//! `policy_loaded`, and with servers that were already listening when the
//! agent started (a daemon restart must not lose track of running servers).

use std::net::SocketAddr;

use envguard_tests::{Client, Family, Lab, Mode, Proto};

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");

#[derive(Clone, Copy, PartialEq, Eq)]
enum Servers {
    BoundBeforeAgent,
    BoundAfterAgent,
}

fn server_addr(fam: Family) -> SocketAddr {
    SocketAddr::new(fam.loopback(), if fam == Family::V4 { 7100 } else { 7101 })
}

fn start_servers(lab: &mut Lab) {
    let prod = lab.client_place(Client::Prod);
    for fam in Family::ALL {
        for proto in [Proto::Tcp, Proto::Udp] {
            let addr = server_addr(fam);
            lab.serve(&prod, proto, &[addr.ip()], addr.port());
        }
    }
}

fn same_host(mode: Mode, servers: Servers) {
    let mut lab = Lab::new(EGPROBE, mode);
    if servers == Servers::BoundBeforeAgent {
        start_servers(&mut lab);
    }
    lab.start_agent();
    if servers == Servers::BoundAfterAgent {
        start_servers(&mut lab);
    }

    let mut cases = Vec::new();
    for client in Client::ALL {
        for fam in Family::ALL {
            for proto in [Proto::Tcp, Proto::Udp] {
                let case = lab.egress_case(client, proto, server_addr(fam), "prod", "socket");
                let want = matches!(client, Client::Dev | Client::DevLate);
                assert_eq!(
                    case.violation.is_some(),
                    want,
                    "test disagrees with the policy model: {}",
                    case.desc
                );
                cases.push(case);
            }
        }
    }
    lab.run_cases(&cases);
    lab.stop_agent();

    if mode == Mode::Enforce {
        let case = lab.egress_case(
            Client::Dev,
            Proto::Tcp,
            server_addr(Family::V4),
            "prod",
            "socket",
        );
        lab.assert_detached(&case);
    }
}

#[test]
fn enforce_server_bound_after_agent() {
    same_host(Mode::Enforce, Servers::BoundAfterAgent);
}

#[test]
fn enforce_server_bound_before_agent() {
    same_host(Mode::Enforce, Servers::BoundBeforeAgent);
}

#[test]
fn audit_server_bound_after_agent() {
    same_host(Mode::Audit, Servers::BoundAfterAgent);
}

#[test]
fn audit_server_bound_before_agent() {
    same_host(Mode::Audit, Servers::BoundBeforeAgent);
}
