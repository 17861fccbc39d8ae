use super::*;

const T0: u64 = 1_800_000_000;

fn src(map_id: u32) -> Source {
    Source {
        boot_id: "b".into(),
        map_id,
    }
}

fn dk(src_env: u32, dst_env: u32, verdict: u8) -> DecisionKey {
    DecisionKey::new(src_env, dst_env, verdict, 0, 6, 1)
}

fn name(k: &DecisionKey) -> Key {
    let env = |i: u32| ["host", "dev", "prod", "staging"][i as usize].to_owned();
    Key {
        src_env: env(k.src_env),
        dst_env: env(k.dst_env),
        verdict: match k.verdict {
            1 => "denied",
            2 => "audited",
            _ => "allowed",
        }
        .into(),
        mode: "enforce".into(),
        direction: "egress".into(),
        proto: "tcp".into(),
    }
}

fn envs() -> Vec<String> {
    vec!["dev".into(), "prod".into(), "staging".into()]
}

fn total(h: &History, since: u64, until: u64) -> BTreeMap<(String, String, String), u64> {
    let (counts, _) = sum(h.window(since, until));
    counts
        .into_iter()
        .map(|(k, n)| ((k.src_env, k.dst_env, k.verdict), n))
        .collect()
}

fn key(s: &str, d: &str, v: &str) -> (String, String, String) {
    (s.into(), d.into(), v.into())
}

#[test]
fn deltas_are_exact_across_restarts_and_map_replacement() {
    let mut h = History::new();
    let mut t = Tally::default();
    // First sample: the map counted 5 before any sample; all of it is new.
    h.sample(T0, &src(7), &[(dk(1, 2, 1), 5)], name, &envs(), &mut t);
    // Same map, +3; a new key appears with 2.
    h.sample(
        T0 + 60,
        &src(7),
        &[(dk(1, 2, 1), 8), (dk(2, 2, 3), 2)],
        name,
        &envs(),
        &mut t,
    );
    // An agent restart that adopts the map: the baseline read back from disk.
    let mut h: History = serde_json::from_str(&serde_json::to_string(&h).unwrap()).unwrap();
    h.sample(
        T0 + 120,
        &src(7),
        &[(dk(1, 2, 1), 8), (dk(2, 2, 3), 2)],
        name,
        &envs(),
        &mut t,
    );
    // The programs were replaced: a new map counted 4 since it was created.
    h.sample(
        T0 + 180,
        &src(9),
        &[(dk(1, 2, 1), 4)],
        name,
        &envs(),
        &mut t,
    );
    // A reboot: map ids start over, the boot id tells them apart.
    let rebooted = Source {
        boot_id: "c".into(),
        map_id: 9,
    };
    h.sample(
        T0 + 240,
        &rebooted,
        &[(dk(1, 2, 1), 1)],
        name,
        &envs(),
        &mut t,
    );
    let all = total(&h, 0, u64::MAX);
    assert_eq!(all[&key("dev", "prod", "denied")], 5 + 3 + 4 + 1);
    assert_eq!(all[&key("prod", "prod", "allowed")], 2);
    assert_eq!(h.counter_resets, 2);
    assert_eq!(h.samples, 5);
    // The window takes the buckets whose sample falls in it.
    let early = total(&h, T0, T0 + 60);
    assert_eq!(early[&key("dev", "prod", "denied")], 8);
    assert_eq!(h.envs, envs());
}

#[test]
fn samples_without_change_add_no_bucket_and_minutes_merge() {
    let mut h = History::new();
    let mut t = Tally::default();
    h.sample(T0, &src(1), &[(dk(1, 2, 1), 1)], name, &envs(), &mut t);
    assert!(!h.sample(T0 + 1, &src(1), &[(dk(1, 2, 1), 1)], name, &envs(), &mut t));
    assert_eq!(h.buckets.len(), 1, "an idle sample adds nothing");
    assert_eq!(h.samples, 2);
    // A new key at 0 changes the baseline only; a new map or envs change it too.
    assert!(h.sample(
        T0 + 2,
        &src(1),
        &[(dk(1, 2, 1), 1), (dk(2, 2, 3), 0)],
        name,
        &envs(),
        &mut t
    ));
    assert_eq!(h.buckets.len(), 1);
    assert!(h.sample(T0 + 3, &src(2), &[], name, &envs(), &mut t));
    assert!(h.sample(T0 + 4, &src(2), &[], name, &envs()[..1], &mut t));
    // Within the same minute (a 1 s test interval, a shutdown sample): one bucket.
    let base = T0 - T0 % 60;
    let mut h = History::new();
    for (i, c) in [1u64, 2, 3].iter().enumerate() {
        h.sample(
            base + i as u64,
            &src(1),
            &[(dk(1, 2, 1), *c)],
            name,
            &envs(),
            &mut t,
        );
    }
    assert_eq!(h.buckets.len(), 1);
    assert_eq!(h.buckets[0].counts[0].count, 3);
    assert_eq!((h.buckets[0].first, h.buckets[0].last), (base, base + 2));
}

#[test]
fn compaction_keeps_sums_and_bounds_the_bucket_count() {
    let mut h = History::new();
    let mut t = Tally::default();
    // 45 days of one sample every 10 minutes, each +1 on one key,
    // compacting as the agent does at every sample.
    let start = T0;
    let samples = 45 * 24 * 6;
    for i in 0..samples {
        let now = start + i * 600;
        h.sample(now, &src(1), &[(dk(1, 2, 1), i + 1)], name, &envs(), &mut t);
    }
    let now = start + (samples - 1) * 600;
    let all = total(&h, 0, u64::MAX);
    assert_eq!(
        all[&key("dev", "prod", "denied")],
        samples,
        "compaction loses nothing"
    );
    let by_res = |r: u64| h.buckets.iter().filter(|b| b.resolution == r).count();
    // The last day by minute, then hours up to 30 days, then days.
    assert!(by_res(MINUTE) <= 24 * 6 + 1, "{}", by_res(MINUTE));
    assert!(by_res(HOUR) <= 29 * 24 + 1, "{}", by_res(HOUR));
    assert!(by_res(DAY) <= 16, "{}", by_res(DAY));
    assert!(h.buckets.len() <= 1440 + 720 + 400);
    assert!(h.buckets.windows(2).all(|w| w[0].last < w[1].last));
    // Every bucket of a coarse resolution lies in its period.
    for b in &h.buckets {
        assert_eq!(b.first / b.resolution, b.last / b.resolution, "{b:?}");
        let age = now - b.last;
        if b.resolution == MINUTE {
            assert!(age <= DAY + 60);
        }
    }
    // Past the retention everything goes, counted.
    h.compact(now + (RETENTION_DAYS + 1) * DAY);
    assert!(h.buckets.is_empty());
    assert!(h.dropped_buckets > 0);
    assert_eq!(h.dropped_until, now);
}

#[test]
fn the_row_bound_folds_sooner_then_drops_the_oldest() {
    let mut h = History::new();
    let mut t = Tally::default();
    // Many keys per sample: 1000 rows a minute, 80 minutes.
    let mut counters: Vec<(DecisionKey, u64)> = (0..1000)
        .map(|i| (DecisionKey::new(1, 2, 1, 0, 6, 0).with_proto_n(i), 0))
        .collect();
    for m in 0..80u64 {
        for c in &mut counters {
            c.1 += 1;
        }
        h.sample(T0 + m * 60, &src(1), &counters, proto_name, &envs(), &mut t);
        assert!(h.rows() <= MAX_ROWS, "{}", h.rows());
    }
    // Over the bound, the old minutes were folded into hours: nothing lost.
    assert_eq!(h.dropped_buckets, 0);
    let all = h
        .buckets
        .iter()
        .flat_map(|b| &b.counts)
        .map(|r| r.count)
        .sum::<u64>();
    assert_eq!(all, 80 * 1000, "every count is still there");
    assert!(
        h.buckets.iter().any(|b| b.resolution == HOUR),
        "{:?}",
        h.buckets.len()
    );
    assert_eq!(
        h.buckets.last().map(|b| b.resolution),
        Some(MINUTE),
        "the newest stays by the minute"
    );
    // What one more sample costs at the bound (a figure, not asserted).
    for c in &mut counters {
        c.1 += 1;
    }
    let t = std::time::Instant::now();
    h.sample(
        T0 + 80 * 60,
        &src(1),
        &counters,
        proto_name,
        &envs(),
        &mut t0(),
    );
    let sampled = t.elapsed();
    let bytes = serde_json::to_vec(&h).unwrap().len();
    let encoded = t.elapsed() - sampled;
    eprintln!(
        "history.json at the row bound: {bytes} bytes, {} rows; one sample {sampled:?}, encoding {encoded:?}",
        h.rows()
    );
    assert!(bytes < 8 << 20, "{bytes} bytes at the bound");
}

#[test]
fn when_folding_is_not_enough_the_oldest_days_go() {
    let mut h = History::new();
    let mut t = Tally::default();
    // 30 000 keys a day (one sample a day): two days are over the bound
    // even by the day, so the older one goes; the newest always stays.
    let mut counters: Vec<(DecisionKey, u64)> = (0..30_000u32)
        .map(|i| (DecisionKey::new(i % 1000, i / 1000, 1, 0, 6, 0), 0))
        .collect();
    for d in 0..3u64 {
        for c in &mut counters {
            c.1 += 1;
        }
        h.sample(T0 + d * DAY, &src(1), &counters, wide_name, &envs(), &mut t);
    }
    assert!(h.rows() <= MAX_ROWS, "{}", h.rows());
    assert_eq!(h.buckets.len(), 1);
    assert_eq!(h.dropped_buckets, 2);
    assert_eq!(h.dropped_until, T0 + DAY);
}

fn wide_name(k: &DecisionKey) -> Key {
    Key {
        src_env: format!("e{}", k.src_env),
        dst_env: format!("e{}", k.dst_env),
        ..name(&DecisionKey::new(1, 2, k.verdict, 0, 6, 0))
    }
}

fn t0() -> Tally {
    Tally::default()
}

trait WithProto {
    fn with_proto_n(self, n: u32) -> DecisionKey;
}
impl WithProto for DecisionKey {
    fn with_proto_n(mut self, n: u32) -> DecisionKey {
        // 1000 distinct keys: env ids and proto spread over the space.
        self.proto = (n % 250) as u8;
        self.direction = (n / 250) as u8;
        self
    }
}

fn proto_name(k: &DecisionKey) -> Key {
    Key {
        proto: format!("{}-{}", k.proto, k.direction),
        ..name(k)
    }
}

#[test]
fn rollups_keep_the_top_entries_and_add_up_the_rest() {
    let mut h = History::new();
    let mut t = Tally::default();
    for i in 0..30u16 {
        t.add(&Seen {
            src_env: "dev",
            dst_env: "prod",
            verdict: "audited",
            proto: "tcp",
            dst_ip: Some("198.18.0.1"),
            dst_port: Some(1000 + i),
            comm: Some("curl"),
            cgroup: Some("/t/dev"),
            cgroup_id: 5,
            count: u64::from(i) + 1,
        });
    }
    t.add(&Seen {
        src_env: "dev",
        dst_env: "prod",
        verdict: "audited",
        proto: "udp",
        dst_ip: Some("2001:db8::1"),
        dst_port: Some(53),
        comm: None,
        cgroup: None,
        cgroup_id: 9,
        count: 100,
    });
    h.sample(T0, &src(1), &[], name, &envs(), &mut t);
    assert!(t.is_empty());
    let (_, rollups) = sum(h.window(0, u64::MAX));
    assert_eq!(rollups.len(), 1);
    let r = &rollups[0];
    assert_eq!(r.count, (1..=30).sum::<u64>() + 100);
    assert_eq!(r.destinations.top.len(), TOP_N);
    assert_eq!(
        r.destinations.sorted()[0],
        ("[2001:db8::1]:53", 100),
        "the largest first"
    );
    // The 11 smallest ports (1..=11 attempts) did not fit.
    assert_eq!(r.destinations.other, (1..=11).sum::<u64>());
    assert_eq!(
        r.destinations.top.values().sum::<u64>() + r.destinations.other,
        r.count
    );
    assert_eq!(
        r.processes.sorted(),
        vec![("?", 100), ("curl", 465)]
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
    );
    assert_eq!(r.cgroups.top["id:9"], 100);
    assert_eq!(r.ports.top["53/udp"], 100);
}

#[test]
fn history_round_trips_through_the_state_dir() {
    let dir = std::env::temp_dir().join(format!(
        "envguard-history-{}-{}",
        std::process::id(),
        crate::sys::random_id()
    ));
    std::fs::create_dir(&dir).unwrap();
    let file = dir.join(store::FILE);
    assert_eq!(store::read(&file).unwrap(), None);
    let mut h = History::new();
    h.sample(
        T0,
        &src(1),
        &[(dk(1, 2, 1), 3)],
        name,
        &envs(),
        &mut Tally::default(),
    );
    std::fs::write(&file, serde_json::to_vec(&h).unwrap()).unwrap();
    assert_eq!(store::read(&file).unwrap(), Some(h));
    // A torn file is an error, never half a history.
    std::fs::write(&file, b"{\"format\":1,\"envs\":[").unwrap();
    let e = store::read(&file).unwrap_err().to_string();
    assert!(e.contains("reading the history"), "{e}");
    // Another format is refused by number.
    std::fs::write(&file, b"{\"format\":2}").unwrap();
    let e = store::read(&file).unwrap_err().to_string();
    assert!(e.contains("format 2"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
