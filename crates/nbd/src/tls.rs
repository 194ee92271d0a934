//! TLS for `NBD_OPT_STARTTLS` (rustls, x509 certificates). After the client's STARTTLS is
//! acknowledged, the raw socket goes to a pump task that terminates TLS and relays plaintext
//! through a unix socket pair; the handshake and transmission code keep working on the pair's
//! other end exactly as on a plain connection.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::Error;
use crate::sock::Sock;

/// Certificate chain and key files (PEM).
pub(crate) fn load_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, Error> {
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
    Ok(Arc::new(cfg))
}

/// Terminates TLS connections on a small runtime of its own.
pub(crate) struct Pump {
    rt: tokio::runtime::Runtime,
    acceptor: TlsAcceptor,
}

impl Pump {
    pub fn new(cfg: Arc<ServerConfig>) -> std::io::Result<Pump> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("nbd-tls")
            .enable_io()
            .build()?;
        Ok(Pump {
            rt,
            acceptor: TlsAcceptor::from(cfg),
        })
    }

    /// Start TLS on `raw` (the client speaks TLS next); returns the plaintext end.
    pub fn start(&self, raw: Sock) -> std::io::Result<Sock> {
        let (ours, theirs) = UnixStream::pair()?;
        theirs.set_nonblocking(true)?;
        let acceptor = self.acceptor.clone();
        self.rt.spawn(async move {
            let r = async {
                let plain = tokio::net::UnixStream::from_std(theirs)?;
                match raw {
                    Sock::Tcp(s) => {
                        s.set_nonblocking(true)?;
                        let s = tokio::net::TcpStream::from_std(s)?;
                        relay(acceptor.accept(s).await?, plain).await
                    }
                    Sock::Unix(s) => {
                        s.set_nonblocking(true)?;
                        let s = tokio::net::UnixStream::from_std(s)?;
                        relay(acceptor.accept(s).await?, plain).await
                    }
                }
            }
            .await;
            if let Err(e) = r {
                tracing::info!("TLS connection ended: {e}");
            }
        });
        Ok(Sock::Unix(ours))
    }
}

async fn relay<S>(mut tls: S, mut plain: tokio::net::UnixStream) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::io::copy_bidirectional_with_sizes(&mut tls, &mut plain, 256 << 10, 256 << 10).await?;
    Ok(())
}
