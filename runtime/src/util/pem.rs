//! Reading TLS material from PEM files (MQTT connections and peer links),
//! with errors that name the setting and the file.

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The certificates of a PEM file; `setting` names it in errors
/// (`ca_file`, `peers.tls.cert_file`).
pub fn certs(path: &str, setting: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {setting} {path}: {e}"))?;
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{setting} {path}: not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{setting} {path} holds no PEM certificate"));
    }
    Ok(certs)
}

/// A store of the CA certificates in a PEM file.
pub fn roots(path: &str, setting: &str) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(path, setting)? {
        roots
            .add(cert)
            .map_err(|e| format!("{setting} {path}: unusable certificate: {e}"))?;
    }
    Ok(roots)
}

/// The private key in a PEM file.
pub fn key(path: &str, setting: &str) -> Result<PrivateKeyDer<'static>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {setting} {path}: {e}"))?;
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| format!("{setting} {path}: not PEM: {e}"))?
        .ok_or_else(|| format!("{setting} {path} holds no private key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_setting_and_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no pem here\n").expect("written");
        let empty = empty.display().to_string();
        let e = certs(&empty, "ca_file").unwrap_err();
        assert!(
            e.contains("ca_file") && e.contains("holds no PEM certificate"),
            "{e}"
        );
        let e = key(&empty, "client_key").unwrap_err();
        assert!(
            e.contains("client_key") && e.contains("holds no private key"),
            "{e}"
        );
        let e = roots("/nonexistent.pem", "peers.tls.ca_file").unwrap_err();
        assert!(
            e.starts_with("cannot read peers.tls.ca_file /nonexistent.pem"),
            "{e}"
        );
    }
}
