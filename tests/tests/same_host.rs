//! Same host: in the client netns, servers in the `prod` cgroup on
//! 127.0.0.1:7100 and [::1]:7101 (TCP and UDP). The agent must find the
//! destination's env from the local socket (`env_from: "socket"`): clients
//! in `dev` and `dev/late` violate, clients in `prod` and untagged ones
//! (`host`) do not.

use std::net::SocketAddr;

use envguard_tests::{Client, Family, Lab, Mode, Proto};

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");

fn server_addr(fam: Family) -> SocketAddr {
    SocketAddr::new(fam.loopback(), if fam == Family::V4 { 7100 } else { 7101 })
}

fn same_host(mode: Mode) {
    let mut lab = Lab::new(EGPROBE, mode);
    let prod = lab.client_place(Client::Prod);
    for fam in Family::ALL {
        for proto in [Proto::Tcp, Proto::Udp] {
            let addr = server_addr(fam);
            lab.serve(&prod, proto, &[addr.ip()], addr.port());
        }
    }
    lab.start_agent();

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
        lab.assert_detached(&lab.egress_case(
            Client::Dev,
            Proto::Tcp,
            server_addr(Family::V4),
            "prod",
            "socket",
        ));
    }
}

#[test]
fn same_host_enforce() {
    same_host(Mode::Enforce);
}

#[test]
fn same_host_audit() {
    same_host(Mode::Audit);
}
