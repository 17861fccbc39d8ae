//! Field-by-field checks of the agent's JSON lines.

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::policy::Mode;
use crate::sys;

/// What one side (`source` / `destination`) of a violation must say.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// `None`: not asserted — an IP address string, or null when the
    /// socket is not bound yet (connect/sendmsg hooks).
    pub ip: Option<IpAddr>,
    /// `None`: not asserted — a port number, or null when not bound yet.
    pub port: Option<u16>,
    pub env: &'static str,
    pub env_from: &'static str,
}

/// Everything a violation event must say.
#[derive(Clone, Debug)]
pub struct Expected {
    pub mode: Mode,
    pub direction: &'static str,
    pub hook: &'static str,
    pub proto: &'static str,
    pub source: Endpoint,
    pub destination: Endpoint,
    /// `None`: `process.pid` must be null.
    pub pid: Option<u32>,
    /// `Some`: `process.comm` must be this; `None`: string or null.
    pub comm: Option<&'static str>,
    /// `Some`: `process.uid` must be this; `None`: number or null.
    pub uid: Option<u32>,
    pub cgroup_id: u64,
    /// `process.cgroup`, relative to the cgroup2 mount.
    pub cgroup: String,
}

impl Expected {
    /// Every way `ev` differs from this expectation (empty: it matches).
    pub fn mismatches(&self, ev: &Value) -> Vec<String> {
        let mut errs = Vec::new();
        fn eq_in(errs: &mut Vec<String>, path: &str, got: &Value, want: Value) {
            if *got != want {
                errs.push(format!("{path}: expected {want}, got {got}"));
            }
        }
        eq_in(&mut errs, "kind", &ev["kind"], "violation".into());
        eq_in(&mut errs, "host", &ev["host"], sys::hostname().into());
        eq_in(&mut errs, "mode", &ev["mode"], self.mode.name().into());
        eq_in(
            &mut errs,
            "verdict",
            &ev["verdict"],
            self.mode.verdict().into(),
        );
        eq_in(
            &mut errs,
            "direction",
            &ev["direction"],
            self.direction.into(),
        );
        eq_in(&mut errs, "hook", &ev["hook"], self.hook.into());
        eq_in(&mut errs, "proto", &ev["proto"], self.proto.into());
        let p = &ev["process"];
        eq_in(
            &mut errs,
            "process.pid",
            &p["pid"],
            self.pid.map_or(Value::Null, Value::from),
        );
        eq_in(
            &mut errs,
            "process.cgroup_id",
            &p["cgroup_id"],
            self.cgroup_id.into(),
        );
        eq_in(
            &mut errs,
            "process.cgroup",
            &p["cgroup"],
            self.cgroup.as_str().into(),
        );
        match self.comm {
            Some(c) => eq_in(&mut errs, "process.comm", &p["comm"], c.into()),
            None if !(p["comm"].is_string() || p["comm"].is_null()) => errs.push(format!(
                "process.comm: expected a string or null, got {}",
                p["comm"]
            )),
            None => {}
        }
        match self.uid {
            Some(u) => eq_in(&mut errs, "process.uid", &p["uid"], u.into()),
            None if !(p["uid"].is_u64() || p["uid"].is_null()) => errs.push(format!(
                "process.uid: expected a number or null, got {}",
                p["uid"]
            )),
            None => {}
        }
        for (name, want) in [("source", &self.source), ("destination", &self.destination)] {
            endpoint(&mut errs, name, &ev[name], want);
        }
        if let Err(e) = check_time(&ev["time"]) {
            errs.push(format!("time: {e}"));
        }
        if !ev["seq"].is_u64() {
            errs.push(format!("seq: expected a number, got {}", ev["seq"]));
        }
        match ev["rule"].as_str() {
            Some(r) if !r.is_empty() => {}
            _ => errs.push(format!(
                "rule: expected a non-empty string, got {}",
                ev["rule"]
            )),
        }
        errs
    }

    /// Panics, showing the event and every mismatch, unless `ev` matches.
    pub fn assert_matches(&self, ev: &Value, case: &str) {
        let errs = self.mismatches(ev);
        assert!(
            errs.is_empty(),
            "{case}: wrong violation event\n  event: {ev}\n  mismatches:\n    {}",
            errs.join("\n    ")
        );
    }
}

fn endpoint(errs: &mut Vec<String>, name: &str, got: &Value, want: &Endpoint) {
    match want.ip {
        Some(ip) => {
            if got["ip"] != ip.to_string().as_str() {
                errs.push(format!("{name}.ip: expected \"{ip}\", got {}", got["ip"]));
            }
        }
        None => {
            if !got["ip"].is_null()
                && got["ip"]
                    .as_str()
                    .and_then(|s| s.parse::<IpAddr>().ok())
                    .is_none()
            {
                errs.push(format!(
                    "{name}.ip: expected an IP address string or null, got {}",
                    got["ip"]
                ));
            }
        }
    }
    match want.port {
        Some(port) => {
            if got["port"] != port {
                errs.push(format!("{name}.port: expected {port}, got {}", got["port"]));
            }
        }
        None => {
            if !got["port"].is_null() && got["port"].as_u64().is_none_or(|p| p > 65535) {
                errs.push(format!(
                    "{name}.port: expected a port number or null, got {}",
                    got["port"]
                ));
            }
        }
    }
    if got["env"] != want.env {
        errs.push(format!(
            "{name}.env: expected \"{}\", got {}",
            want.env, got["env"]
        ));
    }
    if got["env_from"] != want.env_from {
        errs.push(format!(
            "{name}.env_from: expected \"{}\", got {}",
            want.env_from, got["env_from"]
        ));
    }
}

/// Whether a line is a violation event.
pub fn is_violation(v: &Value) -> bool {
    v["kind"] == "violation"
}

/// Checks that `v` is an RFC 3339 timestamp (`YYYY-MM-DDTHH:MM:SS[.f{1,9}](Z|±HH:MM)`)
/// within ten minutes of now.
pub fn check_time(v: &Value) -> Result<(), String> {
    let s = v
        .as_str()
        .ok_or_else(|| format!("expected an RFC 3339 string, got {v}"))?;
    let t = parse_rfc3339(s).ok_or_else(|| format!("not an RFC 3339 timestamp: {s:?}"))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if (t - now).abs() > 600 {
        return Err(format!("{s:?} is more than 10 minutes away from now"));
    }
    Ok(())
}

/// Nanoseconds since the epoch of an RFC 3339 timestamp, or None.
pub fn rfc3339_ns(s: &str) -> Option<i128> {
    let secs = parse_rfc3339(s)?;
    let frac = s
        .get(19..)
        .and_then(|rest| rest.strip_prefix('.'))
        .map(|f| {
            f.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .unwrap_or_default();
    let nanos: i128 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().ok()?
    };
    Some(i128::from(secs) * 1_000_000_000 + nanos)
}

/// Seconds since the epoch of an RFC 3339 timestamp, or None.
fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if !(1..=9).contains(&(i - start)) {
            return None;
        }
    }
    let offset = match b.get(i..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let o = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
            if *sign == b'+' { o } else { -o }
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + sec - offset)
}

#[cfg(test)]
mod tests {
    use super::parse_rfc3339;

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2024-02-29T12:34:56.123456789Z"),
            Some(1_709_210_096)
        );
        assert_eq!(
            parse_rfc3339("2024-02-29T13:34:56.5+01:00"),
            Some(1_709_210_096)
        );
        assert_eq!(parse_rfc3339("2024-02-29T12:34:56.1234567891Z"), None);
        assert_eq!(
            super::rfc3339_ns("2024-02-29T12:34:56.5Z"),
            Some(1_709_210_096_500_000_000)
        );
        assert_eq!(
            super::rfc3339_ns("2024-02-29T12:34:56.000000007Z"),
            Some(1_709_210_096_000_000_007)
        );
        assert_eq!(parse_rfc3339("2024-02-29 12:34:56Z"), None);
        assert_eq!(parse_rfc3339("2024-02-29T12:34:56"), None);
    }
}
