//! The syslog sink: RFC 5424 messages, one datagram per record, to a unix
//! datagram socket (`/dev/log` by default) or UDP.
//!
//! Kept hand-written (issue 13, item 5): the header is a few lines of
//! formatting; what takes the room — field limits, the measured 8096-byte
//! cap with the `oversized_record` stand-in, severity by kind, the bounded
//! queue with loss counts — is envguard's contract either way. The `syslog`
//! crate's RFC 5424 formatter takes a numeric MSGID (ours is the record's
//! kind) and writes its own timestamp, where the sink tests check the
//! record's `time` and every header field byte for byte.
//!
//! ```text
//! <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG
//! <28>1 2026-11-23T10:45:47.852301Z vm envguard 4242 violation - {"kind":"violation",…}
//! ```
//!
//! - PRI: facility `daemon` (3), severity `warning` (4) for `violation` and
//!   `violation_rollup` records, `notice` (5) for every other kind: 28 or 29.
//! - TIMESTAMP: the record's own `time`, cut to microseconds (RFC 5424 allows
//!   at most 6 fractional digits); the current time if the line has none.
//! - HOSTNAME: this host's name; APP-NAME: as configured (`envguard`);
//!   PROCID: the agent's pid; MSGID: the record's `kind`. All are limited to
//!   printable US-ASCII and their RFC 5424 lengths (255, 48, 128, 32).
//! - STRUCTURED-DATA: none (`-`). MSG: the JSON record, UTF-8, without a BOM
//!   (a BOM would stop downstream JSON parsers).
//!
//! Size: a message is at most [`MAX_MESSAGE_BYTES`] (8096 bytes, header
//! included: rsyslog's default `maxMessageSize`, measured — it cuts anything
//! longer, and a cut record no longer parses; syslog-ng and journald take
//! more). A
//! record that does not fit is not cut: it is replaced by a small record that
//! keeps its header, so `seq` stays gapless for the syslog consumer and the
//! replacement still parses —
//! `{"kind":"oversized_record","time":…,"seq":…,"boot_id":…,"host":…,
//! "original_kind":"policy_rejected","bytes":12345,"limit":8096}` — with the
//! original record's MSGID and severity. The whole record is still on the
//! other sinks (stdout, file). In practice only `policy_rejected` with a very
//! long error list or `policy_loaded` with hundreds of envs come near it.
//!
//! A receiver that is not there (no socket, rsyslog restarting) costs the
//! record, counted as lost; the sink reconnects at most once a second. A
//! receiver that does not read makes sends block for at most 1 s each (then
//! the record is counted lost), which fills this sink's queue, and the records
//! that do not fit are counted lost: never the caller's problem.
//!
//! The receiver must parse RFC 5424 on that socket: for rsyslog's imuxsock,
//! `input(type="imuxsock" Socket="…" UseSpecialParser="off")` (or
//! `SysSock.UseSpecialParser="off"` for `/dev/log`).
use std::{
    io,
    net::{SocketAddr, UdpSocket},
    os::unix::net::UnixDatagram,
    time::{Duration, Instant, SystemTime},
};

use super::{Sink, SyslogTarget, Warned};
use crate::error::Error;

/// Syslog facility `daemon`.
pub const FACILITY: u8 = 3;
/// The largest datagram the sink sends, header included.
pub const MAX_MESSAGE_BYTES: usize = 8096;
const SEVERITY_WARNING: u8 = 4;
const SEVERITY_NOTICE: u8 = 5;
const RETRY: Duration = Duration::from_secs(1);
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

enum Conn {
    Unix(UnixDatagram),
    Udp(UdpSocket),
}

impl Conn {
    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.send(buf),
            Conn::Udp(s) => s.send(buf),
        }
    }
}

fn connect(target: &SyslogTarget) -> io::Result<Conn> {
    match target {
        SyslogTarget::Unix(path) => {
            let s = UnixDatagram::unbound()?;
            s.set_write_timeout(Some(SEND_TIMEOUT))?;
            s.connect(path)?;
            Ok(Conn::Unix(s))
        }
        SyslogTarget::Udp(addr) => {
            let local: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0".parse().expect("literal")
            } else {
                "[::]:0".parse().expect("literal")
            };
            let s = UdpSocket::bind(local)?;
            s.set_write_timeout(Some(SEND_TIMEOUT))?;
            s.connect(addr)?;
            Ok(Conn::Udp(s))
        }
    }
}

pub(super) struct SyslogSink {
    target: SyslogTarget,
    conn: Option<Conn>,
    last_attempt: Instant,
    host: String,
    app_name: String,
    procid: String,
    warned: Warned,
}

impl SyslogSink {
    /// A UDP socket that cannot be made is an error; a unix socket nobody
    /// listens on yet is only a warning (the sink retries).
    pub(super) fn new(target: SyslogTarget, app_name: &str) -> Result<SyslogSink, Error> {
        let what = match &target {
            SyslogTarget::Unix(p) => format!("syslog {}", p.display()),
            SyslogTarget::Udp(a) => format!("syslog udp {a}"),
        };
        let mut warned = Warned::new(what.clone());
        let conn = match connect(&target) {
            Ok(c) => Some(c),
            Err(source) if matches!(target, SyslogTarget::Udp(_)) => {
                return Err(Error::Io {
                    context: format!("opening {what}"),
                    source,
                });
            }
            Err(e) => {
                warned.fail(&format_args!("connecting: {e}"));
                None
            }
        };
        Ok(SyslogSink {
            target,
            conn,
            last_attempt: Instant::now(),
            host: header_field(&crate::sys::hostname(), 255),
            app_name: header_field(app_name, 48),
            procid: std::process::id().to_string(),
            warned,
        })
    }

    fn reconnect(&mut self) -> bool {
        self.last_attempt = Instant::now();
        match connect(&self.target) {
            Ok(c) => {
                self.conn = Some(c);
                true
            }
            Err(e) => {
                self.conn = None;
                self.warned.fail(&format_args!("connecting: {e}"));
                false
            }
        }
    }

    /// Sends one datagram; returns the number of records lost (0 or 1).
    fn send(&mut self, msg: &[u8]) -> u64 {
        if self.conn.is_none() && (self.last_attempt.elapsed() < RETRY || !self.reconnect()) {
            return 1;
        }
        let conn = self.conn.as_ref().expect("connected above");
        let result = match conn.send(msg) {
            // The receiver went away and maybe came back (rsyslog restarted and
            // made a new socket), or an earlier UDP datagram drew an ICMP
            // error: once more on a fresh connection.
            Err(e) if reconnectable(&e) => {
                if self.reconnect() {
                    self.conn.as_ref().expect("reconnected").send(msg)
                } else {
                    return 1;
                }
            }
            r => r,
        };
        match result {
            Ok(_) => {
                self.warned.ok();
                0
            }
            Err(e) => {
                self.warned.fail(&format_args!("sending: {e}"));
                1
            }
        }
    }
}

fn reconnectable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::NotFound
            | io::ErrorKind::NotConnected
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
    )
}

impl Sink for SyslogSink {
    fn push(&mut self, line: &str) -> u64 {
        let msg = message(
            line,
            &self.host,
            &self.app_name,
            &self.procid,
            SystemTime::now(),
        );
        self.send(msg.as_bytes())
    }

    fn flush(&mut self) -> u64 {
        0
    }
}

/// A header field: printable US-ASCII only (others become `_`), at most
/// `max` bytes, `-` when empty.
fn header_field(s: &str, max: usize) -> String {
    let out: String = s
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .take(max)
        .collect();
    if out.is_empty() { "-".to_owned() } else { out }
}

/// The value of a string field `"name":"…"` of a JSON line, found cheaply:
/// the header's fields come first, so this looks at the start of the line.
/// Values with escapes are not needed (kind and time have none).
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let head = &line[..line.floor_char_boundary(256)];
    let key = format!("\"{name}\":\"");
    let start = head.find(&key)? + key.len();
    let len = line[start..].find('"')?;
    let value = &line[start..start + len];
    (!value.contains('\\')).then_some(value)
}

/// `2026-11-23T10:45:47.852301113Z` → `2026-11-23T10:45:47.852301Z`.
fn micros(time: &str) -> Option<String> {
    let b = time.as_bytes();
    let ok = time.len() == 30
        && b[4] == b'-'
        && b[10] == b'T'
        && b[19] == b'.'
        && b[29] == b'Z'
        && b[20..29].iter().all(u8::is_ascii_digit);
    ok.then(|| format!("{}Z", &time[..26]))
}

fn severity(kind: Option<&str>) -> u8 {
    match kind {
        Some("violation" | "violation_rollup") => SEVERITY_WARNING,
        _ => SEVERITY_NOTICE,
    }
}

/// One RFC 5424 message for one JSON line (see the module docs).
fn message(line: &str, host: &str, app_name: &str, procid: &str, now: SystemTime) -> String {
    let kind = field(line, "kind");
    let pri = FACILITY * 8 + severity(kind);
    let time = field(line, "time")
        .and_then(micros)
        .unwrap_or_else(|| humantime::format_rfc3339_micros(now).to_string());
    let msgid = kind.map_or_else(|| "-".to_owned(), |k| header_field(k, 32));
    let header = format!("<{pri}>1 {time} {host} {app_name} {procid} {msgid} - ");
    if header.len() + line.len() <= MAX_MESSAGE_BYTES {
        return header + line;
    }
    header + &oversized(line, kind)
}

/// The stand-in for a record too large for one message.
fn oversized(line: &str, kind: Option<&str>) -> String {
    use serde_json::{Map, Value};
    let original: Map<String, Value> = serde_json::from_str(line).unwrap_or_default();
    let mut out = Map::new();
    out.insert("kind".into(), "oversized_record".into());
    for key in ["time", "seq", "boot_id", "host"] {
        if let Some(v) = original.get(key) {
            out.insert(key.into(), v.clone());
        }
    }
    out.insert("original_kind".into(), kind.into());
    out.insert("bytes".into(), line.len().into());
    out.insert("limit".into(), MAX_MESSAGE_BYTES.into());
    Value::Object(out).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIOLATION: &str = r#"{"kind":"violation","time":"2026-11-23T10:45:47.852301113Z","seq":1,"boot_id":"b","host":"vm","mode":"enforce"}"#;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn formats_rfc5424_with_the_records_time_and_kind() {
        assert_eq!(
            message(VIOLATION, "vm", "envguard", "4242", at(0)),
            format!("<28>1 2026-11-23T10:45:47.852301Z vm envguard 4242 violation - {VIOLATION}")
        );
        let loaded = r#"{"kind":"policy_loaded","time":"2026-11-23T10:45:38.000000001Z","seq":0,"host":"vm"}"#;
        assert_eq!(
            message(loaded, "vm", "envguard", "1", at(0)),
            format!("<29>1 2026-11-23T10:45:38.000000Z vm envguard 1 policy_loaded - {loaded}")
        );
        let rollup = r#"{"kind":"violation_rollup","time":"2026-11-23T10:45:38.000000001Z"}"#;
        assert!(message(rollup, "vm", "envguard", "1", at(0)).starts_with("<28>1 "));
    }

    #[test]
    fn falls_back_to_now_and_nil_values() {
        assert_eq!(
            message("not json", "vm", "envguard", "7", at(1_800_000_000)),
            "<29>1 2027-01-15T08:00:00.000000Z vm envguard 7 - - not json"
        );
        // A time that is not the agent's own format is not trusted.
        let odd = r#"{"kind":"x","time":"yesterday"}"#;
        assert!(
            message(odd, "vm", "a", "7", at(0)).starts_with("<29>1 1970-01-01T00:00:00.000000Z ")
        );
    }

    #[test]
    fn header_fields_are_printable_ascii_and_bounded() {
        assert_eq!(header_field("my host", 255), "my_host");
        assert_eq!(header_field("", 48), "-");
        assert_eq!(header_field("héllo", 48), "h_llo");
        assert_eq!(header_field(&"a".repeat(100), 48).len(), 48);
        let long_kind = format!(r#"{{"kind":"{}"}}"#, "k".repeat(40));
        let m = message(&long_kind, "h", "a", "1", at(0));
        assert!(m.contains(&format!(" {} - ", "k".repeat(32))), "{m}");
    }

    #[test]
    fn oversized_records_are_replaced_by_a_parsable_stand_in() {
        let error = "e".repeat(MAX_MESSAGE_BYTES);
        let line = serde_json::json!({
            "kind": "policy_rejected", "time": "2026-11-23T10:45:47.852301113Z",
            "seq": 7, "boot_id": "abc", "host": "vm", "error": error,
        })
        .to_string();
        let m = message(&line, "vm", "envguard", "1", at(0));
        assert!(m.len() <= MAX_MESSAGE_BYTES);
        assert!(
            m.starts_with("<29>1 2026-11-23T10:45:47.852301Z vm envguard 1 policy_rejected - {"),
            "{m}"
        );
        let msg = &m[m.find(" - ").unwrap() + 3..];
        let v: serde_json::Value = serde_json::from_str(msg).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "kind": "oversized_record", "time": "2026-11-23T10:45:47.852301113Z",
                "seq": 7, "boot_id": "abc", "host": "vm",
                "original_kind": "policy_rejected", "bytes": line.len(), "limit": MAX_MESSAGE_BYTES,
            })
        );
        // The header fields come first, as in every record.
        assert!(
            msg.starts_with(r#"{"kind":"oversized_record","time":"#),
            "{msg}"
        );
        // One byte under the limit still goes whole.
        let header = message("{}", "vm", "envguard", "1", at(0)).len() - 2;
        let fits = format!(
            r#"{{"kind":"x","pad":"{}"}}"#,
            "p".repeat(MAX_MESSAGE_BYTES - header - 21)
        );
        let m = message(&fits, "vm", "envguard", "1", at(0));
        assert_eq!(m.len(), MAX_MESSAGE_BYTES);
        assert!(m.ends_with(&fits));
    }

    #[test]
    fn kind_is_read_from_the_start_of_the_line_only() {
        assert_eq!(field(VIOLATION, "kind"), Some("violation"));
        assert_eq!(
            field(VIOLATION, "time"),
            Some("2026-11-23T10:45:47.852301113Z")
        );
        let late = format!(r#"{{"x":"{}","kind":"violation"}}"#, "x".repeat(300));
        assert_eq!(field(&late, "kind"), None);
        assert_eq!(field(r#"{"kind":"a\"b"}"#, "kind"), None);
    }

    #[test]
    fn udp_delivers_and_a_missing_unix_socket_counts_losses() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut s =
            SyslogSink::new(SyslogTarget::Udp(rx.local_addr().unwrap()), "envguard").unwrap();
        assert_eq!(s.push(VIOLATION), 0);
        let mut buf = [0u8; 9000];
        let n = rx.recv(&mut buf).unwrap();
        let got = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(
            got.starts_with("<28>1 2026-11-23T10:45:47.852301Z "),
            "{got}"
        );
        assert!(got.ends_with(&format!(
            " envguard {} violation - {VIOLATION}",
            std::process::id()
        )));

        let mut dead =
            SyslogSink::new(SyslogTarget::Unix("/nonexistent/envguard-log".into()), "e").unwrap();
        for _ in 0..10 {
            assert_eq!(dead.push(VIOLATION), 1);
        }
    }
}
