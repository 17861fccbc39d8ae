use super::*;

const DEV: u32 = 2;
const PROD: u32 = 3;
/// Cgroup ids: 10 is /dev, 20 is /prod, 30 an unlisted /other, 11 /dev/x.
fn envs() -> HashMap<u64, u32> {
    HashMap::from([(10, DEV), (20, PROD)])
}

fn ns(inode: u64, members: &[(i32, &[u64])], addrs: &[&str]) -> Namespace {
    Namespace {
        inode,
        members: members
            .iter()
            .map(|(pid, a)| Member {
                pid: *pid,
                ancestors: a.to_vec(),
            })
            .collect(),
        addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn deepest_listed_ancestor_decides() {
    let mut e = envs();
    assert_eq!(env_of(&[10, 11], &e), DEV);
    e.insert(11, PROD);
    assert_eq!(env_of(&[10, 11], &e), PROD);
    assert_eq!(env_of(&[30], &e), ENV_HOST);
    assert_eq!(env_of(&[], &e), ENV_HOST);
}

#[test]
fn a_namespace_of_one_env_claims_its_addresses() {
    let r = resolve(
        &[ns(
            1,
            &[(100, &[20]), (101, &[20, 21])],
            &[
                "198.18.1.1",
                "2001:db8:1::1",
                "127.0.0.1",
                "::1",
                "fe80::1",
                "169.254.0.1",
            ],
        )],
        &envs(),
    );
    assert_eq!(
        r.table.keys().copied().collect::<Vec<_>>(),
        vec![ip("198.18.1.1"), ip("2001:db8:1::1")]
    );
    assert!(r.table.values().all(|o| o.env == PROD && o.netns == 1));
    assert!(r.conflicts.is_empty());
}

#[test]
fn host_processes_or_no_env_claim_nothing() {
    let r = resolve(
        &[
            ns(1, &[(100, &[20]), (102, &[30])], &["198.18.1.1"]),
            ns(2, &[(103, &[30])], &["198.18.1.2"]),
            ns(3, &[], &["198.18.1.3"]),
        ],
        &envs(),
    );
    assert_eq!(r, Resolution::default());
}

#[test]
fn two_envs_in_one_namespace_claim_nothing() {
    let r = resolve(
        &[ns(1, &[(100, &[20]), (101, &[10])], &["198.18.1.1"])],
        &envs(),
    );
    assert_eq!(r, Resolution::default());
}

#[test]
fn an_address_of_two_envs_is_a_conflict_and_of_one_env_twice_is_not() {
    let r = resolve(
        &[
            ns(1, &[(100, &[20])], &["198.18.1.1", "198.18.9.9"]),
            ns(2, &[(200, &[10])], &["198.18.1.1"]),
            ns(3, &[(300, &[20])], &["198.18.9.9"]),
        ],
        &envs(),
    );
    assert_eq!(r.table[&ip("198.18.1.1")].env, ENV_CONFLICT);
    assert_eq!(
        r.table[&ip("198.18.9.9")],
        Owner {
            env: PROD,
            netns: 1
        }
    );
    assert_eq!(r.conflicts.len(), 1);
    assert_eq!(r.conflicts[0].envs, vec![DEV, PROD]);
    assert_eq!(r.conflicts[0].netns, vec![1, 2]);
    assert_eq!(r.conflicts[0].pids, vec![100, 200]);
}

#[test]
fn update_learns_forgets_and_reports_a_conflict_once() {
    let mut eps = Endpoints::default();
    let t0 = SystemTime::UNIX_EPOCH;
    let t1 = t0 + std::time::Duration::from_secs(1);
    let one = vec![ns(1, &[(100, &[20])], &["198.18.1.1"])];
    let d = eps.update(one.clone(), resolve(&one, &envs()), t0);
    assert_eq!(d.set, vec![(ip("198.18.1.1"), PROD)]);
    assert!(d.remove.is_empty() && d.new_conflicts.is_empty());
    // Unchanged: nothing to write, `since` kept.
    let d = eps.update(one.clone(), resolve(&one, &envs()), t1);
    assert_eq!(d, Diff::default());
    assert_eq!(eps.known()[&ip("198.18.1.1")].since, t0);
    // A dev namespace claims the same address: conflict, reported once.
    let two = vec![one[0].clone(), ns(2, &[(200, &[10])], &["198.18.1.1"])];
    let d = eps.update(two.clone(), resolve(&two, &envs()), t1);
    assert_eq!(d.set, vec![(ip("198.18.1.1"), ENV_CONFLICT)]);
    assert_eq!(d.new_conflicts.len(), 1);
    let d = eps.update(two.clone(), resolve(&two, &envs()), t1);
    assert_eq!(d, Diff::default());
    // The namespaces' processes exit: forgotten.
    let d = eps.update(Vec::new(), resolve(&[], &envs()), t1);
    assert_eq!(d.remove, vec![ip("198.18.1.1")]);
    assert!(eps.known().is_empty());
}

#[test]
fn a_reload_resolves_the_last_pass_again() {
    let mut eps = Endpoints::default();
    let t0 = SystemTime::UNIX_EPOCH;
    let one = vec![ns(1, &[(100, &[20])], &["198.18.1.1"])];
    eps.update(one.clone(), resolve(&one, &envs()), t0);
    // The new policy no longer lists /prod.
    let r = resolve(eps.last(), &HashMap::from([(10, DEV)]));
    eps.replace(&r, t0);
    assert!(eps.known().is_empty());
}

#[test]
fn parses_an_address_dump() {
    // Two RTM_NEWADDR messages (IPv4 with IFA_ADDRESS and IFA_LOCAL, IPv6
    // with IFA_ADDRESS) and NLMSG_DONE, as the kernel lays them out.
    fn msg(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend(((16 + payload.len()) as u32).to_ne_bytes());
        m.extend(kind.to_ne_bytes());
        m.extend([0u8; 10]);
        m.extend(payload);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }
    fn attr(kind: u16, v: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend(((4 + v.len()) as u16).to_ne_bytes());
        a.extend(kind.to_ne_bytes());
        a.extend(v);
        a
    }
    let mut v4 = vec![libc::AF_INET as u8, 32, 0, 0, 1, 0, 0, 0];
    v4.extend(attr(IFA_ADDRESS, &[198, 18, 0, 9]));
    v4.extend(attr(IFA_LOCAL, &[198, 18, 0, 1]));
    let mut v6 = vec![libc::AF_INET6 as u8, 64, 0, 0, 1, 0, 0, 0];
    let a6: Ipv6Addr = "2001:db8::1".parse().unwrap();
    v6.extend(attr(IFA_ADDRESS, &a6.octets()));
    let mut buf = msg(RTM_NEWADDR, &v4);
    buf.extend(msg(RTM_NEWADDR, &v6));
    buf.extend(msg(crate::netlink::NLMSG_DONE, &[0; 4]));
    let mut out = Vec::new();
    let done = crate::netlink::messages(&buf, RTM_NEWADDR, &mut |p| out.extend(parse_addr(p)));
    assert!(done.unwrap());
    assert_eq!(out, vec![ip("198.18.0.1"), IpAddr::V6(a6)]);
}

#[test]
fn the_agents_own_namespace_dump_works() {
    // Runs anywhere: the test's own namespace has at least loopback.
    let addrs = dump_addresses().expect("RTM_GETADDR in the test's namespace");
    assert!(addrs.iter().any(|a| a.is_loopback()), "{addrs:?}");
}

#[test]
fn a_namespace_that_is_not_the_one_seen_is_not_read() {
    // A reused pid now in another namespace: refused before any setns(2)
    // (the matching case is the integration tests' `tests/endpoints.rs`).
    let pid = std::process::id() as i32;
    let inode = netns_of("self").expect("own netns");
    let err = addresses_in(pid, inode + 1).expect_err("another namespace");
    assert!(
        err.to_string().contains("another network namespace"),
        "{err}"
    );
}
