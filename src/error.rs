//! The one classification every failure goes through.
//!
//! The pipeline asks each error one question, `kind()`, and acts on the answer:
//!
//! - [`ErrorKind::Poison`]: *this message* is bad (undecodable, no key, rejected by the index
//!   as invalid). Retrying cannot help. Dead-letter it with the reason, ack, go on.
//! - [`ErrorKind::Transient`]: *the world* is down (connection refused, timeout, 5xx, 429).
//!   The message is fine. Retry with backoff, keep order, pause intake, never dead-letter.
//! - [`ErrorKind::Fatal`]: *we* are misconfigured (auth refused, collection with another
//!   vector size, model files missing). Stop with a clear message; a restart will not help
//!   until an operator acts.

use std::fmt;

/// What the pipeline must do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Poison,
    Transient,
    Fatal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Poison => "poison",
            ErrorKind::Transient => "transient",
            ErrorKind::Fatal => "fatal",
        }
    }
}

/// An error of the embedder or the sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageError {
    pub kind: ErrorKind,
    pub message: String,
    /// For poison: the index of the input (text or point) that caused it, when known.
    pub item: Option<usize>,
}

impl StageError {
    pub fn poison(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Poison,
            message: message.into(),
            item: None,
        }
    }
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Transient,
            message: message.into(),
            item: None,
        }
    }
    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Fatal,
            message: message.into(),
            item: None,
        }
    }
    pub fn at(mut self, item: usize) -> Self {
        self.item = Some(item);
        self
    }

    /// Classifies an HTTP status from an embedding service or the python-indexer.
    pub fn from_http_status(status: u16, message: impl Into<String>) -> Self {
        let message = message.into();
        match status {
            401 | 403 => Self::fatal(format!("HTTP {status} (credentials refused): {message}")),
            404 => Self::fatal(format!("HTTP 404 (wrong URL or model?): {message}")),
            400 | 413 | 422 => Self::poison(format!("HTTP {status}: {message}")),
            408 | 425 | 429 => Self::transient(format!("HTTP {status}: {message}")),
            s if s >= 500 => Self::transient(format!("HTTP {status}: {message}")),
            s => Self::fatal(format!("unexpected HTTP {s}: {message}")),
        }
    }

    /// Classifies a transport error of reqwest. A certificate the TLS layer rejected and a
    /// request that cannot be built (an invalid URL or header) are permanent: fatal. The
    /// network failing (refused, reset, timed out) is transient.
    pub fn from_reqwest(err: &reqwest::Error) -> Self {
        Self::from_reqwest_in(err, "[section]")
    }

    /// [`StageError::from_reqwest`] for the client configured in `[section]`: a rejected
    /// certificate names that section's TLS settings.
    pub fn from_reqwest_in(err: &reqwest::Error, section: &str) -> Self {
        if let Some(why) = tls_rejection(err) {
            Self::fatal(format!(
                "TLS: {why}; check {section}.tls_ca_file (and {section}.tls_client_cert_file / \
                 tls_client_key_file if the server asks for a client certificate)"
            ))
        } else if err.is_builder() {
            Self::fatal(format!(
                "the request cannot be built (check the URL): {}",
                without_url(err)
            ))
        } else if err.is_decode() {
            Self::transient(format!("unreadable response: {}", without_url(err)))
        } else {
            Self::transient(without_url(err))
        }
    }
}

/// Longest excerpt of a provider's error body we keep (logs, DLQ headers): providers quote
/// the rejected input, which is row data.
pub const MAX_BODY_EXCERPT: usize = 200;

/// The start of an error body from a provider, at most [`MAX_BODY_EXCERPT`] bytes, marked
/// when cut.
pub fn body_excerpt(body: &str) -> String {
    let body = body.trim();
    if body.len() <= MAX_BODY_EXCERPT {
        return body.to_string();
    }
    let cut = body.floor_char_boundary(MAX_BODY_EXCERPT);
    format!("{}… ({} more bytes)", &body[..cut], body.len() - cut)
}

/// Why the TLS layer refused the peer, if that is what `err` is: walks the source chain
/// (looking inside `io::Error`s, whose `source()` skips their payload) for a
/// [`rustls::Error`] about certificates.
pub fn tls_rejection(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return certificate_problem(r);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
        {
            if let Some(r) = inner.downcast_ref::<rustls::Error>() {
                return certificate_problem(r);
            }
            if let Some(found) = tls_rejection(inner) {
                return Some(found);
            }
        }
        next = e.source();
    }
    None
}

fn certificate_problem(e: &rustls::Error) -> Option<String> {
    use rustls::AlertDescription as A;
    match e {
        rustls::Error::InvalidCertificate(c) => Some(format!(
            "the server's certificate was rejected ({c:?}): it is not signed by a trusted CA, \
             names another host, or has expired"
        )),
        rustls::Error::NoCertificatesPresented => {
            Some("the server presented no certificate".into())
        }
        rustls::Error::AlertReceived(
            a @ (A::BadCertificate
            | A::UnknownCA
            | A::CertificateRequired
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::AccessDenied),
        ) => Some(format!(
            "the server refused our client certificate (alert {a:?})"
        )),
        rustls::Error::AlertReceived(
            a @ (A::HandshakeFailure | A::ProtocolVersion | A::InsufficientSecurity),
        ) => Some(format!(
            "the server refused the TLS handshake (alert {a:?}): it wants a client certificate \
             we did not send or it does not accept, or we share no protocol version or cipher"
        )),
        _ => None,
    }
}

/// reqwest's errors print the URL, which may hold credentials; print the error alone.
fn without_url(err: &reqwest::Error) -> String {
    let mut text = err.without_url_ref();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

trait WithoutUrl {
    fn without_url_ref(&self) -> String;
}

impl WithoutUrl for reqwest::Error {
    fn without_url_ref(&self) -> String {
        let kind = if self.is_timeout() {
            "timed out"
        } else if self.is_connect() {
            "connection failed"
        } else if self.is_decode() {
            "decode error"
        } else if self.is_body() {
            "body error"
        } else if self.is_status() {
            "status error"
        } else {
            "request failed"
        };
        kind.to_string()
    }
}

impl fmt::Display for StageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error: {}", self.kind.as_str(), self.message)
    }
}

impl std::error::Error for StageError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_bodies_are_cut_to_an_excerpt() {
        assert_eq!(body_excerpt("  short  "), "short");
        let row = format!(
            "{{\"error\": \"bad input: {}\"}}",
            "secret row value ".repeat(100)
        );
        let cut = body_excerpt(&row);
        assert!(cut.len() < MAX_BODY_EXCERPT + 40, "{cut}");
        assert!(cut.ends_with("more bytes)"), "{cut}");
        let multibyte = "é".repeat(300);
        assert!(body_excerpt(&multibyte).starts_with("éé"));
    }

    #[test]
    fn a_rejected_certificate_is_found_behind_io_errors() {
        let inner = rustls::Error::InvalidCertificate(rustls::CertificateError::Expired);
        let io = std::io::Error::other(inner);
        assert!(tls_rejection(&io).is_some_and(|w| w.contains("Expired")));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(tls_rejection(&refused).is_none());
        let other = std::io::Error::other(rustls::Error::DecryptError);
        assert!(tls_rejection(&other).is_none(), "not about certificates");
    }

    #[test]
    fn http_statuses_classify() {
        assert_eq!(
            StageError::from_http_status(400, "bad").kind,
            ErrorKind::Poison
        );
        assert_eq!(
            StageError::from_http_status(422, "bad").kind,
            ErrorKind::Poison
        );
        assert_eq!(
            StageError::from_http_status(429, "slow").kind,
            ErrorKind::Transient
        );
        assert_eq!(
            StageError::from_http_status(503, "down").kind,
            ErrorKind::Transient
        );
        assert_eq!(
            StageError::from_http_status(500, "oops").kind,
            ErrorKind::Transient
        );
        assert_eq!(
            StageError::from_http_status(401, "who").kind,
            ErrorKind::Fatal
        );
        assert_eq!(
            StageError::from_http_status(404, "where").kind,
            ErrorKind::Fatal
        );
    }
}
