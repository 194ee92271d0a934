//! The transmission phase: several workers per connection take turns reading a request
//! (header and payload) and then serve it and write the reply on their own, so many requests
//! are in flight and replies go out in the order they finish. The reply is one `writev` under
//! the writer lock. A small reply (up to [`COMBINE_MAX`] bytes) that finds the lock taken is
//! not waited for: it is queued, and the worker holding the lock sends the queue after its own
//! reply, in one write. Replies of a busy connection thus go out in batches, and no worker
//! sleeps on the lock (a futex wait and wake, two context switches) for a 16-byte reply.
//!
//! Who reads next: the worker that read a request hands the reader role to a parked worker
//! only when more input is already waiting; otherwise it serves the request itself and reads
//! again. A client with one request in flight is thus served by one thread with no handoff (a
//! futex wake and two context switches saved per request), and a client that pipelines gets
//! the parallel workers. While a worker serves such a request, the role is free for the taking
//! ("inline"): any worker that finishes its own request takes it, so a burst arriving
//! meanwhile is not left waiting.
//!
//! When requests are served fast (an average under [`FAST_SERVICE`], as from the page cache)
//! and another worker is busy serving, the reader does not wake a parked worker either: the
//! busy one takes the role within microseconds, and on two cores a third running thread only
//! adds context switches and lock contention (with 4 KiB random writes at 32 in flight: 5
//! times fewer context switches, 30 % more writes per second). Slow requests (a disk read,
//! a flush) raise the average, and the parked workers are woken again to keep many of them in
//! flight.
//!
//! Workers are started on demand: a connection begins with its own thread only, and a reader
//! that hands the role on with nobody parked to take it starts one more worker, up to
//! [`WORKERS`]. A client with one request in flight (or an idle one) thus costs one thread
//! instead of 16; one that pipelines grows its workers in its first few requests and keeps
//! them until it leaves, so the steady state is the same as with all of them started at once.
//! [`MAX_EXTRA_WORKERS`] bounds the workers of all connections together.
//!
//! Memory is bounded however a client behaves. A request's data (a write's payload, a read's
//! buffer) is counted in flight from before it is read or made until its reply has been
//! written: at most [`CONN_BYTES`] per connection and [`GLOBAL_BYTES`] over all of them. The
//! worker holding the reader role waits for room before it reads a payload or hands the role
//! on, so past the bound the connection's socket is simply not read: a client that pipelines
//! without reading its replies fills the kernel's socket buffers, then its own writes block,
//! and what it pins here is at most [`WORKERS`] requests of at most [`CONN_BYTES`] together.
//! Room comes back as replies go out (nothing waits on a reader that is itself waiting, so
//! this cannot deadlock). Between requests a worker keeps a buffer of at most [`KEEP_BUF`]
//! (the sizes clients use most); a larger one is freed with its request.
//!
//! ```text
//!  socket ─▶ reader role: header ─▶ take room (conn, then global) ─▶ payload ─▶ hand role on
//!                                        ▲ waits here: socket unread         │
//!                                        └──── room given back ◀── reply sent ◀─ serve
//! ```

use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thinpool_engine::{ErrorKind, Volume};

use crate::handshake::Session;
use crate::proto::*;
use crate::sock::Sock;

/// Requests served at once per connection.
pub(crate) const WORKERS: usize = 16;

/// Workers started besides the connections' own threads, over all connections at once. Past
/// it a connection serves with the workers it has. It bounds the threads whatever the
/// connection limit: each thread takes about four memory maps (stack, signal stack, their
/// guard pages) of the 65 530 Linux gives a process by default, and a thread that cannot get
/// its signal stack aborts the process.
pub(crate) const MAX_EXTRA_WORKERS: usize = 4096;

/// Bytes of request data in flight per connection (see the module docs). Twice a request of
/// [`MAX_PAYLOAD`], so that the largest requests still overlap.
pub(crate) const CONN_BYTES: u64 = 2 * MAX_PAYLOAD as u64;

/// Bytes of request data in flight over all connections (see the module docs).
pub(crate) const GLOBAL_BYTES: u64 = 1 << 30;

/// The largest buffer a worker keeps between requests.
const KEEP_BUF: usize = 1 << 20;

/// Average service time under which a reader leaves the role to a busy worker instead of
/// waking a parked one (see the module docs).
const FAST_SERVICE: Duration = Duration::from_micros(50);

/// The largest reply that is queued for the writer-lock holder to send instead of waiting
/// for the lock (a 64 KiB read's reply with its chunk header fits). Larger ones wait: copying
/// them costs more than the wait.
const COMBINE_MAX: usize = (64 << 10) + 64;

/// Bytes of replies queued per connection at most; a reply that does not fit waits for the
/// lock. A queued reply's request has given its room back (see the module docs), so without
/// this a client that does not read its replies would pile them up here: with it, the workers
/// block on the lock holding their room, as before queuing.
const QUEUE_MAX: usize = 256 << 10;

/// Bytes in flight under a bound: taken before a request's data is read or made, given back
/// (by dropping the [`Room`]) once its reply is written.
pub(crate) struct Budget {
    cap: u64,
    state: Mutex<BudgetState>,
    freed: Condvar,
}

#[derive(Default)]
struct BudgetState {
    used: u64,
    /// Takers waiting for room (the giver wakes them only if there are any: a wake costs a
    /// system call on every request otherwise).
    waiting: usize,
}

impl Budget {
    pub fn new(cap: u64) -> Budget {
        Budget {
            cap,
            state: Mutex::new(BudgetState::default()),
            freed: Condvar::new(),
        }
    }

    /// Take `n` bytes, blocking while they do not fit. A taker asking for more than the whole
    /// bound gets it once nothing else is held, so any request is served eventually.
    fn take(&self, n: u64) -> Room<'_> {
        if n == 0 {
            return Room { budget: self, n };
        }
        let Ok(mut s) = self.state.lock() else {
            // A poisoned lock: a worker panicked. Serve on without the bound rather than stop.
            return Room { budget: self, n: 0 };
        };
        while s.used > 0 && s.used + n > self.cap {
            s.waiting += 1;
            s = match self.freed.wait(s) {
                Ok(s) => s,
                Err(_) => return Room { budget: self, n: 0 },
            };
            s.waiting -= 1;
        }
        s.used += n;
        Room { budget: self, n }
    }

    /// Bytes held now.
    #[cfg(test)]
    fn used(&self) -> u64 {
        self.state.lock().map(|s| s.used).unwrap_or(0)
    }
}

/// Room taken in a [`Budget`], given back when dropped.
struct Room<'a> {
    budget: &'a Budget,
    n: u64,
}

impl Drop for Room<'_> {
    fn drop(&mut self) {
        if self.n == 0 {
            return;
        }
        if let Ok(mut s) = self.budget.state.lock() {
            s.used -= self.n;
            if s.waiting > 0 {
                self.budget.freed.notify_all();
            }
        }
    }
}

/// The room a request holds in its connection's budget and in the global one.
struct InFlight<'a> {
    _conn: Room<'a>,
    _global: Room<'a>,
}

/// A place among the [`MAX_EXTRA_WORKERS`], given back when its worker ends.
struct Extra(Arc<AtomicUsize>);

impl Extra {
    fn take(budget: &Arc<AtomicUsize>) -> Option<Extra> {
        budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_EXTRA_WORKERS).then_some(n + 1)
            })
            .ok()
            .map(|_| Extra(budget.clone()))
    }
}

impl Drop for Extra {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The reader role (see the module docs).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Nobody reads: the next parked worker takes it.
    Free,
    /// A worker is reading.
    Reading,
    /// The last reader serves its request without having handed the role on: free for any
    /// worker that finishes, but nobody is woken for it.
    Inline,
}

/// Who reads, and how many workers there are to take turns.
struct Turn {
    role: Role,
    /// Workers waiting for the role.
    parked: usize,
    /// Workers started (the connection's own thread included).
    workers: usize,
}

/// One connection in transmission.
pub(crate) struct Conn {
    reader: Mutex<BufReader<Sock>>,
    turn: Mutex<Turn>,
    parked: Condvar,
    /// The workers started besides the connection's own thread, joined when it ends.
    started: Mutex<Vec<JoinHandle<()>>>,
    /// Extra workers running over all connections (see [`MAX_EXTRA_WORKERS`]).
    extra: Arc<AtomicUsize>,
    /// Request data in flight on this connection ([`CONN_BYTES`]).
    in_flight: Budget,
    /// Request data in flight over all connections ([`GLOBAL_BYTES`]).
    global: Arc<Budget>,
    writer: Mutex<Sock>,
    /// Replies waiting for the worker that holds `writer` to send them (see the module docs).
    queued: Mutex<Vec<u8>>,
    /// Average time to serve a request, in nanoseconds (moving, over about the last eight).
    service_ns: AtomicU64,
    /// Set when the client disconnected or broke the protocol: no more requests are read.
    done: AtomicBool,
    session: Session,
    rules: ExportRules,
    id: u64,
}

impl Conn {
    pub fn new(
        sock: Sock,
        session: Session,
        id: u64,
        extra: Arc<AtomicUsize>,
        global: Arc<Budget>,
    ) -> io::Result<Conn> {
        let writer = sock.try_clone()?;
        let rules = ExportRules {
            size: session.volume.size(),
            read_only: session.read_only,
            structured: session.structured,
            base_allocation: session.base_allocation,
        };
        Ok(Conn {
            reader: Mutex::new(BufReader::with_capacity(64 << 10, sock)),
            turn: Mutex::new(Turn {
                role: Role::Free,
                parked: 0,
                workers: 1,
            }),
            parked: Condvar::new(),
            started: Mutex::new(Vec::new()),
            extra,
            in_flight: Budget::new(CONN_BYTES),
            global,
            writer: Mutex::new(writer),
            queued: Mutex::new(Vec::new()),
            service_ns: AtomicU64::new(0),
            done: AtomicBool::new(false),
            session,
            rules,
            id,
        })
    }

    /// Serve requests until the client leaves. Runs on every worker thread of the connection.
    pub fn serve(self: &Arc<Self>) {
        let mut buf: Vec<u8> = Vec::new();
        while let Some((req, room)) = self.next_request(&mut buf) {
            let start = Instant::now();
            let r = self.handle(&req, &mut buf);
            drop(room);
            // Updates from several workers may overwrite each other: an estimate is enough.
            let took = start.elapsed().as_nanos().min(u64::MAX as u128) as u64;
            let avg = self.service_ns.load(Ordering::Relaxed);
            self.service_ns
                .store(avg - avg / 8 + took / 8, Ordering::Relaxed);
            if buf.capacity() > KEEP_BUF {
                buf = Vec::new();
            }
            if let Err(e) = r {
                tracing::debug!(conn = self.id, "writing a reply failed: {e}");
                self.stop();
                break;
            }
        }
    }

    /// Wait for the workers started for this connection (after [`Conn::serve`] returned on
    /// the connection's own thread). A worker may start one more while leaving: loop until
    /// none is left.
    pub fn join_workers(&self) {
        loop {
            let started = match self.started.lock() {
                Ok(mut s) => std::mem::take(&mut *s),
                Err(_) => return,
            };
            if started.is_empty() {
                return;
            }
            for w in started {
                let _ = w.join();
            }
        }
    }

    /// Start one more worker (the caller counted it in `Turn::workers` and took its place).
    fn add_worker(self: &Arc<Self>, n: usize, place: Extra) {
        let c = self.clone();
        match std::thread::Builder::new()
            .name(format!("nbd-{}-{n}", self.id))
            .spawn(move || {
                let _place = place;
                c.serve()
            }) {
            Ok(h) => {
                if let Ok(mut s) = self.started.lock() {
                    s.push(h);
                }
            }
            Err(e) => {
                // Fewer requests in parallel, nothing else: the workers there are go on.
                tracing::debug!(conn = self.id, "cannot start a worker: {e}");
                if let Ok(mut t) = self.turn.lock() {
                    t.workers -= 1;
                }
            }
        }
    }

    fn stop(&self) {
        self.finish();
        if let Ok(w) = self.writer.lock() {
            w.shutdown(Shutdown::Read);
        }
    }

    /// No more requests will be read: every worker leaves once its request is answered.
    fn finish(&self) {
        self.done.store(true, Ordering::SeqCst);
        if let Ok(mut t) = self.turn.lock() {
            t.role = Role::Free;
        }
        self.parked.notify_all();
    }

    /// Read the next request (and a write's payload into `buf`) with the room its data holds
    /// until it is answered, or `None` when the connection is over.
    fn next_request(self: &Arc<Self>, buf: &mut Vec<u8>) -> Option<(Request, InFlight<'_>)> {
        {
            let mut t = self.turn.lock().ok()?;
            while t.role == Role::Reading && !self.done.load(Ordering::SeqCst) {
                t.parked += 1;
                t = self.parked.wait(t).ok()?;
                t.parked -= 1;
            }
            if self.done.load(Ordering::SeqCst) {
                return None;
            }
            t.role = Role::Reading;
        }
        let r = self.read_request(buf);
        if r.is_none() {
            self.finish();
            return None;
        }
        let more = {
            let reader = self.reader.lock().ok()?;
            !reader.buffer().is_empty() || reader.get_ref().readable_now()
        };
        let mut t = self.turn.lock().ok()?;
        if more {
            t.role = Role::Free;
            let place = if t.parked == 0 && t.workers < WORKERS {
                Extra::take(&self.extra)
            } else {
                None
            };
            let start = place.map(|p| {
                t.workers += 1;
                (t.workers, p)
            });
            // Another worker serving a fast request takes the role when it is done; with
            // nobody parked, the first to finish does: a wake would be a system call for
            // nothing.
            let busy = t.workers - t.parked > 1;
            let fast = self.service_ns.load(Ordering::Relaxed) < FAST_SERVICE.as_nanos() as u64;
            let wake = t.parked > 0 && !(busy && fast);
            drop(t);
            match start {
                Some((n, p)) => self.add_worker(n, p),
                None if wake => self.parked.notify_one(),
                None => {}
            }
        } else {
            t.role = Role::Inline;
        }
        r
    }

    /// Read one request; only the worker holding the reader role calls this. It waits for
    /// room for the request's data before reading a payload (see the module docs).
    fn read_request(&self, buf: &mut Vec<u8>) -> Option<(Request, InFlight<'_>)> {
        let mut r = self.reader.lock().ok()?;
        let mut h = [0u8; REQUEST_LEN];
        if let Err(e) = r.read_exact(&mut h) {
            if e.kind() != io::ErrorKind::UnexpectedEof {
                tracing::debug!(conn = self.id, "reading a request: {e}");
            }
            return None;
        }
        let req = match Request::parse(&h) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(conn = self.id, "{e}: closing the connection");
                return None;
            }
        };
        if req.kind == CMD_DISC {
            return None;
        }
        // A read past MAX_PAYLOAD is refused without a buffer; a write past it closes below.
        let data = if req.has_payload() || (req.kind == CMD_READ && req.length <= MAX_PAYLOAD) {
            u64::from(req.length.min(MAX_PAYLOAD))
        } else {
            0
        };
        let room = InFlight {
            _conn: self.in_flight.take(data),
            _global: self.global.take(data),
        };
        if req.has_payload() {
            if req.length > MAX_PAYLOAD {
                // The payload cannot be skipped safely at this size: the protocol lets us close.
                tracing::warn!(
                    conn = self.id,
                    length = req.length,
                    "write larger than {MAX_PAYLOAD} bytes: closing the connection"
                );
                return None;
            }
            buf.resize(req.length as usize, 0);
            if let Err(e) = r.read_exact(buf) {
                tracing::debug!(conn = self.id, "client left in the middle of a write: {e}");
                return None;
            }
        }
        Some((req, room))
    }

    fn handle(&self, req: &Request, buf: &mut Vec<u8>) -> io::Result<()> {
        let cmd = match classify(req, &self.rules) {
            Ok(c) => c,
            Err(errno) => return self.error(req, errno, "request refused by the protocol's rules"),
        };
        let vol = &self.session.volume;
        let r = match cmd {
            Command::Read { df } => return self.read(req, df, buf),
            Command::BlockStatus { req_one } => return self.block_status(req, req_one),
            Command::Write { fua } => {
                let data = &buf[..req.length as usize];
                if fua {
                    vol.write_fua(data, req.offset)
                } else {
                    vol.write_at(data, req.offset)
                }
            }
            Command::Flush => vol.flush(),
            Command::Trim { fua } => vol
                .discard(req.offset, u64::from(req.length))
                .and_then(|_| if fua { vol.flush() } else { Ok(()) }),
            Command::WriteZeroes { fua, no_hole, fast } => {
                if no_hole && fast {
                    // Allocating zeros means writing them: not fast.
                    return self.error(req, Errno::NotSup, "allocated zeroing is not fast here");
                }
                let r = if no_hole {
                    write_allocated_zeroes(vol, req.offset, u64::from(req.length))
                } else {
                    vol.write_zeroes(req.offset, u64::from(req.length))
                };
                r.and_then(|_| if fua { vol.flush() } else { Ok(()) })
            }
            Command::Cache => Ok(()),
            Command::Disconnect => Ok(()),
        };
        match r {
            Ok(()) => self.send(&mut [IoSlice::new(&simple_reply(req.cookie, 0))]),
            Err(e) => self.engine_error(req, &e),
        }
    }

    fn engine_error(&self, req: &Request, e: &thinpool_engine::Error) -> io::Result<()> {
        let errno = match e.kind() {
            ErrorKind::NoSpace => Errno::NoSpc,
            // A pool made read-only or failed by a metadata failure: EIO, as the kernel answers
            // (writes to a read-only export were refused with EPERM before reaching here).
            ErrorKind::ReadOnly => Errno::Io,
            ErrorKind::InvalidArgument => Errno::Inval,
            _ => Errno::Io,
        };
        tracing::warn!(
            conn = self.id,
            volume = self.session.volume.name(),
            kind = req.kind,
            offset = req.offset,
            length = req.length,
            "request failed: {e}"
        );
        self.error(req, errno, &e.to_string())
    }

    fn error(&self, req: &Request, errno: Errno, msg: &str) -> io::Result<()> {
        if self.session.structured && matches!(req.kind, CMD_READ | CMD_BLOCK_STATUS) {
            let payload = error_chunk(errno, msg);
            let h = chunk_header(
                req.cookie,
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                payload.len() as u32,
            );
            self.send(&mut [IoSlice::new(&h), IoSlice::new(&payload)])
        } else {
            self.send(&mut [IoSlice::new(&simple_reply(req.cookie, errno as u32))])
        }
    }

    /// Send one reply (see the module docs for small replies that find the lock taken).
    fn send(&self, bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        let poisoned = || io::Error::other("writer lock poisoned");
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        let mut w = if len <= COMBINE_MAX {
            match self.writer.try_lock() {
                Ok(w) => w,
                Err(TryLockError::WouldBlock) => {
                    let mut q = self.queued.lock().map_err(|_| poisoned())?;
                    if q.len() + len > QUEUE_MAX {
                        drop(q);
                        self.writer.lock().map_err(|_| poisoned())?
                    } else {
                        for b in bufs.iter() {
                            q.extend_from_slice(b);
                        }
                        drop(q);
                        // The holder sends the queue before it lets go, and looks again
                        // after: either it sees this reply, or the lock is free by now.
                        return match self.writer.try_lock() {
                            Ok(w) => self.send_queued(w),
                            Err(TryLockError::WouldBlock) => Ok(()),
                            Err(TryLockError::Poisoned(_)) => Err(poisoned()),
                        };
                    }
                }
                Err(TryLockError::Poisoned(_)) => return Err(poisoned()),
            }
        } else {
            self.writer.lock().map_err(|_| poisoned())?
        };
        w.write_all_vectored(bufs)?;
        self.send_queued(w)
    }

    /// Send the queued replies, holding the writer lock `w`; after letting it go, look once
    /// more (a reply queued while the lock was held, whose worker found it still taken).
    fn send_queued<'a>(&'a self, mut w: MutexGuard<'a, Sock>) -> io::Result<()> {
        let poisoned = || io::Error::other("writer lock poisoned");
        let mut batch = Vec::new();
        loop {
            std::mem::swap(
                &mut batch,
                &mut *self.queued.lock().map_err(|_| poisoned())?,
            );
            if !batch.is_empty() {
                w.write_all(&batch)?;
                batch.clear();
                continue;
            }
            drop(w);
            if self.queued.lock().map_err(|_| poisoned())?.is_empty() {
                return Ok(());
            }
            w = match self.writer.try_lock() {
                Ok(w) => w,
                // Its holder sends it.
                Err(TryLockError::WouldBlock) => return Ok(()),
                Err(TryLockError::Poisoned(_)) => return Err(poisoned()),
            };
        }
    }

    fn read(&self, req: &Request, df: bool, buf: &mut Vec<u8>) -> io::Result<()> {
        let len = req.length as usize;
        buf.resize(len, 0);
        let holes = match self.session.volume.read_sparse(buf, req.offset) {
            Ok(h) => h,
            Err(e) => return self.engine_error(req, &e),
        };
        if !self.session.structured {
            let h = simple_reply(req.cookie, 0);
            return self.send(&mut [IoSlice::new(&h), IoSlice::new(buf)]);
        }
        if len == 0 {
            // A chunk must describe at least one byte: answer with an empty final chunk.
            let h = chunk_header(req.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
            return self.send(&mut [IoSlice::new(&h)]);
        }
        if df || holes.is_empty() {
            let h = chunk_header(
                req.cookie,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                8 + req.length,
            );
            let off = req.offset.to_be_bytes();
            return self.send(&mut [IoSlice::new(&h), IoSlice::new(&off), IoSlice::new(buf)]);
        }
        // Data and hole chunks in order; the last one carries DONE.
        let mut segs: Vec<(usize, usize, bool)> = Vec::with_capacity(2 * holes.len() + 1);
        let mut pos = 0;
        for &(s, l) in &holes {
            if s > pos {
                segs.push((pos, s - pos, false));
            }
            segs.push((s, l, true));
            pos = s + l;
        }
        if pos < len {
            segs.push((pos, len - pos, false));
        }
        let mut heads: Vec<[u8; 32]> = Vec::with_capacity(segs.len());
        for (i, &(s, l, hole)) in segs.iter().enumerate() {
            let flags = if i + 1 == segs.len() {
                REPLY_FLAG_DONE
            } else {
                0
            };
            let mut h = [0u8; 32];
            let off = (req.offset + s as u64).to_be_bytes();
            if hole {
                h[..20].copy_from_slice(&chunk_header(
                    req.cookie,
                    flags,
                    REPLY_TYPE_OFFSET_HOLE,
                    12,
                ));
                h[20..28].copy_from_slice(&off);
                h[28..32].copy_from_slice(&(l as u32).to_be_bytes());
            } else {
                h[..20].copy_from_slice(&chunk_header(
                    req.cookie,
                    flags,
                    REPLY_TYPE_OFFSET_DATA,
                    8 + l as u32,
                ));
                h[20..28].copy_from_slice(&off);
            }
            heads.push(h);
        }
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(2 * segs.len());
        for (h, &(s, l, hole)) in heads.iter().zip(&segs) {
            if hole {
                slices.push(IoSlice::new(h));
            } else {
                slices.push(IoSlice::new(&h[..28]));
                slices.push(IoSlice::new(&buf[s..s + l]));
            }
        }
        self.send(&mut slices)
    }

    fn block_status(&self, req: &Request, req_one: bool) -> io::Result<()> {
        let vol = &self.session.volume;
        let end = req.offset + u64::from(req.length);
        let mapped = match vol.mapped_extents(req.offset, u64::from(req.length)) {
            Ok(m) => m,
            Err(e) => return self.engine_error(req, &e),
        };
        let mut desc: Vec<(u32, u32)> = Vec::with_capacity(2 * mapped.len() + 1);
        let mut pos = req.offset;
        for (o, l) in mapped {
            if o > pos {
                desc.push(((o - pos) as u32, STATE_HOLE | STATE_ZERO));
            }
            desc.push((l as u32, 0));
            pos = o + l;
        }
        if pos < end {
            desc.push(((end - pos) as u32, STATE_HOLE | STATE_ZERO));
        }
        if req_one {
            desc.truncate(1);
        }
        let payload = block_status_chunk(&desc);
        let h = chunk_header(
            req.cookie,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            payload.len() as u32,
        );
        self.send(&mut [IoSlice::new(&h), IoSlice::new(&payload)])
    }
}

/// Write zeros that stay allocated (`NBD_CMD_WRITE_ZEROES` with `NO_HOLE`).
fn write_allocated_zeroes(vol: &Volume, offset: u64, len: u64) -> thinpool_engine::Result<()> {
    let zeros = vec![0u8; (1 << 20).min(len as usize)];
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let n = (end - pos).min(zeros.len() as u64) as usize;
        vol.write_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn budget_waits_for_room_and_lets_an_oversized_taker_through_alone() {
        let b = Arc::new(Budget::new(100));
        let first = b.take(60);
        let (tx, rx) = mpsc::channel();
        let b2 = b.clone();
        let t = std::thread::spawn(move || {
            let r = b2.take(60);
            tx.send(()).unwrap();
            drop(r);
            // Past the bound: taken once nothing else is held.
            let big = b2.take(500);
            assert_eq!(b2.used(), 500);
            drop(big);
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "60 + 60 bytes fit under a bound of 100"
        );
        assert_eq!(b.used(), 60);
        drop(first);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the taker was not woken when room came back");
        t.join().unwrap();
        assert_eq!(b.used(), 0);
        // Nothing to take: no waiting even when full.
        let _full = b.take(100);
        let none = b.take(0);
        assert_eq!(none.n, 0);
    }
}
