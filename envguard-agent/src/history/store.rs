//! The state directory on disk: checked like the pin root (root's, 0700, no
//! symbolic link anywhere on the way, nothing in it someone else could
//! write; see `pinroot`), locked with `flock` so one agent writes it, and
//! `history.json` replaced atomically.
use std::{
    fs,
    io::{self, Write as _},
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use super::{FORMAT, History};
use crate::{
    error::{Error, Result},
    pinroot,
};

/// The history file's name in the state directory.
pub const FILE: &str = "history.json";
/// The default `--state-dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/envguard";

fn io_err(context: String) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io { context, source }
}

/// The state directory an agent writes, opened, checked and locked.
pub struct StateDir {
    path: PathBuf,
    /// Holds the `flock` for as long as the agent runs.
    _dir: fs::File,
}

impl StateDir {
    /// Creates (0700) or checks `path`, and takes its lock: a second agent
    /// on the same state directory is refused, since two writers would each
    /// count the other's deltas again.
    pub fn open(path: &Path) -> Result<StateDir> {
        let dir = pinroot::open_state_dir(path, "opening the state directory")?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            let context = if e.kind() == io::ErrorKind::WouldBlock {
                format!(
                    "state directory {} is in use by another envguard agent (give each agent its own --state-dir)",
                    path.display()
                )
            } else {
                format!("locking the state directory {}", path.display())
            };
            return Err(Error::Io { context, source: e });
        }
        Ok(StateDir {
            path: path.to_owned(),
            _dir: dir,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored history; a new one if there is none. A file that cannot
    /// be read as a history is moved aside (`history.json.unreadable-<unix
    /// time>`) and a new one started, loudly: refusing to start would take
    /// enforcement's agent down over its statistics.
    pub fn load(&self) -> Result<History> {
        let file = self.path.join(FILE);
        match read(&file) {
            Ok(Some(h)) => Ok(h),
            Ok(None) => Ok(History::new()),
            Err(e) => {
                let aside = self
                    .path
                    .join(format!("{FILE}.unreadable-{}", crate::sys::unix_secs()));
                fs::rename(&file, &aside)
                    .map_err(io_err(format!("moving {} aside", file.display())))?;
                log::error!(
                    "{e}; moved it to {} and started a new history",
                    aside.display()
                );
                Ok(History::new())
            }
        }
    }

    /// Replaces `history.json` with `h`: a temp file written and synced,
    /// renamed over it, the directory synced.
    pub fn save(&self, h: &History) -> Result<()> {
        let file = self.path.join(FILE);
        let tmp = self.path.join(format!("{FILE}.tmp"));
        let body = serde_json::to_vec(h).map_err(|e| Error::Io {
            context: "encoding the history".into(),
            source: io::Error::other(e),
        })?;
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err(format!("removing {}", tmp.display()))(e));
            }
            _ => {}
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(io_err(format!("creating {}", tmp.display())))?;
        f.write_all(&body)
            .and_then(|()| f.sync_all())
            .map_err(io_err(format!("writing {}", tmp.display())))?;
        drop(f);
        fs::rename(&tmp, &file).map_err(io_err(format!("renaming {} to {FILE}", tmp.display())))?;
        fs::File::open(&self.path)
            .and_then(|d| d.sync_all())
            .map_err(io_err(format!("syncing {}", self.path.display())))
    }
}

/// Reads `history.json` at `file` (not following a link): `None` if there
/// is none.
pub fn read(file: &Path) -> Result<Option<History>> {
    let body = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(file)
    {
        Ok(mut f) => {
            let mut s = Vec::new();
            io::Read::read_to_end(&mut f, &mut s)
                .map_err(io_err(format!("reading {}", file.display())))?;
            s
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(format!("opening {}", file.display()))(e)),
    };
    let h: History = serde_json::from_slice(&body).map_err(|e| Error::Io {
        context: format!("reading the history {}", file.display()),
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    })?;
    if h.format != FORMAT {
        return Err(Error::Io {
            context: format!(
                "reading the history {}: format {} (this envguard reads format {FORMAT})",
                file.display(),
                h.format
            ),
            source: io::ErrorKind::InvalidData.into(),
        });
    }
    Ok(Some(h))
}

/// For `envguard report`: checks `dir` like the agent does (creating
/// nothing) and reads its history.
pub fn read_state_dir(dir: &Path) -> Result<Option<History>> {
    if !pinroot::check_state_dir(dir, "reading the state directory")? {
        return Ok(None);
    }
    read(&dir.join(FILE))
}
