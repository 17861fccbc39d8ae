//! Inbound TCP: a local server in the `prod` cgroup listening on `[::]:7000`
//! in the client netns; remote peers in the server netns (outside the
//! agent's attach point) connect to it bound to a source address of each
//! site. Peers from `prod` and `world` connect without an event; peers
//! from `dev` and `shared` (no rule allows `shared → prod`) are dropped at
//! the server's `skb_ingress` in enforce mode (the connect times out) and
//! only reported in audit mode. IPv4 peers reach the dual-stack socket as
//! IPv4-mapped addresses, which the events must report as IPv4.

use std::net::{IpAddr, Ipv6Addr};

use envguard_tests::{Client, Family, Lab, Mode, Proto, Site};

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");
const PORT: u16 = 7000;

fn inbound(mode: Mode) {
    let mut lab = Lab::new(EGPROBE, mode);
    let any: IpAddr = Ipv6Addr::UNSPECIFIED.into();
    lab.serve(&lab.client_place(Client::Prod), Proto::Tcp, &[any], PORT);
    lab.start_agent();

    let mut cases = Vec::new();
    for fam in Family::ALL {
        for site in Site::ALL {
            let case = lab.inbound_case(site, fam, Client::Prod, PORT);
            let want = matches!(site, Site::Dev | Site::Shared);
            assert_eq!(
                case.violation.is_some(),
                want,
                "test disagrees with the policy model: {}",
                case.desc
            );
            cases.push(case);
        }
    }
    lab.run_cases(&cases);
    lab.stop_agent();
}

#[test]
fn inbound_enforce() {
    inbound(Mode::Enforce);
}

#[test]
fn inbound_audit() {
    inbound(Mode::Audit);
}
