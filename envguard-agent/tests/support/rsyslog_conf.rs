//! The configuration of a test's own rsyslogd, shared by the agent crate's
//! sink tests and the root-only suite (which includes this file by path):
//! one imuxsock input on `<dir>/log.sock` (RFC 5424 needs the special parser
//! off) and one imudp input on 127.0.0.1:`port`, each written to its own file
//! in `dir` with every field the tests check, `|`-separated.

/// The file the unix-socket input writes to, inside the test's directory.
pub const UNIX_LOG: &str = "unix.log";
/// The file the UDP input writes to.
pub const UDP_LOG: &str = "udp.log";

pub fn rsyslog_conf(dir: &std::path::Path, port: u16) -> String {
    let d = dir.display();
    format!(
        r#"global(workDirectory="{d}")
module(load="imuxsock" SysSock.Use="off")
module(load="imudp")
template(name="fields" type="string"
  string="%syslogfacility%|%syslogseverity%|%hostname%|%app-name%|%procid%|%msgid%|%structured-data%|%msg%\n")
ruleset(name="unix") {{ action(type="omfile" file="{d}/{UNIX_LOG}" template="fields") }}
ruleset(name="udp") {{ action(type="omfile" file="{d}/{UDP_LOG}" template="fields") }}
input(type="imuxsock" Socket="{d}/log.sock" UseSpecialParser="off" ruleset="unix")
input(type="imudp" address="127.0.0.1" port="{port}" ruleset="udp")
"#
    )
}
