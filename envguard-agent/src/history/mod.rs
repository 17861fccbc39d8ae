//! The agent's history: its exact decision counters (the pinned per-CPU
//! `DECISIONS` map) sampled into time buckets, and bounded rollups of the
//! violation records it parsed, kept in a state directory so that
//! `envguard report` can answer "who talked to whom" over days, across agent
//! restarts and reboots, without a running agent.
//!
//! What is stored is *deltas*: each sample adds to its bucket what every
//! kernel counter grew by since the previous sample, and remembers the
//! counters it saw (the baseline) together with the identity of the map they
//! came from (boot id + the kernel's map id). So:
//!
//! - an agent restart that adopts the pinned maps continues from the stored
//!   baseline: what the kernel counted while no agent ran lands in the first
//!   sample after the restart, nothing is counted twice;
//! - a map that was replaced (detach, layout change, reboot) has another
//!   identity: its counters started from 0 when it was created, so all of
//!   them are new. What the old map counted after the last sample taken
//!   from it is lost (the agent samples at shutdown, so only traffic while
//!   no agent ran and the programs were being replaced is).
//!
//! Buckets are compacted as they age: one per minute for the last day, one
//! per hour for the last 30 days, one per day before that, dropped after
//! [`RETENTION_DAYS`]; and the whole history is capped at [`MAX_ROWS`] rows:
//! over it, old buckets are folded into hours and days sooner (totals stay
//! exact, only the resolution goes), and only then are the oldest dropped
//! (counted in `dropped_buckets`). That bounds the file to 1440 + 720 + 400
//! buckets and about `MAX_ROWS` × 120 bytes (5.7 MiB) of JSON whatever the
//! traffic.
//!
//! The file is rewritten whole at each sample (temp file, fsync, rename,
//! fsync of the directory), so a crash or a torn write leaves the previous
//! sample's file or the new one, never a mix; the counts of a lost write are
//! not lost either, since the baseline on disk is the previous one and the
//! next sample computes the delta from it.
use std::collections::{BTreeMap, HashMap};

use envguard_common::event::DecisionKey;
use serde::{Deserialize, Serialize};

pub mod store;
#[cfg(test)]
mod tests;

/// The format of `history.json`; another one is refused, not guessed at.
pub const FORMAT: u32 = 1;
/// Day buckets older than this are dropped.
pub const RETENTION_DAYS: u64 = 400;
/// Counter rows plus rollup entries kept at most, over all buckets (unless
/// the newest bucket alone has more).
pub const MAX_ROWS: usize = 50_000;

/// Ages (seconds) up to which buckets stay by the minute and by the hour:
/// the normal schedule first, then coarser ones while the history is over
/// [`MAX_ROWS`].
const COARSER: &[(u64, u64)] = &[
    (DAY, 30 * DAY),
    (6 * HOUR, 30 * DAY),
    (HOUR, 30 * DAY),
    (HOUR, 7 * DAY),
    (HOUR, DAY),
    (0, DAY),
    (0, 0),
];

/// One folding pass over `buckets` (sorted by `last`): each goes to the
/// resolution its age asks for (never finer than it has), and neighbours of
/// the same resolution and period merge.
fn fold(buckets: Vec<Bucket>, now: u64, minutes_for: u64, hours_for: u64) -> Vec<Bucket> {
    let mut out: Vec<Bucket> = Vec::with_capacity(buckets.len());
    for mut b in buckets {
        let age = now.saturating_sub(b.last);
        let res = if age > hours_for {
            DAY
        } else if age > minutes_for {
            HOUR
        } else {
            MINUTE
        };
        let res = res.max(b.resolution);
        b.resolution = res;
        match out.last_mut() {
            Some(prev) if prev.resolution == res && prev.last / res == b.last / res => {
                prev.merge(b)
            }
            _ => out.push(b),
        }
    }
    out
}
/// Entries kept per rollup list (destinations, ports, processes, cgroups)
/// per pair and bucket; the rest is added up in `other`.
pub const TOP_N: usize = 20;

const MINUTE: u64 = 60;
const HOUR: u64 = 3600;
const DAY: u64 = 86_400;

/// One decision counter's labels, with env names (ids are the kernel's and
/// may mean other envs after a restart with another policy).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Key {
    pub src_env: String,
    pub dst_env: String,
    /// `allowed`, `denied`, `audited`.
    pub verdict: String,
    /// `enforce`, `audit`: the mode the kernel took the decision in.
    pub mode: String,
    /// `egress`, `ingress`.
    pub direction: String,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, or the protocol number.
    pub proto: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    #[serde(flatten)]
    pub key: Key,
    pub count: u64,
}

/// Top entries of one list of a rollup, with what did not fit added up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Top {
    pub top: BTreeMap<String, u64>,
    pub other: u64,
}

impl Top {
    pub fn add(&mut self, name: &str, n: u64) {
        if let Some(c) = self.top.get_mut(name) {
            *c += n;
            return;
        }
        self.top.insert(name.to_owned(), n);
        self.trim();
    }

    fn merge(&mut self, other: &Top) {
        for (name, n) in &other.top {
            *self.top.entry(name.clone()).or_default() += n;
        }
        self.other += other.other;
        self.trim();
    }

    /// Keeps the [`TOP_N`] largest (ties: the first name), adding up the rest.
    fn trim(&mut self) {
        while self.top.len() > TOP_N {
            let (name, n) = self
                .top
                .iter()
                .min_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
                .map(|(k, v)| (k.clone(), *v))
                .expect("non-empty");
            self.top.remove(&name);
            self.other += n;
        }
    }

    /// Entries, largest first.
    pub fn sorted(&self) -> Vec<(&str, u64)> {
        let mut v: Vec<(&str, u64)> = self.top.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v
    }
}

/// What the violation records of one pair and verdict said.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollup {
    pub src_env: String,
    pub dst_env: String,
    /// `denied` or `audited`.
    pub verdict: String,
    /// Attempts reported (a `violation_rollup`'s count included).
    pub count: u64,
    /// `IP:PORT` (`[IPv6]:PORT`), or the IP when there is no port.
    pub destinations: Top,
    /// `PORT/PROTO`.
    pub ports: Top,
    /// The process name (`comm`), `?` when the kernel took the decision
    /// outside a task (a rollup, an inbound packet).
    pub processes: Top,
    /// The cgroup path, or `id:N` for one that had none.
    pub cgroups: Top,
}

impl Rollup {
    fn merge(&mut self, o: &Rollup) {
        self.count += o.count;
        self.destinations.merge(&o.destinations);
        self.ports.merge(&o.ports);
        self.processes.merge(&o.processes);
        self.cgroups.merge(&o.cgroups);
    }

    fn rows(&self) -> usize {
        1 + self.destinations.top.len()
            + self.ports.top.len()
            + self.processes.top.len()
            + self.cgroups.top.len()
    }
}

/// One violation record, as the tally takes it.
#[derive(Debug, Clone, Default)]
pub struct Seen<'a> {
    pub src_env: &'a str,
    pub dst_env: &'a str,
    pub verdict: &'a str,
    pub proto: &'a str,
    pub dst_ip: Option<&'a str>,
    pub dst_port: Option<u16>,
    pub comm: Option<&'a str>,
    pub cgroup: Option<&'a str>,
    pub cgroup_id: u64,
    pub count: u64,
}

/// Violation rollups gathered between two samples.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pairs: BTreeMap<(String, String, String), Rollup>,
}

impl Tally {
    pub fn add(&mut self, s: &Seen) {
        let r = self
            .pairs
            .entry((s.src_env.into(), s.dst_env.into(), s.verdict.into()))
            .or_insert_with(|| Rollup {
                src_env: s.src_env.into(),
                dst_env: s.dst_env.into(),
                verdict: s.verdict.into(),
                ..Rollup::default()
            });
        r.count += s.count;
        let dst = match (s.dst_ip, s.dst_port) {
            (Some(ip), Some(p)) if ip.contains(':') => format!("[{ip}]:{p}"),
            (Some(ip), Some(p)) => format!("{ip}:{p}"),
            (Some(ip), None) => ip.to_owned(),
            (None, Some(p)) => format!("?:{p}"),
            (None, None) => "?".to_owned(),
        };
        r.destinations.add(&dst, s.count);
        let port = match s.dst_port {
            Some(p) => format!("{p}/{}", s.proto),
            None => format!("-/{}", s.proto),
        };
        r.ports.add(&port, s.count);
        r.processes.add(s.comm.unwrap_or("?"), s.count);
        let cg = match s.cgroup {
            Some(c) => c.to_owned(),
            None => format!("id:{}", s.cgroup_id),
        };
        r.cgroups.add(&cg, s.count);
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    fn take(&mut self) -> Vec<Rollup> {
        std::mem::take(&mut self.pairs).into_values().collect()
    }
}

/// One period's deltas.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// Unix seconds of the first and last sample folded into it: a bucket
    /// belongs to a report's window when `last` falls in it.
    pub first: u64,
    pub last: u64,
    /// 60, 3600 or 86400: the period it stands for.
    pub resolution: u64,
    pub counts: Vec<Row>,
    #[serde(default)]
    pub violations: Vec<Rollup>,
}

impl Bucket {
    fn rows(&self) -> usize {
        self.counts.len() + self.violations.iter().map(Rollup::rows).sum::<usize>()
    }

    fn merge(&mut self, o: Bucket) {
        self.first = self.first.min(o.first);
        self.last = self.last.max(o.last);
        self.resolution = self.resolution.max(o.resolution);
        let mut counts: BTreeMap<Key, u64> = BTreeMap::new();
        for r in self.counts.drain(..).chain(o.counts) {
            *counts.entry(r.key).or_default() += r.count;
        }
        self.counts = counts
            .into_iter()
            .map(|(key, count)| Row { key, count })
            .collect();
        for v in o.violations {
            match self.violations.iter_mut().find(|m| {
                (&m.src_env, &m.dst_env, &m.verdict) == (&v.src_env, &v.dst_env, &v.verdict)
            }) {
                Some(m) => m.merge(&v),
                None => self.violations.push(v),
            }
        }
    }
}

/// A kernel counter's raw key and value, as the baseline keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Raw {
    pub src_env: u32,
    pub dst_env: u32,
    pub verdict: u8,
    pub direction: u8,
    pub proto: u8,
    pub mode: u8,
    pub count: u64,
}

impl Raw {
    fn key(&self) -> DecisionKey {
        DecisionKey::new(
            self.src_env,
            self.dst_env,
            self.verdict,
            self.direction,
            self.proto,
            self.mode,
        )
    }
}

/// Which map the baseline's counters came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// `/proc/sys/kernel/random/boot_id`: map ids are only unique within a boot.
    pub boot_id: String,
    /// The kernel's id of the `DECISIONS` map.
    pub map_id: u32,
}

/// The whole state: what `history.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct History {
    pub format: u32,
    /// The envs of the policy in force at the last sample (a report lists
    /// pairs that never saw traffic among them).
    pub envs: Vec<String>,
    /// The map the baseline was read from, none before the first sample.
    pub source: Option<Source>,
    /// The counters as the last sample read them.
    pub baseline: Vec<Raw>,
    /// Sorted by `last`.
    pub buckets: Vec<Bucket>,
    /// Buckets dropped by the size bound or the retention, and the newest
    /// sample time among them (a report over that time is incomplete).
    pub dropped_buckets: u64,
    pub dropped_until: u64,
    /// Samples taken, and of those, how many found a replaced map.
    pub samples: u64,
    pub counter_resets: u64,
}

impl History {
    pub fn new() -> History {
        History {
            format: FORMAT,
            ..History::default()
        }
    }

    /// Adds one sample taken at `now` (Unix seconds): the deltas of
    /// `counters` (read from the map `source`) against the baseline, named
    /// with `name`, and the violation rollups gathered since the last one.
    /// Returns whether anything but the sample count changed: an idle host
    /// need not rewrite the file every interval.
    pub fn sample(
        &mut self,
        now: u64,
        source: &Source,
        counters: &[(DecisionKey, u64)],
        name: impl Fn(&DecisionKey) -> Key,
        envs: &[String],
        tally: &mut Tally,
    ) -> bool {
        let was = (
            self.source.clone(),
            self.envs.clone(),
            self.baseline.clone(),
            self.buckets.len(),
            self.dropped_buckets,
        );
        let same_map = self.source.as_ref() == Some(source);
        if self.source.is_some() && !same_map {
            self.counter_resets += 1;
        }
        let before: HashMap<DecisionKey, u64> = if same_map {
            self.baseline.iter().map(|r| (r.key(), r.count)).collect()
        } else {
            HashMap::new()
        };
        let mut deltas: BTreeMap<Key, u64> = BTreeMap::new();
        for (k, now_count) in counters {
            let was = before.get(k).copied().unwrap_or(0);
            // A per-CPU hash map's values only grow while the map lives; a
            // smaller one means the entry was removed and made again.
            let d = if *now_count >= was {
                now_count - was
            } else {
                *now_count
            };
            if d > 0 {
                *deltas.entry(name(k)).or_default() += d;
            }
        }
        self.baseline = counters
            .iter()
            .map(|(k, c)| Raw {
                src_env: k.src_env,
                dst_env: k.dst_env,
                verdict: k.verdict,
                direction: k.direction,
                proto: k.proto,
                mode: k.mode,
                count: *c,
            })
            .collect();
        self.baseline.sort_by_key(|r| {
            (
                r.src_env,
                r.dst_env,
                r.verdict,
                r.direction,
                r.proto,
                r.mode,
            )
        });
        self.source = Some(source.clone());
        self.envs = envs.to_vec();
        self.samples += 1;
        if !deltas.is_empty() || !tally.is_empty() {
            self.buckets.push(Bucket {
                first: now,
                last: now,
                resolution: MINUTE,
                counts: deltas
                    .into_iter()
                    .map(|(key, count)| Row { key, count })
                    .collect(),
                violations: tally.take(),
            });
        }
        let pushed = self.buckets.len() != was.3;
        self.compact(now);
        pushed
            || was.0 != self.source
            || was.1 != self.envs
            || was.2 != self.baseline
            || was.3 != self.buckets.len()
            || was.4 != self.dropped_buckets
    }

    /// Folds buckets into their minute, hour or day by age and drops what is
    /// past the retention. Over [`MAX_ROWS`], old buckets are folded sooner
    /// (the steps of [`COARSER`]: totals stay, resolution goes), and only
    /// when everything is by the day are the oldest dropped; the newest
    /// bucket always stays.
    pub fn compact(&mut self, now: u64) {
        let mut buckets = std::mem::take(&mut self.buckets);
        buckets.sort_by_key(|b| b.last);
        buckets.retain(|b| {
            let keep = now.saturating_sub(b.last) <= RETENTION_DAYS * DAY;
            if !keep {
                self.dropped_buckets += 1;
                self.dropped_until = self.dropped_until.max(b.last);
            }
            keep
        });
        let mut out = buckets;
        for &(minutes_for, hours_for) in COARSER {
            out = fold(out, now, minutes_for, hours_for);
            if out.iter().map(Bucket::rows).sum::<usize>() <= MAX_ROWS {
                break;
            }
        }
        let mut rows: usize = out.iter().map(Bucket::rows).sum();
        let mut drop = 0;
        while rows > MAX_ROWS && drop + 1 < out.len() {
            rows -= out[drop].rows();
            drop += 1;
        }
        for b in out.drain(..drop) {
            self.drop_bucket(&b);
        }
        self.buckets = out;
    }

    fn drop_bucket(&mut self, b: &Bucket) {
        self.dropped_buckets += 1;
        self.dropped_until = self.dropped_until.max(b.last);
    }

    /// Rows in all buckets (what [`MAX_ROWS`] bounds).
    pub fn rows(&self) -> usize {
        self.buckets.iter().map(Bucket::rows).sum()
    }

    /// The buckets whose last sample falls in `since..=until`.
    pub fn window(&self, since: u64, until: u64) -> impl Iterator<Item = &Bucket> {
        self.buckets
            .iter()
            .filter(move |b| b.last >= since && b.last <= until)
    }
}

/// Adds up the counter rows and rollups of `buckets`.
pub fn sum<'a>(buckets: impl Iterator<Item = &'a Bucket>) -> (BTreeMap<Key, u64>, Vec<Rollup>) {
    let mut total = Bucket::default();
    for b in buckets {
        total.merge(b.clone());
    }
    let counts = total.counts.into_iter().map(|r| (r.key, r.count)).collect();
    (counts, total.violations)
}
