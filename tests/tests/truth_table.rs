//! The egress truth table: local clients in each cgroup of the test's tree
//! against remote servers in each env, for every protocol/port, in enforce
//! and audit mode, split by address family so the four run in parallel.
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

use envguard_tests::lab::REMOTE_PORTS;
use envguard_tests::{Client, Family, Lab, Mode, Proto, Site};

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");

/// The table above, one row per `Client::ALL`, one block per `Site::ALL`.
const TABLE: [[&str; 4]; 4] = [
    [".....", ".....", ".....", "....."],
    [".....", "VVVVV", "..V.V", "....."],
    ["VVVVV", ".....", "..V.V", "....."],
    ["VVVVV", ".....", "..V.V", "....."],
];

fn truth_table(mode: Mode, fam: Family) {
    let mut lab = Lab::new(EGPROBE, mode);
    lab.serve_remote_sites();
    lab.start_agent();

    let mut cases = Vec::new();
    for (row, client) in Client::ALL.into_iter().enumerate() {
        for (col, site) in Site::ALL.into_iter().enumerate() {
            for (i, (proto, port)) in REMOTE_PORTS.into_iter().enumerate() {
                let case = lab.remote_case(client, site, fam, proto, port);
                let want = TABLE[row][col].as_bytes()[i] == b'V';
                assert_eq!(
                    case.violation.is_some(),
                    want,
                    "test table disagrees with the policy model: {}",
                    case.desc
                );
                cases.push(case);
            }
        }
    }
    lab.run_cases(&cases);
    lab.stop_agent();

    if mode == Mode::Enforce {
        lab.assert_detached(&lab.remote_case(Client::Dev, Site::Prod, fam, Proto::Tcp, 9000));
        lab.assert_detached(&lab.remote_case(Client::DevLate, Site::Prod, fam, Proto::Udp, 9000));
    }
}

#[test]
fn enforce_ipv4() {
    truth_table(Mode::Enforce, Family::V4);
}

#[test]
fn enforce_ipv6() {
    truth_table(Mode::Enforce, Family::V6);
}

#[test]
fn audit_ipv4() {
    truth_table(Mode::Audit, Family::V4);
}

#[test]
fn audit_ipv6() {
    truth_table(Mode::Audit, Family::V6);
}
