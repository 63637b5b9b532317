//! TLS for our clients: a private CA to trust besides the default roots, and an optional
//! client certificate, for the broker (`amqps://`, lapin over rustls) and the HTTP clients
//! (the embedding service, the python-indexer; reqwest over rustls).
//!
//! Files are read at start; an unreadable or malformed file is a fatal configuration error
//! naming its key. A certificate the peer or we reject at handshake time is classified by
//! type in [`crate::error::tls_rejection`]: it is fatal (a retry cannot make a certificate
//! valid), never retried for ever.

use std::path::Path;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};

use crate::config::TlsFiles;
use crate::error::StageError;

fn read(section: &str, key: &str, path: &Path) -> Result<Vec<u8>, StageError> {
    let bytes = std::fs::read(path).map_err(|e| {
        StageError::fatal(format!(
            "{section}.{key}: cannot read {}: {e}",
            path.display()
        ))
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(StageError::fatal(format!(
            "{section}.{key}: {} is not a PEM file (no -----BEGIN line)",
            path.display()
        )));
    }
    Ok(bytes)
}

/// lapin's TLS settings for `amqps://`: extra CA roots on top of the system's, and a client
/// identity when both the certificate and the key are given.
pub fn amqp(files: &TlsFiles) -> Result<OwnedTLSConfig, StageError> {
    let cert_chain = match &files.ca_file {
        Some(path) => Some(
            String::from_utf8(read("broker", "tls_ca_file", path)?).map_err(|_| {
                StageError::fatal(format!(
                    "broker.tls_ca_file: {} is not text PEM",
                    path.display()
                ))
            })?,
        ),
        None => None,
    };
    let identity = match (&files.client_cert_file, &files.client_key_file) {
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: read("broker", "tls_client_cert_file", cert)?,
            key: read("broker", "tls_client_key_file", key)?,
        }),
        _ => None,
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

/// Applies `files` to a reqwest client builder (`section` names the config section in
/// errors).
pub fn http(
    mut builder: reqwest::ClientBuilder,
    section: &str,
    files: &TlsFiles,
) -> Result<reqwest::ClientBuilder, StageError> {
    if let Some(path) = &files.ca_file {
        let pem = read(section, "tls_ca_file", path)?;
        let roots = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            StageError::fatal(format!(
                "{section}.tls_ca_file: {}: no usable certificate: {e}",
                path.display()
            ))
        })?;
        for root in roots {
            builder = builder.add_root_certificate(root);
        }
    }
    if let (Some(cert), Some(key)) = (&files.client_cert_file, &files.client_key_file) {
        let mut pem = read(section, "tls_client_cert_file", cert)?;
        pem.push(b'\n');
        pem.extend(read(section, "tls_client_key_file", key)?);
        let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
            StageError::fatal(format!(
                "{section}.tls_client_cert_file / tls_client_key_file: not a certificate and \
                 private key in PEM: {e}"
            ))
        })?;
        builder = builder.identity(identity);
    }
    Ok(builder)
}
