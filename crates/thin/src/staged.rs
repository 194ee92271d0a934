//! Text staged in a buffer and handed to a writer in ~64 KiB chunks: shared by the XML and
//! JSON writers, which format without an allocation per line.

use std::io::{self, Write};

/// Chunk size handed to the writer.
const WRITE_CHUNK: usize = 64 * 1024;

#[derive(Debug)]
pub(crate) struct Staged<W: Write> {
    pub out: W,
    pub buf: Vec<u8>,
}

impl<W: Write> Staged<W> {
    /// Stage for `out`; allocates the buffer once.
    pub fn new(out: W) -> Self {
        Staged {
            out,
            buf: Vec::with_capacity(WRITE_CHUNK + 512),
        }
    }

    /// Write out everything staged.
    pub fn drain(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.out.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Write out the staged text once a chunk is full.
    pub fn maybe_drain(&mut self) -> io::Result<()> {
        if self.buf.len() >= WRITE_CHUNK {
            self.drain()?;
        }
        Ok(())
    }

    /// Write out everything staged and return the writer.
    pub fn into_inner(mut self) -> io::Result<W> {
        self.drain()?;
        Ok(self.out)
    }
}
