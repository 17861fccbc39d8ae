//! Who may own the pin root: nobody but root.
//!
//! Whoever can write a directory of the pin tree can unlink envguard's link
//! pins (detaching every program) or plant pins of their own, and whoever can
//! rename a directory above it can swap the whole tree. So before the agent
//! (or `envguard detach`) uses a pin root, it walks the path from `/` down,
//! never following a symbolic link (`lstat`, `O_NOFOLLOW`), and requires:
//!
//! - **above the pin root** (`/`, `/sys`, `/sys/fs/bpf`, …): a directory (not
//!   a symbolic link) owned by root, and either not writable by group or
//!   others, or sticky (like a 1777 bpffs root or `/tmp`: others may add
//!   entries there but not rename or remove root's);
//! - **the pin root and everything below it** (`layout-*`, `maps`, `links`,
//!   the pins): owned by root, not writable by group or others, no symbolic
//!   link anywhere.
//!
//! Whatever fails is refused, with the path, its owner and mode, and the fix.
//! Nothing is repaired: a directory someone else owned or could write may
//! hold entries of theirs, and telling those from envguard's is not provable.
//! Every check holds an invariant only root can break (every directory on
//! the way is root's and writable by root alone), so the paths checked stay
//! the paths used.
//!
//! Directories the agent creates are made 0700 (set explicitly with fchmod,
//! whatever the umask); a pin root that passes the check with another mode
//! (0755, made by an older envguard) is narrowed to 0700, which only takes
//! access away. There is no lock file: the one-agent-per-pin-root lock is
//! `flock` on the pin root directory itself, which being 0700 only root can
//! open.
use std::{
    fs, io,
    os::unix::fs::{
        DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
    },
    path::{Component, Path, PathBuf},
};

use crate::error::{Error, Result, UnsafePinRoot};

/// Mode of every directory envguard creates in the pin tree.
pub const DIR_MODE: u32 = 0o700;

/// Where a path component stands relative to the pin root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A directory above the pin root.
    Ancestor,
    /// The pin root or a directory below it.
    TreeDir,
    /// Anything else below the pin root (a pin, or a stranger).
    TreeEntry,
}

/// What `lstat` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    Symlink,
    Other,
}

impl Kind {
    fn of(meta: &fs::Metadata) -> Kind {
        let t = meta.file_type();
        if t.is_symlink() {
            Kind::Symlink
        } else if t.is_dir() {
            Kind::Dir
        } else {
            Kind::Other
        }
    }
}

/// The rule, as a pure function: `None` if a component with this kind, owner
/// and mode may stand in this role, else what is wrong with it. `owner` is
/// the uid the pin tree must belong to (0; the tests' own uid in unit tests).
pub fn problem(role: Role, kind: Kind, uid: u32, mode: u32, owner: u32) -> Option<&'static str> {
    let others_write = mode & 0o022 != 0;
    let sticky = mode & libc::S_ISVTX != 0;
    match (role, kind) {
        (_, Kind::Symlink) => Some("is a symbolic link, which envguard does not follow here"),
        (Role::Ancestor | Role::TreeDir, Kind::Other) => Some("is not a directory"),
        (Role::Ancestor, Kind::Dir) if uid != 0 && uid != owner => Some("is not owned by root"),
        (Role::Ancestor, Kind::Dir) if others_write && !sticky => {
            Some("is writable by group or others and not sticky")
        }
        (Role::Ancestor, _) => None,
        (Role::TreeDir | Role::TreeEntry, _) if uid != owner => Some("is not owned by root"),
        (Role::TreeDir | Role::TreeEntry, _) if others_write => {
            Some("is writable by group or others")
        }
        _ => None,
    }
}

/// The checks, with the owner they require.
struct Walk<'a> {
    owner: u32,
    /// What the checked tree is: `pin root`, `state directory`.
    what: &'static str,
    pin_root: &'a Path,
    operation: &'a str,
}

impl Walk<'_> {
    fn io(&self, what: String) -> impl FnOnce(io::Error) -> Error {
        let context = format!("{}: {what}", self.operation);
        move |source| Error::Io { context, source }
    }

    fn refuse(&self, path: &Path, meta: &fs::Metadata, role: Role, problem: &str) -> Error {
        let root = self.pin_root.display();
        let (what, option) = if self.what == STATE_DIR {
            ("the state directory", "--state-dir")
        } else {
            ("the pin root", "--pin-root")
        };
        let fix = match role {
            Role::Ancestor if Kind::of(meta) == Kind::Symlink => format!(
                "give {option} as a path without symbolic links{}",
                fs::canonicalize(self.pin_root)
                    .map(|p| format!(" (here: {})", p.display()))
                    .unwrap_or_default()
            ),
            Role::Ancestor => format!(
                "every directory above {what} must be owned by root and writable by no one \
                 else (or sticky, like /tmp), since whoever can rename {} can swap what is below: \
                 fix it (`chown root {} && chmod go-w {}`) or choose another {option}",
                path.display(),
                path.display(),
                path.display()
            ),
            Role::TreeDir | Role::TreeEntry if self.what == STATE_DIR => format!(
                "whoever can write the state directory can forge or erase envguard's history. \
                 If root did not make it, remove it (`rm -rf {root}`) and start envguard again; \
                 if root did, `chown -R root {root} && chmod -R go-w {root}`"
            ),
            Role::TreeDir | Role::TreeEntry => format!(
                "whoever can write the pin tree can unlink envguard's link pins and detach its \
                 programs. If root did not make it, remove it (`rm -rf {root}`, which also \
                 removes what is pinned there) and start envguard again; if root did, \
                 `chown -R root {root} && chmod -R go-w {root}`"
            ),
        };
        Error::UnsafePinRoot(Box::new(UnsafePinRoot {
            operation: self.operation.to_owned(),
            what: self.what,
            pin_root: self.pin_root.to_owned(),
            path: path.to_owned(),
            problem: problem.to_owned(),
            uid: meta.uid(),
            mode: meta.mode() & 0o7777,
            fix,
        }))
    }

    /// `lstat`s `path` and applies the rule; `None` if it does not exist.
    fn check(&self, path: &Path, role: Role) -> Result<Option<fs::Metadata>> {
        let meta = match fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(format!("checking {}", path.display()))(e)),
        };
        match problem(role, Kind::of(&meta), meta.uid(), meta.mode(), self.owner) {
            Some(p) => Err(self.refuse(path, &meta, role, p)),
            None => Ok(Some(meta)),
        }
    }

    /// Creates `path` (its parent checked already) as a 0700 directory, or
    /// checks what is there.
    fn make_dir(&self, path: &Path, role: Role) -> Result<()> {
        if self.check(path, role)?.is_some() {
            return Ok(());
        }
        match fs::DirBuilder::new().mode(DIR_MODE).create(path) {
            Ok(()) => {
                // The umask may have taken bits off (or a hostile one added
                // none: mkdir never adds any); set the mode, without
                // following a link.
                let dir = open_dir(path).map_err(self.io(format!("opening {}", path.display())))?;
                dir.set_permissions(fs::Permissions::from_mode(DIR_MODE))
                    .map_err(self.io(format!("setting the mode of {}", path.display())))?;
            }
            // Made meanwhile, by another agent or someone else: checked below.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(self.io(format!("creating {}", path.display()))(e)),
        }
        match self.check(path, role)? {
            Some(_) => Ok(()),
            None => Err(self.io(format!("creating {}", path.display()))(
                io::ErrorKind::NotFound.into(),
            )),
        }
    }

    /// Checks every entry below `dir` (checked already), depth first, each
    /// directory before what it holds.
    fn check_tree(&self, dir: &Path, depth: usize) -> Result<()> {
        // envguard's own tree is 3 deep (layout-*/maps/PIN); anything much
        // deeper is not its own, and nothing below a checked directory can
        // change meanwhile.
        if depth > 16 {
            return Ok(());
        }
        let entries = fs::read_dir(dir).map_err(self.io(format!("listing {}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(self.io(format!("listing {}", dir.display())))?;
            let path = entry.path();
            let is_dir = entry
                .file_type()
                .map_err(self.io(format!("checking {}", path.display())))?
                .is_dir();
            let role = if is_dir {
                Role::TreeDir
            } else {
                Role::TreeEntry
            };
            if self.check(&path, role)?.is_some() && is_dir {
                self.check_tree(&path, depth + 1)?;
            }
        }
        Ok(())
    }

    /// Walks from `/` to the pin root, creating what is missing when
    /// `create`, then checks the whole tree below it. `false` if the pin root
    /// does not exist and `create` is off.
    fn pin_root(&self, create: bool) -> Result<bool> {
        let root = &std::path::absolute(self.pin_root)
            .map_err(self.io(format!("resolving {}", self.pin_root.display())))?;
        if root
            .components()
            .any(|c| !matches!(c, Component::RootDir | Component::Normal(_)))
        {
            return Err(Error::Io {
                context: format!(
                    "{}: pin root {} must be a path without `..`",
                    self.operation,
                    root.display()
                ),
                source: io::ErrorKind::InvalidInput.into(),
            });
        }
        let mut cur = PathBuf::from("/");
        self.check(&cur, Role::Ancestor)?;
        let names: Vec<_> = root.components().skip(1).collect();
        if names.is_empty() {
            // `/` itself is no pin root.
            return Err(Error::Io {
                context: format!("{}: / cannot be the pin root", self.operation),
                source: io::ErrorKind::InvalidInput.into(),
            });
        }
        for (i, name) in names.iter().enumerate() {
            cur.push(name);
            let role = if i + 1 == names.len() {
                Role::TreeDir
            } else {
                Role::Ancestor
            };
            if create {
                self.make_dir(&cur, role)?;
            } else if self.check(&cur, role)?.is_none() {
                return Ok(false);
            }
        }
        self.check_tree(root, 0)?;
        Ok(true)
    }
}

/// Opens a directory for reading without following a symbolic link.
fn open_dir(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

fn walk<'a>(pin_root: &'a Path, operation: &'a str) -> Walk<'a> {
    Walk {
        owner: 0,
        what: "pin root",
        pin_root,
        operation,
    }
}

/// Checks the path to `pin_root` and everything below it, creating the pin
/// root (0700) and any missing directory above it; returns the pin root,
/// opened without following links, for the lock.
pub fn open(pin_root: &Path, operation: &str) -> Result<fs::File> {
    open_as(pin_root, operation, 0)
}

fn open_as(pin_root: &Path, operation: &str, owner: u32) -> Result<fs::File> {
    let w = Walk {
        owner,
        ..walk(pin_root, operation)
    };
    w.pin_root(true)?;
    let f = open_dir(pin_root).map_err(w.io(format!("opening {}", pin_root.display())))?;
    // A pin root an older envguard left 0755 passes the check; narrowing it
    // to 0700 only takes access away (no one else may then open it, e.g. to
    // take the lock and keep the agent from starting).
    let mode = f
        .metadata()
        .map_err(w.io(format!("checking {}", pin_root.display())))?
        .mode();
    if mode & 0o7777 != DIR_MODE {
        f.set_permissions(fs::Permissions::from_mode(DIR_MODE))
            .map_err(w.io(format!("setting the mode of {}", pin_root.display())))?;
    }
    Ok(f)
}

/// What [`open_state_dir`]'s errors call the directory.
const STATE_DIR: &str = "state directory";

/// [`open`]'s checks and creation for the history's state directory (its
/// files may be forged or erased by whoever can write it): returns it
/// opened without following links, for the lock.
pub fn open_state_dir(dir: &Path, operation: &str) -> Result<fs::File> {
    let w = Walk {
        what: STATE_DIR,
        ..walk(dir, operation)
    };
    w.pin_root(true)?;
    let f = open_dir(dir).map_err(w.io(format!("opening {}", dir.display())))?;
    let mode = f
        .metadata()
        .map_err(w.io(format!("checking {}", dir.display())))?
        .mode();
    if mode & 0o7777 != DIR_MODE {
        f.set_permissions(fs::Permissions::from_mode(DIR_MODE))
            .map_err(w.io(format!("setting the mode of {}", dir.display())))?;
    }
    Ok(f)
}

/// [`open_state_dir`]'s checks, creating nothing: `false` if `dir` does not
/// exist (for `envguard report`, which only reads).
pub fn check_state_dir(dir: &Path, operation: &str) -> Result<bool> {
    Walk {
        what: STATE_DIR,
        ..walk(dir, operation)
    }
    .pin_root(false)
}

/// Like [`open`] but creates nothing: `false` if there is no pin root.
pub fn check_existing(pin_root: &Path, operation: &str) -> Result<bool> {
    walk(pin_root, operation).pin_root(false)
}

/// Creates `dir`, a directory below the checked `pin_root`, and what is
/// missing between them (each 0700), checking what exists.
pub fn create_dir(pin_root: &Path, dir: &Path, operation: &str) -> Result<()> {
    create_dir_as(pin_root, dir, operation, 0)
}

fn create_dir_as(pin_root: &Path, dir: &Path, operation: &str, owner: u32) -> Result<()> {
    let w = Walk {
        owner,
        ..walk(pin_root, operation)
    };
    let rel = dir.strip_prefix(pin_root).map_err(|_| Error::Io {
        context: format!(
            "{operation}: {} is not below the pin root {}",
            dir.display(),
            pin_root.display()
        ),
        source: io::ErrorKind::InvalidInput.into(),
    })?;
    let mut cur = pin_root.to_owned();
    for c in rel.components() {
        let Component::Normal(name) = c else {
            return Err(Error::Io {
                context: format!("{operation}: {} must not contain `..`", dir.display()),
                source: io::ErrorKind::InvalidInput.into(),
            });
        };
        cur.push(name);
        w.make_dir(&cur, Role::TreeDir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> u32 {
        // SAFETY: geteuid cannot fail.
        unsafe { libc::geteuid() }
    }

    struct Tmp(PathBuf);
    impl Tmp {
        fn new(tag: &str) -> Tmp {
            let p = std::env::temp_dir().join(format!(
                "envguard-pinroot-{tag}-{}-{}",
                std::process::id(),
                crate::sys::random_id()
            ));
            fs::create_dir(&p).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o700)).unwrap();
            Tmp(p)
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn mode_of(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn the_rule() {
        use Kind::*;
        use Role::*;
        let ok = |role, kind, uid, mode| problem(role, kind, uid, mode, 0).is_none();
        // Above the pin root: root's, and not writable by others unless sticky.
        assert!(ok(Ancestor, Dir, 0, 0o755));
        assert!(ok(Ancestor, Dir, 0, 0o555));
        assert!(ok(Ancestor, Dir, 0, 0o1777), "a 1777 bpffs root or /tmp");
        assert!(ok(Ancestor, Dir, 0, 0o700));
        assert!(!ok(Ancestor, Dir, 0, 0o777));
        assert!(!ok(Ancestor, Dir, 0, 0o775), "group-writable");
        assert!(!ok(Ancestor, Dir, 65534, 0o755), "someone else's");
        assert!(
            !ok(Ancestor, Dir, 65534, 0o1777),
            "someone else's sticky dir"
        );
        assert!(!ok(Ancestor, Symlink, 0, 0o777));
        assert!(!ok(Ancestor, Other, 0, 0o644));
        // The pin root and below: root's, writable by root alone, sticky or not.
        assert!(ok(TreeDir, Dir, 0, 0o700));
        assert!(ok(TreeDir, Dir, 0, 0o755), "made by an older envguard");
        assert!(
            !ok(TreeDir, Dir, 0, 0o1777),
            "sticky is not enough for the pin tree"
        );
        assert!(!ok(TreeDir, Dir, 0, 0o770));
        assert!(!ok(TreeDir, Dir, 65534, 0o700));
        assert!(!ok(TreeDir, Dir, 65534, 0o777));
        assert!(!ok(TreeDir, Symlink, 0, 0o777));
        assert!(
            !ok(TreeDir, Other, 0, 0o600),
            "a pin where a directory must be"
        );
        assert!(ok(TreeEntry, Other, 0, 0o600), "a pin");
        assert!(!ok(TreeEntry, Other, 0, 0o666));
        assert!(!ok(TreeEntry, Other, 65534, 0o600));
        assert!(!ok(TreeEntry, Symlink, 0, 0o777));
        assert_eq!(
            problem(TreeDir, Dir, 65534, 0o777, 0),
            Some("is not owned by root")
        );
    }

    #[test]
    fn creates_every_directory_0700_and_accepts_its_own_tree() {
        let t = Tmp::new("create");
        let root = t.0.join("a/b/pins");
        let f = open_as(&root, "test", me()).unwrap();
        assert!(f.metadata().unwrap().is_dir());
        for p in [t.0.join("a"), t.0.join("a/b"), root.clone()] {
            assert_eq!(mode_of(&p), 0o700, "{}", p.display());
        }
        let links = root.join("layout-1/links");
        create_dir_as(&root, &links, "test", me()).unwrap();
        create_dir_as(&root, &root.join("layout-1/maps"), "test", me()).unwrap();
        assert_eq!(mode_of(&root.join("layout-1")), 0o700);
        assert_eq!(mode_of(&links), 0o700);
        // A second agent's walk accepts what the first made.
        open_as(&root, "test", me()).unwrap();
        // A pin root an older envguard made 0755 is accepted and narrowed.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        open_as(&root, "test", me()).unwrap();
        assert_eq!(mode_of(&root), 0o700);
        assert!(
            create_dir_as(&root, &t.0.join("elsewhere"), "test", me()).is_err(),
            "only below the pin root"
        );
    }

    #[test]
    fn refuses_a_writable_directory_in_the_tree_naming_it() {
        let t = Tmp::new("writable");
        let root = t.0.join("pins");
        open_as(&root, "starting", me()).unwrap();
        let links = root.join("layout-x/links");
        create_dir_as(&root, &links, "starting", me()).unwrap();
        fs::set_permissions(&links, fs::Permissions::from_mode(0o777)).unwrap();
        let e = open_as(&root, "starting", me()).unwrap_err().to_string();
        assert!(
            e.starts_with("starting: ")
                && e.contains(&format!(
                    "{} is writable by group or others",
                    links.display()
                ))
                && e.contains(&format!("owner uid {}, mode 0777", me()))
                && e.contains(&format!("rm -rf {}", root.display())),
            "{e}"
        );
        // The directories above the links were fine; creating them again is not.
        assert!(create_dir_as(&root, &links, "starting", me()).is_err());
        // Nothing was repaired.
        assert_eq!(mode_of(&links), 0o777);
    }

    #[test]
    fn never_follows_a_symbolic_link() {
        let t = Tmp::new("symlink");
        let target = t.0.join("target");
        fs::create_dir(&target).unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o700)).unwrap();
        // As the pin root.
        let root = t.0.join("pins");
        std::os::unix::fs::symlink(&target, &root).unwrap();
        let e = open_as(&root, "starting", me()).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert!(check_existing(&root, "detaching").is_err());
        // Above it.
        let e = open_as(&root.join("below"), "starting", me())
            .unwrap_err()
            .to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert!(!target.join("below").exists(), "created through a link");
        // Inside the tree.
        fs::remove_file(&root).unwrap();
        open_as(&root, "starting", me()).unwrap();
        std::os::unix::fs::symlink(&target, root.join("layout-x")).unwrap();
        let e = open_as(&root, "starting", me()).unwrap_err().to_string();
        assert!(e.contains("layout-x is a symbolic link"), "{e}");
        assert!(create_dir_as(&root, &root.join("layout-x/links"), "starting", me()).is_err());
        assert!(!target.join("links").exists(), "created through a link");
    }

    #[test]
    fn an_ancestor_must_be_sticky_if_others_may_write_it() {
        let t = Tmp::new("ancestor");
        let above = t.0.join("open");
        fs::create_dir(&above).unwrap();
        fs::set_permissions(&above, fs::Permissions::from_mode(0o777)).unwrap();
        let e = open_as(&above.join("pins"), "starting", me())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("writable by group or others and not sticky")
                && e.contains("choose another --pin-root"),
            "{e}"
        );
        assert!(!above.join("pins").exists());
        fs::set_permissions(&above, fs::Permissions::from_mode(0o1777)).unwrap();
        open_as(&above.join("pins"), "starting", me()).unwrap();
    }

    #[test]
    fn checking_creates_nothing() {
        let t = Tmp::new("exists");
        let root = t.0.join("a/pins");
        let w = Walk {
            owner: me(),
            ..walk(&root, "detaching")
        };
        assert!(!w.pin_root(false).unwrap());
        assert!(!t.0.join("a").exists());
        assert!(
            Walk {
                owner: me(),
                ..walk(&t.0.join("a/../pins"), "detaching")
            }
            .pin_root(false)
            .is_err()
        );
    }
}
