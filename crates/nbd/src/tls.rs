//! TLS for `NBD_OPT_STARTTLS`: x509 certificates with rustls, or a pre-shared key with OpenSSL
//! (rustls has no external-PSK support; qemu, nbdkit and libnbd all offer PSK through GnuTLS,
//! with the same `identity:hexkey` key files). After the client's STARTTLS is acknowledged, the raw socket goes to a pump task that terminates TLS and relays plaintext
//! through a unix socket pair; the handshake and transmission code keep working on the pair's
//! other end exactly as on a plain connection.
//!
//! The PSK identity a client proved is handed to the handshake beside the plaintext end
//! ([`Identity`]); it is set before the first plaintext byte is relayed, so every option the
//! client sends under TLS is judged with it.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use openssl::ex_data::Index;
use openssl::ssl::{Ssl, SslContext, SslMethod, SslOptions};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::Error;
use crate::sock::Sock;

/// How TLS connections are accepted.
#[derive(Clone)]
pub(crate) enum Acceptor {
    /// x509 certificate (rustls).
    Cert(TlsAcceptor),
    /// Pre-shared keys (OpenSSL); the key callback records the client's identity under
    /// `identity`.
    Psk {
        ctx: SslContext,
        identity: Index<Ssl, String>,
    },
}

/// The PSK identity of a TLS connection, once its TLS handshake has succeeded (never set for
/// certificate TLS).
pub(crate) type Identity = Arc<OnceLock<String>>;

/// Read a PSK file: `identity:hexkey` per line (the format of GnuTLS `psktool`, used by qemu
/// and nbdkit). Every identity `restricted` names must have a key in it.
pub(crate) fn load_psk(
    path: &Path,
    restricted: &BTreeMap<String, Vec<String>>,
) -> Result<Acceptor, Error> {
    let err = |message: String| Error::Tls {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let mut keys: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((id, hex)) = line.split_once(':') else {
            return Err(err(format!("line {}: expected identity:hexkey", i + 1)));
        };
        let key = decode_hex(hex.trim()).ok_or_else(|| {
            err(format!(
                "line {}: the key is not an even number of hex digits",
                i + 1
            ))
        })?;
        if key.is_empty() || key.len() > 256 {
            return Err(err(format!(
                "line {}: key length {} is not 1 to 256 bytes",
                i + 1,
                key.len()
            )));
        }
        keys.insert(id.as_bytes().to_vec(), key);
    }
    if keys.is_empty() {
        return Err(err("no keys in the file".into()));
    }
    if let Some(id) = restricted
        .keys()
        .find(|id| !keys.contains_key(id.as_bytes()))
    {
        return Err(err(format!(
            "--psk-exports names PSK identity {id}, which has no key here"
        )));
    }
    let ssl_err = |e: openssl::error::ErrorStack| err(format!("OpenSSL: {e}"));
    let mut b = SslContext::builder(SslMethod::tls_server()).map_err(ssl_err)?;
    b.set_options(SslOptions::NO_TICKET);
    // TLS 1.2 PSK suites; TLS 1.3 uses the same callback with its SHA-256 suites.
    b.set_cipher_list("ECDHE-PSK:DHE-PSK:PSK:!NULL")
        .map_err(ssl_err)?;
    let index = Ssl::new_ex_index::<String>().map_err(ssl_err)?;
    b.set_psk_server_callback(move |ssl, identity, out| {
        let key = identity.and_then(|id| Some((id, keys.get(id)?)));
        match key {
            Some((id, k)) if k.len() <= out.len() => {
                out[..k.len()].copy_from_slice(k);
                // Known identities come from the (UTF-8) file.
                ssl.set_ex_data(index, String::from_utf8_lossy(id).into_owned());
                Ok(k.len())
            }
            // Unknown identity: a zero-length key makes the handshake fail.
            _ => Ok(0),
        }
    });
    Ok(Acceptor::Psk {
        ctx: b.build(),
        identity: index,
    })
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Certificate chain and key files (PEM).
pub(crate) fn load_cert(cert: &Path, key: &Path) -> Result<Acceptor, Error> {
    let tls_err = |path: &Path, what: String| Error::Tls {
        path: path.to_path_buf(),
        message: what,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| tls_err(cert, format!("cannot read the certificate: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls_err(cert, format!("bad PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(tls_err(cert, "no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| tls_err(key, format!("cannot read the private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            tls_err(
                cert,
                format!("certificate and key do not fit together: {e}"),
            )
        })?;
    Ok(Acceptor::Cert(TlsAcceptor::from(Arc::new(cfg))))
}

/// Terminates TLS connections on a small runtime of its own.
pub(crate) struct Pump {
    rt: tokio::runtime::Runtime,
    acceptor: Acceptor,
}

impl Pump {
    pub fn new(acceptor: Acceptor) -> std::io::Result<Pump> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("nbd-tls")
            .enable_io()
            .build()?;
        Ok(Pump { rt, acceptor })
    }

    /// Start TLS on `raw` (the client speaks TLS next); returns the plaintext end and where
    /// the client's PSK identity will be (`None` with a certificate).
    pub fn start(&self, raw: Sock) -> std::io::Result<(Sock, Option<Identity>)> {
        let (ours, theirs) = UnixStream::pair()?;
        let identity = matches!(self.acceptor, Acceptor::Psk { .. }).then(Identity::default);
        let id = identity.clone();
        theirs.set_nonblocking(true)?;
        let acceptor = self.acceptor.clone();
        self.rt.spawn(async move {
            let r = async {
                let plain = tokio::net::UnixStream::from_std(theirs)?;
                match raw {
                    Sock::Tcp(s) => {
                        s.set_nonblocking(true)?;
                        let raw = tokio::net::TcpStream::from_std(s)?;
                        accept(&acceptor, raw, plain, id).await
                    }
                    Sock::Unix(s) => {
                        s.set_nonblocking(true)?;
                        let raw = tokio::net::UnixStream::from_std(s)?;
                        accept(&acceptor, raw, plain, id).await
                    }
                }
            }
            .await;
            if let Err(e) = r {
                tracing::info!("TLS connection ended: {e}");
            }
        });
        Ok((Sock::Unix(ours), identity))
    }
}

async fn accept<S>(
    acceptor: &Acceptor,
    raw: S,
    plain: tokio::net::UnixStream,
    id: Option<Identity>,
) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match acceptor {
        Acceptor::Cert(a) => relay(a.accept(raw).await?, plain).await,
        Acceptor::Psk { ctx, identity } => {
            let ssl = Ssl::new(ctx).map_err(std::io::Error::other)?;
            let mut s = tokio_openssl::SslStream::new(ssl, raw).map_err(std::io::Error::other)?;
            Pin::new(&mut s)
                .accept()
                .await
                .map_err(|e| std::io::Error::other(format!("TLS-PSK handshake: {e}")))?;
            // Before any plaintext is relayed: the handshake judges every option with it.
            if let (Some(slot), Some(who)) = (id, s.ssl().ex_data(*identity)) {
                let _ = slot.set(who.clone());
            }
            relay(s, plain).await
        }
    }
}

async fn relay<S>(mut tls: S, mut plain: tokio::net::UnixStream) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::io::copy_bidirectional_with_sizes(&mut tls, &mut plain, 256 << 10, 256 << 10).await?;
    Ok(())
}
