//! verify's output: the env × env matrix, the probe list, drift; as text,
//! JSON and JUnit XML. Pure.
use std::{collections::BTreeSet, fmt::Write as _};

use serde::{Deserialize, Serialize};

use super::{drift::Drift, plan::Planned};

/// A probe's outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeOutcome {
    #[serde(flatten)]
    pub planned: Planned,
    /// `connected`, `sent`, `eperm`, `timeout`, `refused`, `unreachable`,
    /// `error`, `not_run`; `None` in a dry run.
    pub observed: Option<super::plan::Observed>,
    /// The verdict of the violation record the probe caused, if one was seen.
    pub record: Option<String>,
    /// `None` in a dry run.
    pub matched: Option<bool>,
    /// What happened, for people.
    pub outcome: String,
    /// Milliseconds the probe took.
    pub ms: Option<u64>,
    /// The transient cgroup's id (its records carry `"probe": run`).
    pub cgroup_id: Option<u64>,
}

/// The whole answer; JSON with `--json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The run id (`"probe"` in the agent's records of this run).
    pub run: String,
    pub dry_run: bool,
    pub policy: String,
    pub revision: String,
    /// The global mode in force (the file's in a dry run).
    pub mode: String,
    pub probes: Vec<ProbeOutcome>,
    pub matrix: Matrix,
    pub drift: Vec<Drift>,
    /// Every probe matched and no drift (always true in a dry run, which
    /// checks nothing).
    pub ok: bool,
}

/// Rows are local envs, columns destination envs; a cell is `✓` (every
/// probe matched), `✗` (one did not), `·` (no probe); in a dry run, what is
/// expected: `allow`, `deny`, `audit`, joined with `/` when mixed, `?` when
/// unknown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Matrix {
    pub rows: Vec<String>,
    pub columns: Vec<String>,
    pub cells: Vec<Vec<String>>,
}

pub fn matrix(probes: &[ProbeOutcome], dry_run: bool) -> Matrix {
    let rows: Vec<String> = probes
        .iter()
        .map(|p| p.planned.from.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let columns: Vec<String> = probes
        .iter()
        .map(|p| p.planned.to.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let cells = rows
        .iter()
        .map(|r| {
            columns
                .iter()
                .map(|c| {
                    let here: Vec<&ProbeOutcome> = probes
                        .iter()
                        .filter(|p| &p.planned.from == r && &p.planned.to == c)
                        .collect();
                    if here.is_empty() {
                        return "·".to_owned();
                    }
                    if dry_run {
                        let kinds: BTreeSet<&str> = here
                            .iter()
                            .map(|p| match p.planned.expect.as_str() {
                                "allowed" => "allow",
                                "denied" => "deny",
                                "audited" => "audit",
                                _ => "?",
                            })
                            .collect();
                        return kinds.into_iter().collect::<Vec<_>>().join("/");
                    }
                    if here.iter().all(|p| p.matched == Some(true)) {
                        "✓".to_owned()
                    } else {
                        "✗".to_owned()
                    }
                })
                .collect()
        })
        .collect();
    Matrix {
        rows,
        columns,
        cells,
    }
}

impl Report {
    pub fn new(
        run: String,
        dry_run: bool,
        policy: String,
        revision: String,
        mode: String,
        probes: Vec<ProbeOutcome>,
        drift: Vec<Drift>,
    ) -> Report {
        let matrix = matrix(&probes, dry_run);
        // A dry run only lists: nothing was checked, nothing failed.
        let ok = dry_run || (drift.is_empty() && probes.iter().all(|p| p.matched == Some(true)));
        Report {
            run,
            dry_run,
            policy,
            revision,
            mode,
            probes,
            matrix,
            drift,
            ok,
        }
    }

    pub fn failed(&self) -> usize {
        self.probes
            .iter()
            .filter(|p| p.matched == Some(false))
            .count()
    }

    /// For the terminal.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "envguard verify{}  run {}  policy {} ({})  mode {}",
            if self.dry_run { " --dry-run" } else { "" },
            self.run,
            self.policy,
            short(&self.revision),
            self.mode
        );
        s.push('\n');
        let m = &self.matrix;
        let first = m
            .rows
            .iter()
            .map(|r| r.chars().count())
            .chain(["from \\ to".len()])
            .max()
            .unwrap_or(0);
        let widths: Vec<usize> = m
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                m.cells
                    .iter()
                    .map(|row| row[i].chars().count())
                    .chain([c.chars().count()])
                    .max()
                    .unwrap_or(1)
            })
            .collect();
        let pad =
            |t: &str, w: usize| format!("{t}{}", " ".repeat(w.saturating_sub(t.chars().count())));
        let mut line = pad("from \\ to", first);
        for (c, w) in m.columns.iter().zip(&widths) {
            line.push_str("  ");
            line.push_str(&pad(c, *w));
        }
        let _ = writeln!(s, "{}", line.trim_end());
        for (r, row) in m.rows.iter().zip(&m.cells) {
            let mut line = pad(r, first);
            for (cell, w) in row.iter().zip(&widths) {
                line.push_str("  ");
                line.push_str(&pad(cell, *w));
            }
            let _ = writeln!(s, "{}", line.trim_end());
        }
        s.push('\n');
        for p in &self.probes {
            let mark = match p.matched {
                Some(true) => "✓",
                Some(false) => "✗",
                None => "-",
            };
            let pl = &p.planned;
            let what = if self.dry_run {
                format!("expect {}", pl.expect)
            } else {
                p.outcome.clone()
            };
            // A listener bound to a wildcard is probed over loopback: say so.
            let addr = match &pl.addr {
                Some(a) if pl.kind == "listener" && !pl.target.contains(a.as_str()) => {
                    format!(" via {a}")
                }
                _ => String::new(),
            };
            let _ = write!(
                s,
                "{mark} {} -> {}  {}{addr}: {what}",
                pl.from, pl.to, pl.target
            );
            if !pl.rule.is_empty() {
                let _ = write!(s, "  [{}]", pl.rule);
            }
            if let Some(n) = &pl.note {
                let _ = write!(s, "  ({n})");
            }
            s.push('\n');
        }
        let failed: Vec<&ProbeOutcome> = self
            .probes
            .iter()
            .filter(|p| p.matched == Some(false))
            .collect();
        if !failed.is_empty() {
            s.push_str("\nfailed:\n");
            for p in failed {
                let pl = &p.planned;
                let _ = writeln!(
                    s,
                    "  {} -> {}  {}: {} (expected {})",
                    pl.from, pl.to, pl.target, p.outcome, pl.expect
                );
            }
        }
        if !self.drift.is_empty() {
            s.push_str("\ndrift:\n");
            for d in &self.drift {
                let _ = writeln!(s, "  {}", d.message);
            }
        }
        s.push('\n');
        if self.dry_run {
            let _ = writeln!(
                s,
                "{} probes planned (dry run: nothing sent)",
                self.probes.len()
            );
        } else {
            let _ = writeln!(
                s,
                "{} probes: {} matched, {} failed; drift: {}; {}",
                self.probes.len(),
                self.probes.len() - self.failed(),
                self.failed(),
                if self.drift.is_empty() {
                    "none".to_owned()
                } else {
                    self.drift.len().to_string()
                },
                if self.ok { "OK" } else { "FAILED" }
            );
        }
        s
    }

    /// JUnit XML: one testcase per probe (suite `probes`), and one for drift
    /// (suite `drift`, failing with every difference found).
    pub fn junit(&self) -> String {
        let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let drift_fail = usize::from(!self.drift.is_empty());
        let _ = writeln!(
            s,
            "<testsuites name=\"envguard verify\" tests=\"{}\" failures=\"{}\">",
            self.probes.len() + 1,
            self.failed() + drift_fail
        );
        let _ = writeln!(
            s,
            "  <testsuite name=\"envguard.verify.probes\" tests=\"{}\" failures=\"{}\" skipped=\"{}\">",
            self.probes.len(),
            self.failed(),
            if self.dry_run { self.probes.len() } else { 0 }
        );
        for p in &self.probes {
            let pl = &p.planned;
            let name = format!("{} -> {} {}", pl.from, pl.to, pl.target);
            let time = p.ms.map_or(0.0, |ms| ms as f64 / 1000.0);
            let _ = write!(
                s,
                "    <testcase classname=\"envguard.verify.{}\" name=\"{}\" time=\"{time:.3}\"",
                xml(&pl.from),
                xml(&name)
            );
            match p.matched {
                Some(true) => {
                    let _ = writeln!(
                        s,
                        "><system-out>{}</system-out></testcase>",
                        xml(&format!("expect {}: {}", pl.expect, p.outcome))
                    );
                }
                Some(false) => {
                    let _ = writeln!(
                        s,
                        "><failure message=\"{}\" type=\"mismatch\">{}</failure></testcase>",
                        xml(&p.outcome),
                        xml(&format!(
                            "expected {} ({}); observed {}",
                            pl.expect, pl.rule, p.outcome
                        ))
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        "><skipped message=\"{}\"/></testcase>",
                        xml(&format!("dry run: expect {}", pl.expect))
                    );
                }
            }
        }
        s.push_str("  </testsuite>\n");
        let _ = writeln!(
            s,
            "  <testsuite name=\"envguard.verify.drift\" tests=\"1\" failures=\"{drift_fail}\">"
        );
        s.push_str("    <testcase classname=\"envguard.verify.drift\" name=\"policy file, loaded policy and kernel maps agree\"");
        if self.drift.is_empty() {
            s.push_str("/>\n");
        } else {
            let all: Vec<&str> = self.drift.iter().map(|d| d.message.as_str()).collect();
            let _ = writeln!(
                s,
                "><failure message=\"{}\" type=\"drift\">{}</failure></testcase>",
                xml(all[0]),
                xml(&all.join("\n"))
            );
        }
        s.push_str("  </testsuite>\n</testsuites>\n");
        s
    }
}

fn short(revision: &str) -> &str {
    revision.get(..19).unwrap_or(revision)
}

/// Text for XML attributes and content.
pub fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // XML 1.0 allows no other control characters.
            '\n' | '\t' => out.push(c),
            c if (c as u32) < 0x20 => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::plan::Observed;

    fn outcome(from: &str, to: &str, expect: &str, matched: Option<bool>) -> ProbeOutcome {
        ProbeOutcome {
            planned: Planned {
                id: 1,
                from: from.into(),
                cgroup: format!("/{from}"),
                to: to.into(),
                target: "198.18.10.5:5432/tcp".into(),
                kind: "policy".into(),
                addr: Some("198.18.10.5:5432".into()),
                proto: "tcp".into(),
                expect: expect.into(),
                rule: "r<&>".into(),
                note: None,
            },
            observed: matched.map(|_| Observed::Eperm),
            record: None,
            matched,
            outcome: if matched == Some(false) {
                "not refused (connected), but the policy refuses it".into()
            } else {
                "refused (EPERM)".into()
            },
            ms: Some(3),
            cgroup_id: Some(9),
        }
    }

    #[test]
    fn matrix_marks_each_pair() {
        let probes = vec![
            outcome("dev", "prod", "denied", Some(true)),
            outcome("dev", "prod", "denied", Some(false)),
            outcome("prod", "prod", "allowed", Some(true)),
        ];
        let m = matrix(&probes, false);
        assert_eq!(m.rows, ["dev", "prod"]);
        assert_eq!(m.columns, ["prod"]);
        assert_eq!(m.cells, [["✗"], ["✓"]]);
        let dry = matrix(&probes, true);
        assert_eq!(dry.cells, [["deny"], ["allow"]]);
        let r = Report::new(
            "v-1".into(),
            false,
            "p".into(),
            "sha256:ab".into(),
            "enforce".into(),
            probes,
            vec![],
        );
        assert!(!r.ok);
        assert_eq!(r.failed(), 1);
        let t = r.text();
        assert!(
            t.contains("from \\ to  prod\ndev        ✗\nprod       ✓\n"),
            "{t}"
        );
        assert!(
            t.contains("3 probes: 2 matched, 1 failed; drift: none; FAILED"),
            "{t}"
        );
    }

    #[test]
    fn junit_has_one_testcase_per_probe_and_escapes() {
        let probes = vec![
            outcome("dev", "prod", "denied", Some(true)),
            outcome("dev", "prod", "denied", Some(false)),
        ];
        let drift = vec![Drift::new(
            "policy_file",
            "policy file changed since the agent loaded it (reload?)".into(),
        )];
        let r = Report::new(
            "v-1".into(),
            false,
            "p".into(),
            "sha256:ab".into(),
            "enforce".into(),
            probes,
            drift,
        );
        let x = r.junit();
        assert!(x.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"envguard verify\" tests=\"3\" failures=\"2\">"), "{x}");
        assert_eq!(x.matches("<testcase ").count(), 3);
        assert!(
            x.contains("expected denied (r&lt;&amp;&gt;); observed not refused"),
            "{x}"
        );
        assert!(x.contains("<failure message=\"policy file changed since the agent loaded it (reload?)\" type=\"drift\">"), "{x}");
        assert_eq!(xml("a\u{1}\"'"), "a?&quot;&apos;");
    }
}
