//! The stdout sink: lines are buffered (like a `BufWriter`, but owned here so
//! that a failed write knows how many lines it lost) and written out when the
//! sink's queue is empty or the buffer holds 64 KiB.
use std::io::{self, Write as _};

use super::{Sink, Warned};

const BUFFER: usize = 64 * 1024;

pub(super) struct StdoutSink {
    buf: Vec<u8>,
    lines: u64,
    warned: Warned,
}

impl StdoutSink {
    pub(super) fn new() -> StdoutSink {
        StdoutSink {
            buf: Vec::with_capacity(BUFFER),
            lines: 0,
            warned: Warned::new("stdout".to_owned()),
        }
    }
}

impl Sink for StdoutSink {
    fn push(&mut self, line: &str) -> u64 {
        self.buf.extend_from_slice(line.as_bytes());
        self.buf.push(b'\n');
        self.lines += 1;
        if self.buf.len() >= BUFFER {
            self.flush()
        } else {
            0
        }
    }

    fn flush(&mut self) -> u64 {
        if self.buf.is_empty() {
            return 0;
        }
        let lines = std::mem::take(&mut self.lines);
        let mut out = io::stdout().lock();
        // Every buffered line ends with a newline: stdout's line buffering
        // passes the batch straight through.
        let result = out.write_all(&self.buf).and_then(|()| out.flush());
        self.buf.clear();
        match result {
            Ok(()) => {
                self.warned.ok();
                0
            }
            Err(e) => {
                // EPIPE (the reader went away) and the like.
                self.warned.fail(&e);
                lines
            }
        }
    }
}
