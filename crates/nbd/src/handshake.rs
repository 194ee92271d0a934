//! The fixed-newstyle handshake: greeting, client flags, then options until the client picks
//! an export (`NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME`) or leaves.

use std::io::{self, Read, Write};

use thinpool_engine::{ErrorKind, Volume, VolumeKind};

use crate::proto::*;
use crate::server::Shared;
use crate::sock::Sock;
use crate::tls::Identity;

/// What the client chose: the export and what was negotiated for transmission.
pub(crate) struct Session {
    pub volume: Volume,
    pub read_only: bool,
    pub structured: bool,
    pub base_allocation: bool,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// The client's TLS-PSK identity, if it proved one.
    pub identity: Option<String>,
}

/// How the handshake ended.
pub(crate) enum Outcome {
    /// Go on to transmission on this socket (the plaintext end if TLS was started).
    Transmit(Sock, Session),
    /// The client left (ABORT, EOF) or was refused.
    Closed,
}

/// Options negotiated so far (reset by STARTTLS).
#[derive(Default)]
struct State {
    structured: bool,
    /// Export name the meta context was set for, if any.
    meta_for: Option<String>,
    no_zeroes: bool,
}

fn send_reply(s: &mut Sock, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let h = option_reply(opt, kind, data.len() as u32);
    s.write_all_vectored(&mut [io::IoSlice::new(&h), io::IoSlice::new(data)])
}

fn send_error(s: &mut Sock, opt: u32, kind: u32, msg: &str) -> io::Result<()> {
    tracing::debug!(option = opt, "option refused: {msg}");
    send_reply(s, opt, kind, msg.as_bytes())
}

/// An export the client may open: a volume, read-only if asked for with `NAME@ro`, if the
/// server is read-only, or if it is a snapshot and the server keeps snapshots read-only.
struct Export {
    volume: Volume,
    name: String,
    read_only: bool,
    description: String,
}

/// The volumes a connection may see: all of them, or those its PSK identity is restricted to
/// ([`crate::NbdConfig::psk_exports`]).
enum Scope<'a> {
    All,
    Only {
        identity: &'a str,
        volumes: &'a [String],
    },
}

impl<'a> Scope<'a> {
    /// The scope of a connection: `identity` is `Some` once TLS-PSK was started on it.
    fn of(shared: &'a Shared, identity: Option<&'a Identity>) -> Scope<'a> {
        let Some(slot) = identity else {
            return Scope::All;
        };
        match slot.get() {
            Some(id) => match shared.psk_exports.get(id) {
                Some(volumes) => Scope::Only {
                    identity: id,
                    volumes,
                },
                None => Scope::All,
            },
            // The pump sets the identity before it relays a byte, so this cannot be; were it,
            // nothing is served rather than everything.
            None => Scope::Only {
                identity: "(unknown)",
                volumes: &[],
            },
        }
    }

    fn allows(&self, volume: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Only { volumes, .. } => volumes.iter().any(|v| v == volume),
        }
    }
}

/// Resolve an export name. An empty name picks the only volume in scope, if there is exactly
/// one. A name out of scope gets the same answer whether a volume has it or not.
fn resolve(shared: &Shared, requested: &str, scope: &Scope) -> Result<Export, (u32, String)> {
    let (name, ro_asked) = match requested.strip_suffix("@ro") {
        Some(n) => (n.to_string(), true),
        None => (requested.to_string(), false),
    };
    let name = if name.is_empty() {
        let mut vols = shared
            .pool
            .volumes()
            .map_err(|e| (REP_ERR_UNKNOWN, e.to_string()))?;
        vols.retain(|v| scope.allows(&v.name));
        match vols.as_slice() {
            [one] => one.name.clone(),
            [] => return Err((REP_ERR_UNKNOWN, "the pool has no volumes".into())),
            _ => {
                return Err((
                    REP_ERR_UNKNOWN,
                    "no default export: name one of the volumes (NBD_OPT_LIST lists them)".into(),
                ));
            }
        }
    } else {
        name
    };
    if let Scope::Only { identity, .. } = scope
        && !scope.allows(&name)
    {
        return Err((
            REP_ERR_UNKNOWN,
            format!("export {requested:?} is not among the volumes of PSK identity {identity}"),
        ));
    }
    let info = shared.pool.volume_info(&name).map_err(|e| {
        let kind = if e.kind() == ErrorKind::NotFound {
            REP_ERR_UNKNOWN
        } else {
            REP_ERR_INVALID
        };
        (kind, format!("export {requested:?}: {e}"))
    })?;
    let volume = shared
        .pool
        .open_volume(&name)
        .map_err(|e| (REP_ERR_UNKNOWN, format!("export {requested:?}: {e}")))?;
    let snapshot = info.kind == VolumeKind::Snapshot;
    let read_only = ro_asked || shared.read_only || (snapshot && shared.snapshots_read_only);
    let description = match &info.parent {
        Some(p) => format!("thinpool snapshot of {p}"),
        None => "thinpool thin volume".to_string(),
    };
    Ok(Export {
        volume,
        name: if ro_asked { format!("{name}@ro") } else { name },
        read_only,
        description,
    })
}

impl Export {
    /// Transmission on this export, with what was negotiated for the name the client asked for.
    fn into_session(self, requested: &str, st: &State, identity: Option<&Identity>) -> Session {
        Session {
            identity: identity.and_then(|i| i.get().cloned()),
            flags: transmission_flags(self.read_only, st.structured),
            base_allocation: st.meta_for.as_deref() == Some(requested),
            volume: self.volume,
            read_only: self.read_only,
            structured: st.structured,
        }
    }
}

fn transmission_flags(read_only: bool, structured: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN;
    f |= TFLAG_SEND_CACHE;
    if structured {
        f |= TFLAG_SEND_DF;
    }
    if read_only {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    f
}

/// Run the handshake on a new connection. `tls_required`: options other than STARTTLS and
/// ABORT are refused until TLS is on.
pub(crate) fn negotiate(
    mut sock: Sock,
    shared: &Shared,
    tls_required: bool,
) -> io::Result<Outcome> {
    let mut greeting = [0u8; 18];
    greeting[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    greeting[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    sock.write_all(&greeting)?;
    let mut cf = [0u8; 4];
    sock.read_exact(&mut cf)?;
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        tracing::info!(client_flags, "client sent unknown handshake flags; closing");
        return Ok(Outcome::Closed);
    }
    let mut st = State {
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        ..State::default()
    };
    let mut tls_on = false;
    // The PSK identity, once TLS-PSK is started.
    let mut identity: Option<Identity> = None;
    loop {
        let mut h = [0u8; 16];
        sock.read_exact(&mut h)?;
        let mut m = [0u8; 8];
        m.copy_from_slice(&h[0..8]);
        if u64::from_be_bytes(m) != IHAVEOPT {
            tracing::info!("option without the IHAVEOPT magic; closing");
            return Ok(Outcome::Closed);
        }
        let opt = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        if len > MAX_OPTION {
            // Reading a huge option would only let a client make us buffer it.
            tracing::info!(
                option = opt,
                len,
                "option data over {MAX_OPTION} bytes; closing"
            );
            return Ok(Outcome::Closed);
        }
        let mut data = vec![0u8; len as usize];
        sock.read_exact(&mut data)?;

        if shared.is_stopping() {
            if opt != OPT_EXPORT_NAME {
                send_error(
                    &mut sock,
                    opt,
                    REP_ERR_SHUTDOWN,
                    "the server is shutting down",
                )?;
            }
            return Ok(Outcome::Closed);
        }
        if tls_required && !tls_on && opt != OPT_STARTTLS && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                return Ok(Outcome::Closed);
            }
            send_error(
                &mut sock,
                opt,
                REP_ERR_TLS_REQD,
                "this server requires TLS: send NBD_OPT_STARTTLS first",
            )?;
            continue;
        }
        match opt {
            OPT_ABORT => {
                // The client may already have closed; an error here does not matter.
                let _ = send_reply(&mut sock, opt, REP_ACK, &[]);
                return Ok(Outcome::Closed);
            }
            OPT_STARTTLS => {
                let Some(pump) = shared.tls.as_ref() else {
                    send_error(
                        &mut sock,
                        opt,
                        REP_ERR_UNSUP,
                        "TLS is not configured on this server",
                    )?;
                    continue;
                };
                if tls_on || !data.is_empty() {
                    send_error(
                        &mut sock,
                        opt,
                        REP_ERR_INVALID,
                        "TLS is already on, or STARTTLS carried data",
                    )?;
                    continue;
                }
                send_reply(&mut sock, opt, REP_ACK, &[])?;
                (sock, identity) = pump.start(sock)?;
                // The plaintext end gets the same deadline for the rest of the handshake.
                sock.set_read_timeout(Some(shared.handshake_timeout))?;
                tls_on = true;
                // Everything negotiated before TLS is forgotten (the protocol's rule).
                st.structured = false;
                st.meta_for = None;
            }
            OPT_LIST => {
                if !data.is_empty() {
                    send_error(
                        &mut sock,
                        opt,
                        REP_ERR_INVALID,
                        "NBD_OPT_LIST takes no data",
                    )?;
                    continue;
                }
                let scope = Scope::of(shared, identity.as_ref());
                match shared.pool.volumes() {
                    Ok(vols) => {
                        for v in vols.into_iter().filter(|v| scope.allows(&v.name)) {
                            let desc = match &v.parent {
                                Some(p) => format!("snapshot of {p}"),
                                None => "thin volume".to_string(),
                            };
                            send_reply(&mut sock, opt, REP_SERVER, &rep_server(&v.name, &desc))?;
                        }
                        send_reply(&mut sock, opt, REP_ACK, &[])?;
                    }
                    Err(e) => send_error(&mut sock, opt, REP_ERR_INVALID, &e.to_string())?,
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    send_error(
                        &mut sock,
                        opt,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )?;
                    continue;
                }
                st.structured = true;
                send_reply(&mut sock, opt, REP_ACK, &[])?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if !st.structured {
                    send_error(
                        &mut sock,
                        opt,
                        REP_ERR_INVALID,
                        "negotiate NBD_OPT_STRUCTURED_REPLY before meta contexts",
                    )?;
                    continue;
                }
                let q = match parse_meta_query(&data) {
                    Ok(q) => q,
                    Err(e) => {
                        send_error(&mut sock, opt, REP_ERR_INVALID, &e.to_string())?;
                        continue;
                    }
                };
                if let Err((kind, msg)) =
                    resolve(shared, &q.name, &Scope::of(shared, identity.as_ref()))
                {
                    send_error(&mut sock, opt, kind, &msg)?;
                    continue;
                }
                let selected = if set {
                    q.queries.iter().any(|s| s == BASE_ALLOCATION)
                } else {
                    q.queries.is_empty() || q.queries.iter().any(|s| matches_base_allocation(s))
                };
                if selected {
                    send_reply(
                        &mut sock,
                        opt,
                        REP_META_CONTEXT,
                        &rep_meta_context(BASE_ALLOCATION_ID, BASE_ALLOCATION),
                    )?;
                }
                if set {
                    st.meta_for = selected.then(|| q.name.clone());
                }
                send_reply(&mut sock, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let go = match parse_go(&data) {
                    Ok(g) => g,
                    Err(e) => {
                        send_error(&mut sock, opt, REP_ERR_INVALID, &e.to_string())?;
                        continue;
                    }
                };
                let export = match resolve(shared, &go.name, &Scope::of(shared, identity.as_ref()))
                {
                    Ok(x) => x,
                    Err((kind, msg)) => {
                        send_error(&mut sock, opt, kind, &msg)?;
                        continue;
                    }
                };
                let flags = transmission_flags(export.read_only, st.structured);
                let size = export.volume.size();
                send_reply(&mut sock, opt, REP_INFO, &info_export(size, flags))?;
                if go.infos.contains(&INFO_NAME) {
                    send_reply(
                        &mut sock,
                        opt,
                        REP_INFO,
                        &info_text(INFO_NAME, &export.name),
                    )?;
                }
                if go.infos.contains(&INFO_DESCRIPTION) {
                    send_reply(
                        &mut sock,
                        opt,
                        REP_INFO,
                        &info_text(INFO_DESCRIPTION, &export.description),
                    )?;
                }
                // Sent whether asked for or not (the protocol allows it): any alignment works,
                // 4 KiB is efficient, 32 MiB is the most one request may carry.
                send_reply(
                    &mut sock,
                    opt,
                    REP_INFO,
                    &info_block_size(1, 4096, MAX_PAYLOAD),
                )?;
                send_reply(&mut sock, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    return Ok(Outcome::Transmit(
                        sock,
                        export.into_session(&go.name, &st, identity.as_ref()),
                    ));
                }
            }
            OPT_EXPORT_NAME => {
                let Ok(name) = String::from_utf8(data) else {
                    return Ok(Outcome::Closed);
                };
                let export = match resolve(shared, &name, &Scope::of(shared, identity.as_ref())) {
                    Ok(x) => x,
                    Err((_, msg)) => {
                        // No way to answer with an error: the protocol says close.
                        tracing::info!("{msg}; closing");
                        return Ok(Outcome::Closed);
                    }
                };
                let flags = transmission_flags(export.read_only, st.structured);
                let mut reply = Vec::with_capacity(134);
                reply.extend_from_slice(&export.volume.size().to_be_bytes());
                reply.extend_from_slice(&flags.to_be_bytes());
                if !st.no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                sock.write_all(&reply)?;
                return Ok(Outcome::Transmit(
                    sock,
                    export.into_session(&name, &st, identity.as_ref()),
                ));
            }
            _ => {
                send_error(
                    &mut sock,
                    opt,
                    REP_ERR_UNSUP,
                    "option not supported by this server",
                )?;
            }
        }
    }
}
