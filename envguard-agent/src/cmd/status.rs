//! `envguard status`: the state of the host at a glance.
use std::io::IsTerminal as _;

use crate::control::{ModeSource, Request, SocketArg, StatusReply, call_blocking};

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
    let answer = call_blocking(&args.socket.path(), &Request::Status {})?;
    if args.json {
        // The agent's answer as it is, fields this client does not know included.
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    let s: StatusReply = serde_json::from_value(answer)
        .map_err(|e| anyhow::anyhow!("unreadable status answer from the agent: {e}"))?;
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
pub fn render(s: &StatusReply, colour: bool) -> String {
    let mut out = String::new();
    let mut head = vec![
        format!(
            "envguard  pid {}, up {} (since {})",
            s.pid,
            humantime::format_duration(std::time::Duration::from_secs(s.uptime_s)),
            s.since
        ),
        format!("policy    {}", s.policy),
        // One space: a sha256 revision then fits 80 columns whole.
        format!("revision {}", s.revision),
        format!("hooks     {} attached at {}", s.hooks.len(), s.cgroup_root),
        format!(
            "pinned    {}{}",
            s.pin_root,
            if s.adopted { " (adopted)" } else { "" }
        ),
    ];
    for i in &s.interfaces {
        head.push(format!(
            "interface {} (index {}): env {}, tc hooks by {}",
            i.name, i.ifindex, i.env, i.attach
        ));
    }
    for p in &s.pending_reverts {
        head.push(format!(
            "pending   {}: {} until {}, then {}",
            p.scope,
            p.mode,
            clock(&p.expires_at),
            p.reverts_to
        ));
    }
    for line in head {
        out.push_str(&fit(line));
        out.push('\n');
    }
    let source = match s.mode_source {
        ModeSource::Runtime => "runtime",
        ModeSource::Policy => "policy",
        ModeSource::Global => "global",
    };
    out.push_str(&format!(
        "mode      {} ({source})\n",
        paint(s.mode.name(), colour),
    ));
    let find = |f: &str, t: &str| s.pairs.iter().find(|p| p.from == f && p.to == t);
    // At most 7 columns of envs fit 80 columns beside the row labels.
    for chunk in s.envs.chunks(7) {
        out.push_str(&format!("\n{}", cut("from \\ to", 12)));
        for t in chunk {
            out.push_str(&cut(t, CELL));
        }
        out.push('\n');
        for f in &s.envs {
            out.push_str(&cut(f, 12));
            for t in chunk {
                let mut cell = find(f, t).map_or("?", |p| p.decision.name()).to_owned();
                if find(f, t).is_some_and(|p| p.mode_source != ModeSource::Global) {
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
    for p in &s.pairs {
        if p.allowed + p.denied + p.audited == 0 {
            continue;
        }
        any = true;
        let label = format!("{} -> {}", p.from, p.to);
        out.push_str(&format!(
            "{} {:>9} {:>9} {:>9}\n",
            cut(&label, 21),
            p.allowed,
            p.denied,
            p.audited
        ));
    }
    if !any {
        out.push_str("(no decisions yet)\n");
    }
    if !s.containers.is_empty() {
        out.push_str("\ncontainers  env          name                 id\n");
        for c in &s.containers {
            out.push_str(&fit(format!(
                "{}{}{} {}",
                cut("", 12),
                cut(&c.env, 13),
                cut(&c.container.name, 20),
                // The short id, as runtimes print it; `--json` has it whole.
                c.container.id.chars().take(12).collect::<String>()
            )));
            out.push('\n');
        }
    }
    if !s.endpoints.is_empty() {
        out.push_str("\nendpoints (container addresses)\n");
        for e in &s.endpoints {
            // 39 columns hold any IPv6 address: the line fits 80.
            out.push_str(&fit(format!(
                "{:<39} {} netns {} {}",
                e.address,
                cut(&e.env, 12),
                e.netns,
                clock(&e.since)
            )));
            out.push('\n');
        }
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
        let text = render(&serde_json::from_value(s).unwrap(), false);
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
