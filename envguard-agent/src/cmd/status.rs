//! `envguard status`: the state of the host at a glance.
use std::io::IsTerminal as _;

use serde_json::Value;

use crate::control::{Request, SocketArg, call_blocking};

/// Show the running agent's state: uptime, mode (global and per pair), policy
/// revision, hooks, pinned state, pending break-glass reverts, and an env × env
/// matrix of the policy's decisions with counters since the agent started.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub socket: SocketArg,
    /// Print the agent's answer as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let s = call_blocking(&args.socket.path(), &Request::Status {})?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    print!("{}", render(&s, std::io::stdout().is_terminal()));
    Ok(())
}

const CELL: usize = 9;

fn paint(text: &str, colour: bool) -> String {
    let code = match text.trim() {
        "allow" => "32",
        "deny" => "31",
        "audit" => "33",
        "ports" => "36",
        _ => return text.to_owned(),
    };
    if colour {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

fn cut(s: &str, width: usize) -> String {
    let mut out: String = s.chars().take(width).collect();
    if s.chars().count() > width {
        out.pop();
        out.push('…');
    }
    format!("{out:<width$}")
}

/// A header line cut to the terminal's 80 columns.
fn fit(line: String) -> String {
    if line.chars().count() <= 80 {
        line
    } else {
        let mut cut: String = line.chars().take(79).collect();
        cut.push('…');
        cut
    }
}

/// `2026-11-23T11:09:23.476182128Z` → `11:09:23Z`: a revert is minutes away.
fn clock(rfc3339: &str) -> String {
    match rfc3339.split_once('T') {
        Some((_, t)) => format!("{}Z", &t[..t.len().min(8)]),
        None => rfc3339.to_owned(),
    }
}

/// Renders the status for a terminal of 80 columns.
pub fn render(s: &Value, colour: bool) -> String {
    let str_of = |v: &Value| v.as_str().unwrap_or("?").to_owned();
    let mut out = String::new();
    let uptime = s["uptime_s"].as_u64().unwrap_or(0);
    let mut head = vec![
        format!(
            "envguard  pid {}, up {} (since {})",
            s["pid"],
            humantime::format_duration(std::time::Duration::from_secs(uptime)),
            str_of(&s["since"])
        ),
        format!("policy    {}", str_of(&s["policy"])),
        // One space: a sha256 revision then fits 80 columns whole.
        format!("revision {}", str_of(&s["revision"])),
        format!(
            "hooks     {} attached at {}",
            s["hooks"].as_array().map_or(0, Vec::len),
            str_of(&s["cgroup_root"])
        ),
        format!(
            "pinned    {}{}",
            str_of(&s["pin_root"]),
            if s["adopted"].as_bool() == Some(true) {
                " (adopted)"
            } else {
                ""
            }
        ),
    ];
    for p in s["pending_reverts"].as_array().into_iter().flatten() {
        head.push(format!(
            "pending   {}: {} until {}, then {}",
            str_of(&p["scope"]),
            str_of(&p["mode"]),
            clock(&str_of(&p["expires_at"])),
            str_of(&p["reverts_to"])
        ));
    }
    for line in head {
        out.push_str(&fit(line));
        out.push('\n');
    }
    out.push_str(&format!(
        "mode      {} ({})\n",
        paint(&str_of(&s["mode"]), colour),
        str_of(&s["mode_source"])
    ));
    let envs: Vec<String> = s["envs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(str_of)
        .collect();
    let pairs = s["pairs"].as_array().cloned().unwrap_or_default();
    let find = |f: &str, t: &str| {
        pairs
            .iter()
            .find(|p| p["from"] == f && p["to"] == t)
            .cloned()
            .unwrap_or(Value::Null)
    };
    // At most 7 columns of envs fit 80 columns beside the row labels.
    for chunk in envs.chunks(7) {
        out.push_str(&format!("\n{}", cut("from \\ to", 12)));
        for t in chunk {
            out.push_str(&cut(t, CELL));
        }
        out.push('\n');
        for f in &envs {
            out.push_str(&cut(f, 12));
            for t in chunk {
                let p = find(f, t);
                let mut cell = str_of(&p["decision"]);
                if p["mode_source"] == "runtime" || p["mode_source"] == "policy" {
                    cell.push('*');
                }
                let padded = cut(&cell, CELL);
                out.push_str(&paint(&padded, colour));
            }
            out.push('\n');
        }
    }
    out.push_str(
        "(* the pair has its own mode)\n\ncounters since start  allowed    denied   audited\n",
    );
    let mut any = false;
    for p in &pairs {
        let n = |k: &str| p[k].as_u64().unwrap_or(0);
        if n("allowed") + n("denied") + n("audited") == 0 {
            continue;
        }
        any = true;
        let label = format!("{} -> {}", str_of(&p["from"]), str_of(&p["to"]));
        out.push_str(&format!(
            "{} {:>9} {:>9} {:>9}\n",
            cut(&label, 21),
            n("allowed"),
            n("denied"),
            n("audited")
        ));
    }
    if !any {
        out.push_str("(no decisions yet)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_80_columns() {
        let envs: Vec<String> = (0..12).map(|i| format!("environment-{i}")).collect();
        let mut pairs = Vec::new();
        for f in &envs {
            for t in &envs {
                pairs.push(
                    serde_json::json!({"from": f, "to": t, "decision": "deny", "mode": "enforce",
                    "mode_source": "global", "allowed": 123456789u64, "denied": 1, "audited": 0}),
                );
            }
        }
        let s = serde_json::json!({"pid": 1, "uptime_s": 5, "since": "2026-11-23T10:00:00Z", "mode": "enforce",
            "mode_source": "policy", "policy": "/etc/envguard/policy.toml", "revision": "sha256:0123456789abcdef",
            "hooks": ["a"], "cgroup_root": "/envguard-t-123456-7/a/very/long/attach/point/below/the/mount",
            "pin_root": "/sys/fs/bpf/envguard-t-123456-7/and/a/long/way/down/to/the/pins", "adopted": true,
            "pending_reverts": [{"scope": "environment-10->environment-11", "mode": "audit",
                "expires_at": "2026-11-23T11:09:23.476182128Z", "reverts_to": "enforce"}],
            "envs": envs, "pairs": pairs});
        let text = render(&s, false);
        for line in text.lines() {
            assert!(
                line.chars().count() <= 80,
                "{} columns: {line}",
                line.chars().count()
            );
        }
        assert!(text.contains("deny"));
    }
}
