//! The file sink: appends lines, rotates by size, reopens on request.
//!
//! Lines are gathered in a buffer and written with one `write` per batch (the
//! thread flushes when its queue is empty, or at 64 KiB), so a failed write
//! knows exactly how many lines it lost.
//!
//! Kept hand-written (issue 13, item 5): `file-rotate` either splits a write
//! across files at the byte limit (`ContentLimit::Bytes`) or lets a file grow
//! past it (`BytesSurpassed`); the rule here — whole lines only, a file never
//! over the limit unless one line is, `PATH.1`…`PATH.N` created 0640 — is what
//! the sink tests compare byte for byte. Reopening on SIGHUP after logrotate
//! moved the file, and knowing how many lines a failed write lost, are ours
//! either way.
use std::{
    ffi::OsString,
    fs::{File, OpenOptions, Permissions},
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{Sink, Warned};
use crate::error::Error;

/// The mode of a file the sink creates.
const MODE: u32 = 0o640;
const BUFFER: usize = 64 * 1024;
/// While the file cannot be opened, how often the sink tries again.
const RETRY: Duration = Duration::from_secs(1);

pub(super) struct FileSink {
    path: PathBuf,
    max_bytes: u64,
    backups: u32,
    file: Option<File>,
    last_open_attempt: Instant,
    /// The file's size, counting what is buffered.
    size: u64,
    buf: Vec<u8>,
    buffered_lines: u64,
    warned: Warned,
}

/// `path` with `.n` appended: `events.log.3`.
pub(super) fn backup(path: &Path, n: u32) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// Opens `path` for appending, creating it with mode 0640 (whatever the
/// umask) if it does not exist. Returns the file and its size.
fn open(path: &Path) -> io::Result<(File, u64)> {
    match OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(MODE)
        .open(path)
    {
        Ok(f) => {
            f.set_permissions(Permissions::from_mode(MODE))?;
            Ok((f, 0))
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let f = OpenOptions::new().append(true).open(path)?;
            let size = f.metadata()?.len();
            Ok((f, size))
        }
        Err(e) => Err(e),
    }
}

impl FileSink {
    pub(super) fn open(path: PathBuf, max_bytes: u64, backups: u32) -> Result<FileSink, Error> {
        let (file, size) = open(&path).map_err(|source| Error::Io {
            context: format!("opening events file {}", path.display()),
            source,
        })?;
        Ok(FileSink {
            warned: Warned::new(format!("file {}", path.display())),
            path,
            max_bytes,
            backups,
            file: Some(file),
            last_open_attempt: Instant::now(),
            size,
            buf: Vec::with_capacity(BUFFER),
            buffered_lines: 0,
        })
    }

    fn try_open(&mut self) {
        self.last_open_attempt = Instant::now();
        match open(&self.path) {
            Ok((f, size)) => {
                self.file = Some(f);
                self.size = size;
                self.warned.ok();
            }
            Err(e) => {
                self.file = None;
                self.warned.fail(&format_args!("opening it: {e}"));
            }
        }
    }

    /// `path` → `path.1` → … → `path.<backups>`; the oldest is overwritten by
    /// the one before it. Then a new, empty `path`.
    fn rotate(&mut self) {
        let result = (|| {
            if self.backups == 0 {
                return std::fs::remove_file(&self.path);
            }
            for n in (1..self.backups).rev() {
                match std::fs::rename(backup(&self.path, n), backup(&self.path, n + 1)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            std::fs::rename(&self.path, backup(&self.path, 1))
        })();
        match result {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                // Keep writing to the file we have rather than lose lines.
                self.warned.fail(&format_args!("rotating it: {e}"));
            }
            _ => self.try_open(),
        }
    }
}

impl Sink for FileSink {
    fn push(&mut self, line: &str) -> u64 {
        let mut lost = 0;
        if self.file.is_none() {
            if self.last_open_attempt.elapsed() < RETRY {
                return 1;
            }
            self.try_open();
            if self.file.is_none() {
                return 1;
            }
        }
        let len = line.len() as u64 + 1;
        if self.max_bytes > 0 && self.size > 0 && self.size + len > self.max_bytes {
            lost += self.flush();
            self.rotate();
            if self.file.is_none() {
                return lost + 1;
            }
        }
        self.buf.extend_from_slice(line.as_bytes());
        self.buf.push(b'\n');
        self.buffered_lines += 1;
        self.size += len;
        if self.buf.len() >= BUFFER {
            lost += self.flush();
        }
        lost
    }

    fn flush(&mut self) -> u64 {
        if self.buf.is_empty() {
            return 0;
        }
        let lines = std::mem::take(&mut self.buffered_lines);
        let result = match &mut self.file {
            Some(f) => f.write_all(&self.buf),
            None => Err(io::Error::from(io::ErrorKind::NotConnected)),
        };
        self.buf.clear();
        match result {
            Ok(()) => {
                self.warned.ok();
                0
            }
            Err(e) => {
                self.warned.fail(&format_args!("writing: {e}"));
                // Part of the batch may be in the file; count it all as lost
                // (an over-count, never an under-count) and learn the real size.
                if let Some(size) = self.file.as_ref().and_then(|f| f.metadata().ok()) {
                    self.size = size.len();
                }
                lines
            }
        }
    }

    fn reopen(&mut self) -> u64 {
        // What is buffered belongs to the old file; what cannot be written
        // there is counted like any other loss of this sink.
        let lost = self.flush();
        if lost > 0 {
            log::warn!(
                "event sink file {}: {lost} records lost before reopening",
                self.path.display()
            );
        }
        self.try_open();
        lost
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;
    use crate::sinks::tests::tempdir;

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap_or_default()
    }

    fn line(i: usize) -> String {
        // 9 bytes + newline = 10 bytes a line.
        format!("line-{i:04}")
    }

    #[test]
    fn appends_and_creates_0640() {
        let dir = tempdir();
        let path = dir.join("events.log");
        std::fs::write(&path, "old\n").unwrap();
        std::fs::remove_file(&path).unwrap();
        let mut s = FileSink::open(path.clone(), 0, 3).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().mode() & 0o777,
            0o640,
            "new file mode"
        );
        assert_eq!(s.push("a"), 0);
        assert_eq!(s.push("b"), 0);
        assert_eq!(read(&path), "", "buffered until flush");
        assert_eq!(s.flush(), 0);
        assert_eq!(read(&path), "a\nb\n");
        drop(s);
        // An existing file is appended to, its size counted.
        let mut s = FileSink::open(path.clone(), 0, 3).unwrap();
        assert_eq!(s.size, 4);
        s.push("c");
        s.flush();
        assert_eq!(read(&path), "a\nb\nc\n");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rotates_by_size_keeping_n_backups() {
        let dir = tempdir();
        let path = dir.join("events.log");
        // 35 bytes: three 10-byte lines fit, the fourth rotates.
        let mut s = FileSink::open(path.clone(), 35, 2).unwrap();
        for i in 0..10 {
            assert_eq!(s.push(&line(i)), 0);
        }
        assert_eq!(s.flush(), 0);
        // Lines 0-2, 3-5, 6-8 were full files; 9 is in the current one.
        assert_eq!(read(&path), "line-0009\n");
        assert_eq!(read(&backup(&path, 1)), "line-0006\nline-0007\nline-0008\n");
        assert_eq!(read(&backup(&path, 2)), "line-0003\nline-0004\nline-0005\n");
        assert!(!backup(&path, 3).exists(), "only 2 backups");
        for p in [path.clone(), backup(&path, 1), backup(&path, 2)] {
            assert!(
                std::fs::metadata(&p).unwrap().len() <= 35,
                "{}",
                p.display()
            );
        }
        assert_eq!(
            std::fs::metadata(&path).unwrap().mode() & 0o777,
            0o640,
            "rotated-in file mode"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn exact_fit_does_not_rotate_and_oversize_lines_get_their_own_file() {
        let dir = tempdir();
        let path = dir.join("events.log");
        let mut s = FileSink::open(path.clone(), 20, 1).unwrap();
        s.push(&line(0));
        s.push(&line(1)); // exactly 20 bytes
        s.flush();
        assert_eq!(read(&path), "line-0000\nline-0001\n");
        assert!(!backup(&path, 1).exists());
        let long = "x".repeat(50);
        s.push(&long);
        s.push(&line(2));
        s.flush();
        assert_eq!(read(&backup(&path, 1)), format!("{long}\n"));
        assert_eq!(read(&path), "line-0002\n");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn zero_backups_starts_the_file_anew() {
        let dir = tempdir();
        let path = dir.join("events.log");
        let mut s = FileSink::open(path.clone(), 25, 0).unwrap();
        for i in 0..5 {
            s.push(&line(i));
        }
        s.flush();
        assert_eq!(read(&path), "line-0004\n");
        assert!(!backup(&path, 1).exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn reopen_follows_logrotate() {
        let dir = tempdir();
        let path = dir.join("events.log");
        let mut s = FileSink::open(path.clone(), 0, 0).unwrap();
        s.push("before");
        // logrotate moves the file, then signals; a line buffered before the
        // signal goes to the old file.
        std::fs::rename(&path, dir.join("events.log.rotated")).unwrap();
        s.reopen();
        s.push("after");
        s.flush();
        assert_eq!(read(&dir.join("events.log.rotated")), "before\n");
        assert_eq!(read(&path), "after\n");
        assert_eq!(
            std::fs::metadata(&path).unwrap().mode() & 0o777,
            0o640,
            "reopened file mode"
        );
        // Reopening an existing file appends, and counts its size for rotation.
        s.reopen();
        assert_eq!(s.size, 6);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn through_the_fanout_with_reopen() {
        use crate::sinks::{Fanout, SinkConfig};
        let dir = tempdir();
        let path = dir.join("events.log");
        let fanout = Fanout::new(
            vec![SinkConfig::File {
                path: path.clone(),
                max_bytes: 1000,
                backups: 3,
            }],
            10_000,
        )
        .unwrap();
        for i in 0..250 {
            fanout.send(&line(i));
        }
        assert!(fanout.flush(Duration::from_secs(10)));
        assert_eq!(fanout.take_dropped(), []);
        // 250 lines of 10 bytes, 100 a file: 2 full backups and 50 lines.
        assert_eq!(read(&path).lines().count(), 50);
        assert_eq!(read(&backup(&path, 1)).lines().count(), 100);
        assert_eq!(read(&backup(&path, 2)).lines().count(), 100);
        assert!(!backup(&path, 3).exists());
        std::fs::rename(&path, dir.join("moved")).unwrap();
        fanout.reopen();
        // The thread notices the request before its next line at the latest.
        fanout.send("after reopen");
        fanout.flush_and_close();
        assert_eq!(read(&path), "after reopen\n");
        assert_eq!(read(&dir.join("moved")).lines().count(), 50);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_unwritable_file_counts_its_lines_lost() {
        let dir = tempdir();
        let path = dir.join("events.log");
        let mut s = FileSink::open(path.clone(), 0, 0).unwrap();
        // Swap the file for one opened read-only: every write fails.
        s.file = Some(File::open(&path).unwrap());
        s.push("a");
        s.push("b");
        s.push("c");
        assert_eq!(s.flush(), 3);
        assert_eq!(s.flush(), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
