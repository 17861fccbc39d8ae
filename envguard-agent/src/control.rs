//! The control socket: a unix stream socket that takes one JSON request per
//! connection (one line, size-limited, schema-checked) and answers with one
//! JSON line — or, for `events`, with the event stream.
//!
//! Every request carries the caller's credentials (SO_PEERCRED, taken by the
//! kernel when the client connected). The socket's file mode decides who may
//! connect (0600 root, or 0660 with a group for read-only users);
//! state-changing requests are refused unless the caller connected as root.
//! Capabilities are deliberately not honoured: they can only be read from the
//! peer's *current* process state, which a client can change after connecting
//! (exec a setuid or file-capability binary and pass it the connection).
use std::{
    collections::HashMap,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{broadcast, mpsc, oneshot},
};

use crate::{
    error::{Error, Result},
    policy::Mode,
};

pub const DEFAULT_SOCKET: &str = "/run/envguard/control.sock";

/// The control socket of the agent that runs with `pin_root`: one agent per
/// pin root, so one socket per pin root too. The default pin root has the
/// documented default socket.
pub fn socket_for(pin_root: &Path) -> PathBuf {
    if pin_root == Path::new(crate::loader::DEFAULT_PIN_ROOT) {
        return PathBuf::from(DEFAULT_SOCKET);
    }
    let h = crate::sys::fnv1a(&[pin_root.as_os_str().as_encoded_bytes()]);
    PathBuf::from(format!("/run/envguard/control-{h:016x}.sock"))
}
/// Largest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;
/// A client that does not send its request in this time is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How many connections and event subscriptions the control socket serves at
/// once. Root has a bound of its own that no other user's connections count
/// against, so members of `--control-group` cannot crowd root out (with
/// `events` subscriptions or idle connections); other users share one bound
/// and each has a smaller one of their own. A connection over a bound gets
/// one JSON error line saying which, and is closed; every refusal is counted
/// (`status`, metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Connections from uid 0.
    pub root: usize,
    /// Connections from all other users together.
    pub others: usize,
    /// Connections from one user other than root.
    pub per_uid: usize,
    /// `events` subscriptions from all users other than root together.
    pub subscribers: usize,
    /// `events` subscriptions from one user other than root.
    pub subscribers_per_uid: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            root: 1024,
            others: 1024,
            per_uid: 64,
            subscribers: 256,
            subscribers_per_uid: 16,
        }
    }
}

/// Why a connection was refused: a `Limits` field's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    Root,
    Others,
    PerUid,
    Subscribers,
    SubscribersPerUid,
}

impl Refusal {
    pub const ALL: [Refusal; 5] = [
        Refusal::Root,
        Refusal::Others,
        Refusal::PerUid,
        Refusal::Subscribers,
        Refusal::SubscribersPerUid,
    ];

    /// The label in `status` and the metrics.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Root => "root",
            Refusal::Others => "others",
            Refusal::PerUid => "per_uid",
            Refusal::Subscribers => "subscribers",
            Refusal::SubscribersPerUid => "subscribers_per_uid",
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    root: usize,
    others: usize,
    per_uid: HashMap<u32, usize>,
    subscribers: usize,
    subscribers_per_uid: HashMap<u32, usize>,
    refused: [u64; Refusal::ALL.len()],
}

/// Admission to the control socket: counts what is open, per user, and what
/// was refused. Shared by the accept loop, the connections and `status`.
#[derive(Debug, Default)]
pub struct Gate {
    limits: Limits,
    counts: std::sync::Mutex<Counts>,
}

/// A connection's place, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    gate: Arc<Gate>,
    uid: u32,
    subscriber: bool,
}

impl Gate {
    pub fn new(limits: Limits) -> Gate {
        Gate {
            limits,
            counts: std::sync::Mutex::default(),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a refusal; returns its message.
    fn refuse(c: &mut Counts, why: Refusal, message: String) -> String {
        c.refused[why as usize] += 1;
        message
    }

    /// A place for a new connection from `uid`, or why there is none.
    pub fn admit(self: &Arc<Self>, uid: u32) -> Result<Slot, String> {
        let l = self.limits;
        let mut c = self.counts();
        if uid == 0 {
            if c.root >= l.root {
                return Err(Self::refuse(
                    &mut c,
                    Refusal::Root,
                    format!("too many connections from root (limit {})", l.root),
                ));
            }
            c.root += 1;
        } else {
            let mine = c.per_uid.get(&uid).copied().unwrap_or(0);
            if mine >= l.per_uid {
                return Err(Self::refuse(
                    &mut c,
                    Refusal::PerUid,
                    format!("too many connections from uid {uid} (limit {})", l.per_uid),
                ));
            }
            if c.others >= l.others {
                return Err(Self::refuse(
                    &mut c,
                    Refusal::Others,
                    format!(
                        "too many connections from users other than root (limit {})",
                        l.others
                    ),
                ));
            }
            c.others += 1;
            *c.per_uid.entry(uid).or_default() += 1;
        }
        Ok(Slot {
            gate: self.clone(),
            uid,
            subscriber: false,
        })
    }

    /// Turns `slot` into an `events` subscriber's, or says why not (the
    /// slot stays a plain connection's).
    pub fn subscribe(&self, slot: &mut Slot) -> Result<(), String> {
        if slot.uid == 0 || slot.subscriber {
            slot.subscriber = true;
            return Ok(());
        }
        let l = self.limits;
        let mut c = self.counts();
        let uid = slot.uid;
        let mine = c.subscribers_per_uid.get(&uid).copied().unwrap_or(0);
        if mine >= l.subscribers_per_uid {
            return Err(Self::refuse(
                &mut c,
                Refusal::SubscribersPerUid,
                format!(
                    "too many event subscriptions from uid {uid} (limit {})",
                    l.subscribers_per_uid
                ),
            ));
        }
        if c.subscribers >= l.subscribers {
            return Err(Self::refuse(
                &mut c,
                Refusal::Subscribers,
                format!(
                    "too many event subscriptions from users other than root (limit {})",
                    l.subscribers
                ),
            ));
        }
        c.subscribers += 1;
        *c.subscribers_per_uid.entry(uid).or_default() += 1;
        slot.subscriber = true;
        Ok(())
    }

    /// Refusals so far, by reason.
    pub fn refused(&self) -> Vec<(Refusal, u64)> {
        let c = self.counts();
        Refusal::ALL
            .iter()
            .map(|&r| (r, c.refused[r as usize]))
            .collect()
    }

    /// For `status`: what is open, what was refused, the limits.
    pub fn status(&self) -> ControlStatus {
        let c = self.counts();
        let n = |r: Refusal| c.refused[r as usize];
        let refused = RefusedCounts {
            root: n(Refusal::Root),
            others: n(Refusal::Others),
            per_uid: n(Refusal::PerUid),
            subscribers: n(Refusal::Subscribers),
            subscribers_per_uid: n(Refusal::SubscribersPerUid),
        };
        ControlStatus {
            open: OpenConnections {
                root: c.root,
                others: c.others,
                subscribers: c.subscribers,
            },
            refused_total: c.refused.iter().sum(),
            refused,
            limits: self.limits,
        }
    }
}

/// The control socket's admission in `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlStatus {
    pub open: OpenConnections,
    pub refused_total: u64,
    /// By reason, named as the [`Limits`] field that refused.
    pub refused: RefusedCounts,
    pub limits: Limits,
}

/// Connections open now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenConnections {
    pub root: usize,
    pub others: usize,
    /// `events` subscriptions of users other than root.
    pub subscribers: usize,
}

/// Refusals since start, by reason ([`Refusal::name`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedCounts {
    pub root: u64,
    pub others: u64,
    pub per_uid: u64,
    pub subscribers: u64,
    pub subscribers_per_uid: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.gate.counts();
        if self.uid == 0 {
            c.root -= 1;
            return;
        }
        c.others -= 1;
        let uid = self.uid;
        let release = |m: &mut HashMap<u32, usize>| {
            if let Some(n) = m.get_mut(&uid) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&uid);
                }
            }
        };
        release(&mut c.per_uid);
        if self.subscriber {
            c.subscribers -= 1;
            release(&mut c.subscribers_per_uid);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    // Unit-like variants are written as `{}` so that unknown fields are
    // refused for them too.
    Status {},
    /// Switch the global mode, or one env pair's (`from` and `to` together).
    Mode(ModeRequest),
    Reload {},
    Explain {
        from: String,
        to: String,
        port: String,
    },
    /// Subscribe to the event stream.
    Events {},
}

/// Which mode a `mode` request switches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Global,
    Pair { from: String, to: String },
}

impl std::fmt::Display for Scope {
    /// `global` or `from->to`, as in `mode_change` records and replies.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Global => f.write_str("global"),
            Scope::Pair { from, to } => write!(f, "{from}->{to}"),
        }
    }
}

/// `{"cmd":"mode","mode":"audit"|"enforce","from":ENV,"to":ENV,"for_secs":N}`:
/// `from` and `to` together or neither.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ModeWire", into = "ModeWire")]
pub struct ModeRequest {
    pub mode: Mode,
    pub scope: Scope,
    /// Revert after this many seconds (break-glass).
    pub for_secs: Option<u64>,
}

/// A `mode` request as it travels.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModeWire {
    mode: Mode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    for_secs: Option<u64>,
}

impl TryFrom<ModeWire> for ModeRequest {
    type Error = &'static str;

    fn try_from(w: ModeWire) -> Result<Self, Self::Error> {
        let scope = match (w.from, w.to) {
            (None, None) => Scope::Global,
            (Some(from), Some(to)) => Scope::Pair { from, to },
            _ => return Err("a pair's mode needs both --from and --to"),
        };
        Ok(ModeRequest {
            mode: w.mode,
            scope,
            for_secs: w.for_secs,
        })
    }
}

impl From<ModeRequest> for ModeWire {
    fn from(r: ModeRequest) -> Self {
        let (from, to) = match r.scope {
            Scope::Global => (None, None),
            Scope::Pair { from, to } => (Some(from), Some(to)),
        };
        ModeWire {
            mode: r.mode,
            from,
            to,
            for_secs: r.for_secs,
        }
    }
}

/// The answer to `mode`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeReply {
    /// `global` or `from->to`.
    pub scope: String,
    /// The mode before.
    pub from: Mode,
    pub to: Mode,
    /// When a break-glass switch reverts (RFC 3339); `null` for a lasting one.
    pub expires_at: Option<String>,
}

/// The answer to `reload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReply {
    /// `sha256:…` of the policy file now in force.
    pub revision: String,
}

/// The answer to `status`. Field order is the wire order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply {
    /// When the agent started (RFC 3339).
    pub since: String,
    pub uptime_s: u64,
    pub pid: u32,
    /// The policy file.
    pub policy: String,
    /// `sha256:…` of the policy file in force.
    pub revision: String,
    /// The global mode.
    pub mode: Mode,
    /// Where the global mode comes from: `runtime` or `policy`.
    pub mode_source: ModeSource,
    pub cgroup_root: String,
    /// The programs attached.
    pub hooks: Vec<String>,
    pub pin_root: String,
    /// Whether the agent adopted pinned state.
    pub adopted: bool,
    /// Every env, `host` and `world` included, in id order.
    pub envs: Vec<String>,
    /// Break-glass switches waiting to revert.
    pub pending_reverts: Vec<PendingRevert>,
    /// Every pair of envs, `from` major.
    pub pairs: Vec<PairStatus>,
    /// The control socket's admission (absent in answers of agents older than
    /// its limits).
    #[serde(default)]
    pub control: ControlStatus,
}

/// Where a mode comes from, as `status` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModeSource {
    /// An operator's switch (`envguard mode`).
    Runtime,
    /// The policy file (its `mode`; for a pair, a `[[pair_mode]]`).
    Policy,
    /// A pair without a mode of its own: the global mode applies.
    Global,
}

/// One env pair in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairStatus {
    pub from: String,
    pub to: String,
    pub decision: PairDecision,
    pub mode: Mode,
    /// `runtime`, `policy` or `global`.
    pub mode_source: ModeSource,
    /// Decisions since the agent started.
    pub allowed: u64,
    pub denied: u64,
    pub audited: u64,
}

/// The policy's decision for a pair in general.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairDecision {
    /// Every flow allowed.
    Allow,
    /// Some ports or protocols allowed, or some denied.
    Ports,
    /// A violation, refused (enforce mode).
    Deny,
    /// A violation, let through and reported (audit mode).
    Audit,
}

impl PairDecision {
    pub fn name(self) -> &'static str {
        match self {
            PairDecision::Allow => "allow",
            PairDecision::Ports => "ports",
            PairDecision::Deny => "deny",
            PairDecision::Audit => "audit",
        }
    }
}

/// A break-glass switch waiting to revert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRevert {
    /// `global` or `from->to`.
    pub scope: String,
    pub mode: Mode,
    /// `audit`, `enforce`, or `policy` (back to the policy file's mode).
    pub reverts_to: String,
    /// RFC 3339.
    pub expires_at: String,
}

impl Request {
    /// Whether the request changes the agent's state.
    pub fn mutates(&self) -> bool {
        matches!(self, Request::Mode(_) | Request::Reload {})
    }
}

/// Who sent a request.
#[derive(Debug, Clone, Serialize)]
pub struct Actor {
    pub uid: Option<u32>,
    pub pid: Option<i32>,
    pub comm: String,
}

impl Actor {
    /// The agent itself (a break-glass expiry, SIGHUP).
    pub fn agent(what: &str) -> Actor {
        Actor {
            // SAFETY: geteuid cannot fail.
            uid: Some(unsafe { libc::geteuid() }),
            pid: Some(std::process::id() as i32),
            comm: what.to_owned(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

impl Response {
    pub fn ok(result: serde_json::Value) -> Response {
        Response {
            ok: true,
            error: None,
            result: Some(result),
        }
    }

    pub fn err(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(message.into()),
            result: None,
        }
    }
}

/// A request for the daemon's main loop, which owns all state.
pub struct Call {
    pub request: Request,
    pub actor: Actor,
    pub reply: oneshot::Sender<Response>,
}

/// Binds the socket with its permissions and serves it until the agent exits,
/// admitting connections through `gate`.
pub fn serve(
    path: &Path,
    group: Option<u32>,
    calls: mpsc::Sender<Call>,
    events: broadcast::Sender<String>,
    gate: Arc<Gate>,
) -> Result<tokio::task::JoinHandle<()>> {
    let io = |context: String| move |source| Error::Io { context, source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::ControlSocketInUse {
                path: path.to_owned(),
            });
        }
        // Left by an agent that did not exit cleanly.
        std::fs::remove_file(path).map_err(io(format!("removing stale {}", path.display())))?;
    }
    let listener = UnixListener::bind(path).map_err(io(format!("binding {}", path.display())))?;
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io(format!("setting the mode of {}", path.display())))?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, Some(0), Some(gid))
            .map_err(io(format!("giving {} to group {gid}", path.display())))?;
    }
    Ok(tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((mut stream, _)) => {
                    let Ok(cred) = stream.peer_cred() else {
                        continue;
                    };
                    let mut slot = match gate.admit(cred.uid()) {
                        Ok(slot) => slot,
                        Err(why) => {
                            // One line into a fresh socket's empty send
                            // buffer: never blocks the accept loop. Then closed.
                            log::debug!("control socket: refused a connection: {why}");
                            let _ = stream.try_write(&answer_line(&Response::err(why)));
                            continue;
                        }
                    };
                    let calls = calls.clone();
                    let events = events.subscribe();
                    tokio::spawn(async move {
                        if let Err(e) = handle(&mut stream, &mut slot, calls, events).await {
                            log::debug!("control connection: {e}");
                        }
                        // The place is free before the client sees the
                        // connection close.
                        drop(slot);
                        drop(stream);
                    });
                }
                Err(e) => {
                    log::warn!("control socket accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }))
}

fn answer_line(r: &Response) -> Vec<u8> {
    let mut line = serde_json::to_vec(r).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    line.push(b'\n');
    line
}

async fn reply(
    stream: &mut (impl tokio::io::AsyncWrite + Unpin),
    r: &Response,
) -> std::io::Result<()> {
    stream.write_all(&answer_line(r)).await
}

async fn handle(
    stream: &mut UnixStream,
    slot: &mut Slot,
    calls: mpsc::Sender<Call>,
    mut events: broadcast::Receiver<String>,
) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let (read, mut write) = stream.split();
    let mut reader = BufReader::new(read).take(MAX_REQUEST as u64 + 1);
    let mut line = Vec::new();
    let n = match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Ok(r) => r?,
        Err(_) => {
            return reply(&mut write, &Response::err("no request within 5 s")).await;
        }
    };
    if n > MAX_REQUEST {
        return reply(
            &mut write,
            &Response::err(format!("request larger than {MAX_REQUEST} bytes")),
        )
        .await;
    }
    let request: Request = match serde_json::from_slice(&line) {
        Ok(r) => r,
        Err(e) => {
            return reply(
                &mut write,
                &Response::err(format!("malformed request: {e}")),
            )
            .await;
        }
    };
    let pid = cred.pid();
    let actor = Actor {
        uid: Some(cred.uid()),
        pid,
        comm: pid.map(comm_of).unwrap_or_default(),
    };
    if request.mutates() && cred.uid() != 0 {
        return reply(
            &mut write,
            &Response::err(format!(
                "permission denied: {} changes envguard's state and needs root (you are uid {})",
                command_name(&request),
                cred.uid()
            )),
        )
        .await;
    }
    if request == (Request::Events {}) {
        let gate = slot.gate.clone();
        if let Err(why) = gate.subscribe(slot) {
            return reply(&mut write, &Response::err(why)).await;
        }
        reply(&mut write, &Response::ok(serde_json::json!("subscribed"))).await?;
        // Watch the client's side too: a subscriber that hangs up gives its
        // place back at once, not at the next record. What it sends is
        // ignored.
        let mut from_client = reader.into_inner();
        let mut ignored = [0u8; 512];
        loop {
            let got = tokio::select! {
                got = events.recv() => got,
                n = from_client.read(&mut ignored) => match n {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(_) => continue,
                },
            };
            match got {
                Ok(mut line) => {
                    line.push('\n');
                    write.write_all(line.as_bytes()).await?;
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    // A subscriber that falls behind loses records, and is told how many.
                    let notice = serde_json::json!({
                        "kind": "lost_events",
                        "source": "queue:subscriber",
                        "count": n,
                    });
                    write.write_all(format!("{notice}\n").as_bytes()).await?;
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
        }
    }
    let (tx, rx) = oneshot::channel();
    if calls
        .send(Call {
            request,
            actor,
            reply: tx,
        })
        .await
        .is_err()
    {
        return reply(&mut write, &Response::err("the agent is shutting down")).await;
    }
    let response = rx
        .await
        .unwrap_or_else(|_| Response::err("the agent dropped the request"));
    reply(&mut write, &response).await
}

fn command_name(r: &Request) -> &'static str {
    match r {
        Request::Status {} => "status",
        Request::Mode { .. } => "mode",
        Request::Reload {} => "reload",
        Request::Explain { .. } => "explain",
        Request::Events {} => "events",
    }
}

fn comm_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Client side: sends one request and returns the first answer line, and the
/// connection for requests that stream more (events).
pub async fn call(
    socket: &Path,
    request: &Request,
) -> anyhow::Result<(Response, BufReader<UnixStream>)> {
    use anyhow::Context as _;
    let mut stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "connecting to the agent's control socket {} (is `envguard run` running, and may you open the socket?)",
            socket.display()
        )
    })?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line).await?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader.read_line(&mut answer).await?;
    let response: Response = serde_json::from_str(&answer)
        .with_context(|| format!("unreadable answer from the agent: {answer:?}"))?;
    Ok((response, reader))
}

/// Runs `call` on a fresh current-thread runtime, for the CLI subcommands.
/// [`call_blocking`], the answer read as `T` (the command's reply type).
pub fn call_typed<T: serde::de::DeserializeOwned>(
    socket: &Path,
    request: &Request,
) -> anyhow::Result<T> {
    Ok(serde_json::from_value(call_blocking(socket, request)?)?)
}

pub fn call_blocking(socket: &Path, request: &Request) -> anyhow::Result<serde_json::Value> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (response, _) = rt.block_on(call(socket, request))?;
    match response {
        Response {
            ok: true, result, ..
        } => Ok(result.unwrap_or(serde_json::Value::Null)),
        Response { error, .. } => Err(anyhow::anyhow!(
            "{}",
            error.unwrap_or_else(|| "the agent refused without a reason".to_owned())
        )),
    }
}

/// How the client subcommands find the agent.
#[derive(Debug, Clone, clap::Args)]
pub struct SocketArg {
    /// The agent's control socket [default: the socket of --pin-root's agent,
    /// /run/envguard/control.sock for the default pin root].
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// The pin root of the agent to talk to.
    #[arg(long, value_name = "DIR", default_value = crate::loader::DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,
}

impl SocketArg {
    pub fn path(&self) -> PathBuf {
        self.control_socket
            .clone()
            .unwrap_or_else(|| socket_for(&self.pin_root))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_schema_checked() {
        let ok: Request =
            serde_json::from_str(r#"{"cmd":"mode","mode":"audit","for_secs":60}"#).unwrap();
        assert_eq!(
            ok,
            Request::Mode(ModeRequest {
                mode: Mode::Audit,
                scope: Scope::Global,
                for_secs: Some(60)
            })
        );
        assert!(ok.mutates());
        for bad in [
            r#"{"cmd":"rm -rf"}"#,
            r#"{"cmd":"status","extra":1}"#,
            r#"{"cmd":"mode"}"#,
            r#"{"cmd":"mode","mode":1}"#,
            "not json",
            "",
        ] {
            assert!(
                serde_json::from_str::<Request>(bad).is_err(),
                "{bad} accepted"
            );
        }
        assert!(!Request::Status {}.mutates());
        assert!(!Request::Events {}.mutates());
    }

    /// `status --json`'s fields, nesting and order are a contract.
    #[test]
    fn status_reply_keeps_its_wire_shape() {
        let reply = StatusReply {
            since: "2026-11-23T10:00:00Z".into(),
            uptime_s: 5,
            pid: 1,
            policy: "/etc/envguard/policy.toml".into(),
            revision: "sha256:00".into(),
            mode: Mode::Enforce,
            mode_source: ModeSource::Runtime,
            cgroup_root: "/".into(),
            hooks: vec!["connect4".into()],
            pin_root: "/sys/fs/bpf/envguard".into(),
            adopted: false,
            envs: vec!["host".into()],
            pending_reverts: vec![PendingRevert {
                scope: "global".into(),
                mode: Mode::Audit,
                reverts_to: "policy".into(),
                expires_at: "2026-11-23T11:00:00Z".into(),
            }],
            pairs: vec![PairStatus {
                from: "host".into(),
                to: "host".into(),
                decision: PairDecision::Allow,
                mode: Mode::Enforce,
                mode_source: ModeSource::Global,
                allowed: 1,
                denied: 2,
                audited: 3,
            }],
            control: Gate::new(Limits::default()).status(),
        };
        let json = serde_json::to_string(&reply).unwrap();
        assert_eq!(
            json,
            concat!(
                r#"{"since":"2026-11-23T10:00:00Z","uptime_s":5,"pid":1,"policy":"/etc/envguard/policy.toml","#,
                r#""revision":"sha256:00","mode":"enforce","mode_source":"runtime","cgroup_root":"/","#,
                r#""hooks":["connect4"],"pin_root":"/sys/fs/bpf/envguard","adopted":false,"envs":["host"],"#,
                r#""pending_reverts":[{"scope":"global","mode":"audit","reverts_to":"policy","expires_at":"2026-11-23T11:00:00Z"}],"#,
                r#""pairs":[{"from":"host","to":"host","decision":"allow","mode":"enforce","mode_source":"global","allowed":1,"denied":2,"audited":3}],"#,
                r#""control":{"open":{"root":0,"others":0,"subscribers":0},"refused_total":0,"#,
                r#""refused":{"root":0,"others":0,"per_uid":0,"subscribers":0,"subscribers_per_uid":0},"#,
                r#""limits":{"root":1024,"others":1024,"per_uid":64,"subscribers":256,"subscribers_per_uid":16}}}"#
            )
        );
        assert_eq!(serde_json::from_str::<StatusReply>(&json).unwrap(), reply);
    }

    #[test]
    fn root_keeps_its_own_room_and_users_their_share() {
        let gate = Arc::new(Gate::new(Limits {
            root: 3,
            others: 4,
            per_uid: 3,
            subscribers: 3,
            subscribers_per_uid: 2,
        }));
        // One user takes all it may: 3 connections, 2 of them subscribed.
        let mut a: Vec<Slot> = (0..3).map(|_| gate.admit(1000).unwrap()).collect();
        assert_eq!(
            gate.admit(1000).err().as_deref(),
            Some("too many connections from uid 1000 (limit 3)")
        );
        gate.subscribe(&mut a[0]).unwrap();
        gate.subscribe(&mut a[1]).unwrap();
        assert_eq!(
            gate.subscribe(&mut a[2]),
            Err("too many event subscriptions from uid 1000 (limit 2)".to_owned())
        );
        // Another user gets the rest of the shared room.
        let mut b = gate.admit(1001).unwrap();
        gate.subscribe(&mut b).unwrap();
        assert_eq!(
            gate.admit(1002).err().as_deref(),
            Some("too many connections from users other than root (limit 4)")
        );
        // Root is not counted against any of it, subscribed or not.
        let mut r: Vec<Slot> = (0..3).map(|_| gate.admit(0).unwrap()).collect();
        for s in &mut r {
            gate.subscribe(s).unwrap();
        }
        assert_eq!(
            gate.admit(0).err().as_deref(),
            Some("too many connections from root (limit 3)")
        );
        let st = serde_json::to_value(gate.status()).unwrap();
        assert_eq!(
            st["open"],
            serde_json::json!({"root": 3, "others": 4, "subscribers": 3})
        );
        assert_eq!(st["refused_total"], 4, "{st}");
        assert_eq!(
            st["refused"],
            serde_json::json!({"root": 1, "others": 1, "per_uid": 1, "subscribers": 0, "subscribers_per_uid": 1})
        );
        // Places come back when connections close.
        drop(a.remove(0));
        drop(b);
        let mut c = gate.admit(1002).unwrap();
        gate.subscribe(&mut c).unwrap();
        let mut d = gate.admit(1000).unwrap();
        gate.subscribe(&mut d).unwrap();
        let mut e = gate.admit(1003).unwrap_err();
        assert!(e.contains("other than root"), "{e}");
        drop(r);
        drop(a.pop());
        e = gate.subscribe(&mut gate.admit(1003).unwrap()).unwrap_err();
        assert_eq!(
            e,
            "too many event subscriptions from users other than root (limit 3)"
        );
        drop((a, c, d));
        let st = serde_json::to_value(gate.status()).unwrap();
        assert_eq!(
            st["open"],
            serde_json::json!({"root": 0, "others": 0, "subscribers": 0})
        );
    }
}
