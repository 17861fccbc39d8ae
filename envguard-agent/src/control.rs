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
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{broadcast, mpsc, oneshot},
};

use crate::error::{Error, Result};

mod gate;
mod protocol;

pub use gate::{ControlStatus, Gate, Limits, OpenConnections, Refusal, RefusedCounts, Slot};
pub use protocol::{
    Actor, EndpointStatus, InterfaceStatus, ModeReply, ModeRequest, ModeSource, PairDecision,
    PairStatus, PendingRevert, PolicyFileText, PolicyReply, ReloadReply, Request, Response, Scope,
    StatusReply,
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

/// A request for the daemon's main loop, which owns all state.
pub struct Call {
    pub request: Request,
    pub actor: Actor,
    pub reply: oneshot::Sender<Response>,
}

/// Binds a listening unix socket whose file is born with `mode` (less the
/// umask): the mode set on the socket's inode before `bind(2)` is the one
/// the kernel gives the file, so there is no moment at which another user
/// could connect to a socket chmod(2) has not narrowed yet.
fn bind_with_mode(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    use std::os::unix::ffi::OsStrExt as _;
    // SAFETY: plain syscall; the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: valid fd.
    if unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: all-zero is a valid sockaddr_un.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: valid fd and address of `len` bytes.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: valid, bound fd.
    if unsafe { libc::listen(fd.as_raw_fd(), 1024) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))
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
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    let listener = bind_with_mode(path, mode).map_err(io(format!("binding {}", path.display())))?;
    // The umask may have taken bits the mode needs (group write): give them
    // back. The file was never wider than `mode`.
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
        Request::Policy {} => "policy",
        Request::ProbeMark { .. } => "probe_mark",
        Request::Register(_) => "register",
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

/// [`call_blocking`], the answer read as `T` (the command's reply type).
pub fn call_typed<T: serde::de::DeserializeOwned>(
    socket: &Path,
    request: &Request,
) -> anyhow::Result<T> {
    Ok(serde_json::from_value(call_blocking(socket, request)?)?)
}

/// Runs `call` on a fresh current-thread runtime, for the CLI subcommands.
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
