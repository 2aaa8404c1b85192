//! Mutual TLS between peers (rustls): every peer presents a certificate of
//! the cluster's CA and accepts only peers that do.
//!
//! A link reads on one thread and writes from others. rustls's connection
//! is one state machine for both directions, so it sits behind a mutex:
//! the reading thread reads raw bytes from the socket *without* the lock
//! (it may wait there), then takes the lock only to feed them in and take
//! plaintext out; writers take the lock to put plaintext in and write the
//! records out. Neither direction ever waits for the other's socket.

use rustls::pki_types::ServerName;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};

/// The TLS settings of a peer: its certificate and key, and the CA its
/// peers' certificates must come from.
#[derive(Clone)]
pub struct PeerTls {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerTls")
    }
}

impl PeerTls {
    /// Reads the CA, this peer's certificate and its key (PEM files).
    pub fn from_files(ca_file: &str, cert_file: &str, key_file: &str) -> Result<PeerTls, String> {
        use crate::util::pem;
        let roots = Arc::new(pem::roots(ca_file, "peers.tls.ca_file")?);
        let chain = pem::certs(cert_file, "peers.tls.cert_file")?;
        let key = pem::key(key_file, "peers.tls.key_file")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| format!("peers.tls.ca_file {ca_file}: {e}"))?;
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| format!("peers.tls.cert_file {cert_file} / key_file {key_file}: {e}"))?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("peers.tls.cert_file {cert_file} / key_file {key_file}: {e}"))?;
        Ok(PeerTls {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }

    /// Runs the handshake as the dialing side; `host` is checked against
    /// the other peer's certificate.
    pub fn connect(&self, host: &str, sock: &TcpStream) -> std::io::Result<Shared> {
        let name = ServerName::try_from(host.to_string()).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("`{host}` is not a host name for TLS: {e}"),
            )
        })?;
        let conn = rustls::ClientConnection::new(self.client.clone(), name)
            .map_err(std::io::Error::other)?;
        handshake(rustls::Connection::Client(conn), sock)
    }

    /// Runs the handshake as the accepting side.
    pub fn accept(&self, sock: &TcpStream) -> std::io::Result<Shared> {
        let conn =
            rustls::ServerConnection::new(self.server.clone()).map_err(std::io::Error::other)?;
        handshake(rustls::Connection::Server(conn), sock)
    }
}

/// A TLS session shared by a link's reading and writing sides.
pub type Shared = Arc<Mutex<rustls::Connection>>;

/// What a failed handshake means, in the words of the settings to check.
fn explain(e: &dyn std::fmt::Display) -> String {
    let s = e.to_string();
    if s.contains("invalid peer certificate") {
        format!("the other peer's certificate is not from this cluster's CA (peers.tls.ca_file), or does not name its host: {s}")
    } else if s.contains("alert")
        && [
            "UnknownCA",
            "BadCertificate",
            "CertificateRequired",
            "DecryptError",
        ]
        .iter()
        .any(|a| s.contains(a))
    {
        format!("the other peer refused this peer's certificate (is it signed by the cluster's CA, peers.tls.ca_file?): {s}")
    } else {
        s
    }
}

fn handshake(mut conn: rustls::Connection, sock: &TcpStream) -> std::io::Result<Shared> {
    let mut io = sock;
    while conn.is_handshaking() {
        conn.complete_io(&mut io).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("TLS handshake with the other peer: {}", explain(&e)),
            )
        })?;
    }
    // Send what the handshake left to write (the client's Finished).
    while conn.wants_write() {
        conn.write_tls(&mut io)?;
    }
    Ok(Arc::new(Mutex::new(conn)))
}

fn poisoned() -> std::io::Error {
    std::io::Error::other("the TLS session was poisoned by a panic")
}

/// The writing side: plaintext in, TLS records out.
pub struct TlsWriter {
    pub conn: Shared,
    pub sock: TcpStream,
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut c = self.conn.lock().map_err(|_| poisoned())?;
        let n = c.writer().write(buf)?;
        while c.wants_write() {
            c.write_tls(&mut self.sock)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let mut c = self.conn.lock().map_err(|_| poisoned())?;
        c.writer().flush()?;
        while c.wants_write() {
            c.write_tls(&mut self.sock)?;
        }
        self.sock.flush()
    }
}

/// The reading side: TLS records in, plaintext out.
pub struct TlsReader {
    pub conn: Shared,
    pub sock: TcpStream,
    raw: Vec<u8>,
}

impl TlsReader {
    pub fn new(conn: Shared, sock: TcpStream) -> Self {
        TlsReader {
            conn,
            sock,
            raw: vec![0; 16 * 1024],
        }
    }
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            {
                let mut c = self.conn.lock().map_err(|_| poisoned())?;
                match c.reader().read(buf) {
                    Ok(n) => return Ok(n), // 0: the peer closed cleanly
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            // Wait for records without holding the session.
            let n = self.sock.read(&mut self.raw)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the other peer closed the connection",
                ));
            }
            let mut c = self.conn.lock().map_err(|_| poisoned())?;
            let mut fed = &self.raw[..n];
            while !fed.is_empty() {
                c.read_tls(&mut fed)?;
                c.process_new_packets().map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("TLS: {}", explain(&e)),
                    )
                })?;
            }
            while c.wants_write() {
                c.write_tls(&mut self.sock)?;
            }
        }
    }
}
