//! `envguard report`: who talked to whom over a window, from the history the
//! agent keeps in its state directory (no agent needs to run).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use serde::Serialize;

use crate::history::{self, History, Key, Rollup, Top, store};

/// Show what the kernel allowed, refused and audited between environments
/// over a window, from the agent's history (the decision counters are exact;
/// violation rollups keep the top destinations, ports, processes and
/// cgroups). Reads the state directory only: works without a running agent.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// Start of the window: a duration back from now (`7d`, `36h`) or an
    /// RFC 3339 time.
    #[arg(long, default_value = "7d", value_name = "WHEN")]
    pub since: String,
    /// End of the window, like --since [default: now].
    #[arg(long, value_name = "WHEN")]
    pub until: Option<String>,
    /// Only this pair, `SRC:DST` (env names).
    #[arg(long, value_name = "SRC:DST")]
    pub pair: Option<String>,
    /// The agent's --state-dir.
    #[arg(long, value_name = "DIR", default_value = store::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Entries listed per rollup list in text (JSON and CSV have every one kept).
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub top: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Same as --format json.
    #[arg(long, conflicts_with_all = ["format", "csv"])]
    pub json: bool,
    /// Same as --format csv.
    #[arg(long, conflicts_with = "format")]
    pub csv: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
    /// One line per exact counter: src_env,dst_env,verdict,mode,direction,proto,count.
    Csv,
    /// A Graphviz graph of the envs, edges weighted by decisions,
    /// violations in red (`dot -Tsvg`).
    Dot,
}

pub fn report(args: &ReportArgs) -> anyhow::Result<()> {
    let now = SystemTime::now();
    let since = parse_when(&args.since, now).context("--since")?;
    let until = match &args.until {
        Some(u) => parse_when(u, now).context("--until")?,
        None => unix(now),
    };
    if since > until {
        anyhow::bail!("--since is after --until");
    }
    let pair = args
        .pair
        .as_deref()
        .map(|p| {
            p.split_once(':')
                .map(|(s, d)| (s.to_owned(), d.to_owned()))
                .with_context(|| format!("--pair {p:?}: expected SRC:DST"))
        })
        .transpose()?;
    let h = store::read_state_dir(&args.state_dir)
        .map_err(anyhow::Error::from)
        .with_context(|| {
            if crate::sys::is_root() {
                String::from("reading the history")
            } else {
                String::from("reading the history (the state directory is root's: run as root)")
            }
        })?
        .with_context(|| {
        format!(
            "no history in {} (the agent keeps one with --state-dir; is this the right directory?)",
            args.state_dir.display()
        )
    })?;
    let r = build(
        &h,
        since,
        until,
        pair.as_ref(),
        &args.state_dir.display().to_string(),
    );
    let format = if args.json {
        Format::Json
    } else if args.csv {
        Format::Csv
    } else {
        args.format
    };
    let out = match format {
        Format::Text => text(&r, args.top),
        Format::Json => serde_json::to_string_pretty(&r)? + "\n",
        Format::Csv => csv(&r),
        Format::Dot => dot(&r),
    };
    print!("{out}");
    Ok(())
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `7d`, `90m` (back from `now`) or an RFC 3339 time, as Unix seconds.
pub fn parse_when(s: &str, now: SystemTime) -> anyhow::Result<u64> {
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(unix(now).saturating_sub(d.as_secs()));
    }
    let t = humantime::parse_rfc3339_weak(s)
        .with_context(|| format!("{s:?} is neither a duration (7d) nor an RFC 3339 time"))?;
    Ok(unix(t))
}

fn rfc3339(secs: u64) -> String {
    // humantime formats up to the end of year 9999.
    let secs = secs.min(253_402_300_799);
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// One cell of the matrix.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Pair {
    pub src_env: String,
    pub dst_env: String,
    pub allowed: u64,
    pub denied: u64,
    pub audited: u64,
}

impl Pair {
    fn total(&self) -> u64 {
        self.allowed + self.denied + self.audited
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub name: String,
    pub count: u64,
}

/// A rollup list, largest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct List {
    pub top: Vec<Entry>,
    /// Attempts beyond the kept entries.
    pub other: u64,
}

impl From<&Top> for List {
    fn from(t: &Top) -> List {
        List {
            top: t
                .sorted()
                .into_iter()
                .map(|(name, count)| Entry {
                    name: name.to_owned(),
                    count,
                })
                .collect(),
            other: t.other,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violations {
    pub src_env: String,
    pub dst_env: String,
    /// `audited` (what enforce would have refused) or `denied`.
    pub verdict: String,
    /// Decisions the kernel counted with this verdict (exact).
    pub decisions: u64,
    /// Attempts in the violation records (a rollup's repeats included).
    pub attempts: u64,
    pub destinations: List,
    pub ports: List,
    pub processes: List,
    pub cgroups: List,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Coverage {
    /// Samples in the history (all of it), and how many found the kernel's
    /// counters replaced (a detach, a layout change, a reboot).
    pub samples: u64,
    pub counter_resets: u64,
    /// Buckets in the window, and the first and last sample in them.
    pub buckets: usize,
    pub first_sample: Option<String>,
    pub last_sample: Option<String>,
    /// Buckets dropped by the size bound or the retention; the window is
    /// incomplete if it starts before `dropped_until`.
    pub dropped_buckets: u64,
    pub dropped_until: Option<String>,
    pub complete: bool,
}

/// What `envguard report --json` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub since: String,
    pub until: String,
    pub state_dir: String,
    pub envs: Vec<String>,
    /// Every ordered pair of envs (the policy's and any seen), zero or not.
    pub matrix: Vec<Pair>,
    /// Pairs without a single decision in the window.
    pub never_seen: Vec<[String; 2]>,
    /// Audited pairs: what enforce would have refused.
    pub would_refuse: Vec<Violations>,
    /// Pairs refused in enforce mode.
    pub refused: Vec<Violations>,
    /// The exact counters, added up over the window.
    pub counters: Vec<history::Row>,
    pub coverage: Coverage,
}

pub fn build(
    h: &History,
    since: u64,
    until: u64,
    pair: Option<&(String, String)>,
    state_dir: &str,
) -> Report {
    let buckets: Vec<&history::Bucket> = h.window(since, until).collect();
    let (counts, rollups) = history::sum(buckets.iter().copied());
    let wanted = |s: &str, d: &str| pair.is_none_or(|(ps, pd)| ps == s && pd == d);
    let counts: BTreeMap<Key, u64> = counts
        .into_iter()
        .filter(|(k, _)| wanted(&k.src_env, &k.dst_env))
        .collect();
    let mut envs: Vec<String> = h.envs.clone();
    let mut extra = BTreeSet::new();
    for k in counts.keys() {
        for e in [&k.src_env, &k.dst_env] {
            if !envs.contains(e) {
                extra.insert(e.clone());
            }
        }
    }
    envs.extend(extra);
    let mut cells: BTreeMap<(String, String), Pair> = BTreeMap::new();
    for s in &envs {
        for d in &envs {
            if wanted(s, d) {
                cells.insert(
                    (s.clone(), d.clone()),
                    Pair {
                        src_env: s.clone(),
                        dst_env: d.clone(),
                        ..Pair::default()
                    },
                );
            }
        }
    }
    for (k, n) in &counts {
        if let Some(c) = cells.get_mut(&(k.src_env.clone(), k.dst_env.clone())) {
            match k.verdict.as_str() {
                "denied" => c.denied += n,
                "audited" => c.audited += n,
                _ => c.allowed += n,
            }
        }
    }
    // In env order, not alphabetical: the policy's order is the operator's.
    let pos = |e: &str| envs.iter().position(|x| x == e).unwrap_or(usize::MAX);
    let mut matrix: Vec<Pair> = cells.into_values().collect();
    matrix.sort_by_key(|p| (pos(&p.src_env), pos(&p.dst_env)));
    let never_seen = matrix
        .iter()
        .filter(|p| p.total() == 0)
        .map(|p| [p.src_env.clone(), p.dst_env.clone()])
        .collect();
    let decisions = |r: &Rollup| {
        counts
            .iter()
            .filter(|(k, _)| {
                k.src_env == r.src_env && k.dst_env == r.dst_env && k.verdict == r.verdict
            })
            .map(|(_, n)| n)
            .sum()
    };
    let mut would_refuse = Vec::new();
    let mut refused = Vec::new();
    let mut rollups: Vec<&Rollup> = rollups
        .iter()
        .filter(|r| wanted(&r.src_env, &r.dst_env))
        .collect();
    rollups.sort_by_key(|r| (pos(&r.src_env), pos(&r.dst_env)));
    for r in rollups {
        let v = Violations {
            src_env: r.src_env.clone(),
            dst_env: r.dst_env.clone(),
            verdict: r.verdict.clone(),
            decisions: decisions(r),
            attempts: r.count,
            destinations: (&r.destinations).into(),
            ports: (&r.ports).into(),
            processes: (&r.processes).into(),
            cgroups: (&r.cgroups).into(),
        };
        if r.verdict == "audited" {
            would_refuse.push(v);
        } else {
            refused.push(v);
        }
    }
    // Audited pairs whose records were all lost still show, from the counters.
    for p in &matrix {
        if p.audited > 0
            && !would_refuse
                .iter()
                .any(|v| v.src_env == p.src_env && v.dst_env == p.dst_env)
        {
            let empty = List {
                top: Vec::new(),
                other: 0,
            };
            would_refuse.push(Violations {
                src_env: p.src_env.clone(),
                dst_env: p.dst_env.clone(),
                verdict: "audited".into(),
                decisions: p.audited,
                attempts: 0,
                destinations: empty.clone(),
                ports: empty.clone(),
                processes: empty.clone(),
                cgroups: empty,
            });
        }
    }
    let first = buckets.iter().map(|b| b.first).min();
    let last = buckets.iter().map(|b| b.last).max();
    Report {
        since: rfc3339(since),
        until: rfc3339(until),
        state_dir: state_dir.to_owned(),
        envs,
        matrix,
        never_seen,
        would_refuse,
        refused,
        counters: counts
            .into_iter()
            .map(|(key, count)| history::Row { key, count })
            .collect(),
        coverage: Coverage {
            samples: h.samples,
            counter_resets: h.counter_resets,
            buckets: buckets.len(),
            first_sample: first.map(rfc3339),
            last_sample: last.map(rfc3339),
            dropped_buckets: h.dropped_buckets,
            dropped_until: (h.dropped_buckets > 0).then(|| rfc3339(h.dropped_until)),
            complete: h.dropped_buckets == 0 || since > h.dropped_until,
        },
    }
}

fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn cell(p: &Pair) -> String {
    if p.total() == 0 {
        "·".to_owned()
    } else {
        format!("{}/{}/{}", p.allowed, p.denied, p.audited)
    }
}

pub fn text(r: &Report, top: usize) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "envguard report {} .. {}", r.since, r.until);
    let c = &r.coverage;
    let _ = writeln!(
        o,
        "history {}: {} in the window ({} .. {}); {} in all, {} found the counters replaced{}",
        r.state_dir,
        plural(c.buckets as u64, "bucket"),
        c.first_sample.as_deref().unwrap_or("-"),
        c.last_sample.as_deref().unwrap_or("-"),
        plural(c.samples, "sample"),
        c.counter_resets,
        if c.complete {
            String::new()
        } else {
            format!(
                "; INCOMPLETE: history up to {} was dropped",
                c.dropped_until.as_deref().unwrap_or("?")
            )
        }
    );
    let _ = writeln!(
        o,
        "\ndecisions allowed/refused/audited (row: source env, column: destination env; · none)"
    );
    let rows: Vec<&String> = r
        .envs
        .iter()
        .filter(|e| r.matrix.iter().any(|p| &p.src_env == *e))
        .collect();
    let cols: Vec<&String> = r
        .envs
        .iter()
        .filter(|e| r.matrix.iter().any(|p| &p.dst_env == *e))
        .collect();
    let width = |s: &str| s.chars().count();
    const CORNER: &str = "from\\to";
    let w0 = rows
        .iter()
        .map(|e| width(e))
        .max()
        .unwrap_or(0)
        .max(CORNER.len());
    let mut grid = vec![];
    for s in &rows {
        let line: Vec<String> = cols
            .iter()
            .map(|d| {
                r.matrix
                    .iter()
                    .find(|p| &p.src_env == *s && &p.dst_env == *d)
                    .map_or_else(String::new, cell)
            })
            .collect();
        grid.push(line);
    }
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, d)| {
            grid.iter()
                .map(|l| width(&l[i]))
                .chain([width(d)])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let _ = write!(o, "{CORNER:w0$}");
    for (d, w) in cols.iter().zip(&widths) {
        let _ = write!(o, "  {d:>w$}");
    }
    o.push('\n');
    for (s, line) in rows.iter().zip(&grid) {
        let _ = write!(o, "{s:w0$}");
        for (c, w) in line.iter().zip(&widths) {
            let _ = write!(o, "  {c:>w$}");
        }
        o.push('\n');
    }
    let section = |o: &mut String, title: &str, list: &[Violations]| {
        let _ = writeln!(o, "\n{title}:");
        if list.is_empty() {
            let _ = writeln!(o, "  none");
        }
        for v in list {
            let _ = writeln!(
                o,
                "  {} -> {}: {} decisions, {} attempts in violation records",
                v.src_env, v.dst_env, v.decisions, v.attempts
            );
            for (name, l) in [
                ("destinations", &v.destinations),
                ("ports", &v.ports),
                ("processes", &v.processes),
                ("cgroups", &v.cgroups),
            ] {
                let mut items: Vec<String> = l
                    .top
                    .iter()
                    .take(top)
                    .map(|e| format!("{} ({})", e.name, e.count))
                    .collect();
                let rest: u64 = l.top.iter().skip(top).map(|e| e.count).sum::<u64>() + l.other;
                if rest > 0 {
                    items.push(format!("others ({rest})"));
                }
                if !items.is_empty() {
                    let _ = writeln!(o, "    {name:13} {}", items.join(", "));
                }
            }
        }
    };
    section(
        &mut o,
        "what enforce would have refused (audited pairs)",
        &r.would_refuse,
    );
    section(&mut o, "refused in enforce mode", &r.refused);
    let _ = writeln!(o, "\npairs that never saw traffic:");
    if r.never_seen.is_empty() {
        let _ = writeln!(o, "  none");
    } else {
        let names: Vec<String> = r
            .never_seen
            .iter()
            .map(|[s, d]| format!("{s} -> {d}"))
            .collect();
        let _ = writeln!(o, "  {}", names.join(", "));
    }
    o
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

pub fn csv(r: &Report) -> String {
    let mut o = String::from("src_env,dst_env,verdict,mode,direction,proto,count\n");
    for row in &r.counters {
        let k = &row.key;
        let _ = writeln!(
            o,
            "{},{},{},{},{},{},{}",
            csv_field(&k.src_env),
            csv_field(&k.dst_env),
            csv_field(&k.verdict),
            csv_field(&k.mode),
            csv_field(&k.direction),
            csv_field(&k.proto),
            row.count
        );
    }
    o
}

fn dot_id(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

pub fn dot(r: &Report) -> String {
    let mut o = String::from(
        "digraph envguard {\n  rankdir=LR;\n  node [shape=box, style=rounded, fontname=\"sans-serif\"];\n  edge [fontname=\"sans-serif\", fontsize=10];\n",
    );
    let _ = writeln!(
        o,
        "  label={};\n  labelloc=t;",
        dot_id(&format!("envguard report {} .. {}", r.since, r.until))
    );
    for e in &r.envs {
        let _ = writeln!(o, "  {};", dot_id(e));
    }
    for p in r.matrix.iter().filter(|p| p.total() > 0) {
        let mut label = Vec::new();
        for (n, what) in [
            (p.allowed, "allowed"),
            (p.denied, "refused"),
            (p.audited, "audited"),
        ] {
            if n > 0 {
                label.push(format!("{what} {n}"));
            }
        }
        let width = 1.0 + (p.total() as f64).log2().max(0.0) / 2.0;
        let color = if p.denied + p.audited > 0 {
            "red"
        } else {
            "gray40"
        };
        let style = if p.denied == 0 && p.audited > 0 {
            "dashed"
        } else {
            "solid"
        };
        // Ours: names and numbers, `\n` meant as dot's line break.
        let label = label.join("\\n");
        let _ = writeln!(
            o,
            "  {} -> {} [label=\"{label}\", penwidth={width:.2}, weight={}, color={color}, fontcolor={color}, style={style}];",
            dot_id(&p.src_env),
            dot_id(&p.dst_env),
            p.total().max(1),
        );
    }
    o.push_str("}\n");
    o
}

#[cfg(test)]
mod tests;
