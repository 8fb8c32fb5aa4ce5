//! The TLS half of connecting: rustls client configurations that check the server as libpq's
//! `sslmode` says (any certificate, the chain only, or the chain and the host name), the root
//! stores they check against, and the connector tokio-postgres takes. `conn` decides which
//! check a target needs; this module only builds it. Its errors become `conn`'s `DbError`s.

use std::error::Error as StdError;
use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_postgres::Socket;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

/// Why a TLS client configuration could not be built; `conn` reports each as its `DbError`.
#[derive(Debug)]
pub(super) enum TlsError {
    RootCertUnreadable { path: String, reason: String },
    SystemRootCerts { reason: String },
    TlsSetup { reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TlsOptions {
    /// `sslsni`: send the host name in the handshake (libpq's default is on).
    pub(super) sni: bool,
    /// `ssl_min_protocol_version`/`ssl_max_protocol_version` narrowed to what rustls speaks.
    pub(super) tls12: bool,
    pub(super) tls13: bool,
}

/// The rustls client configuration for `verification`, the protocol versions and SNI of
/// `options`, and the ALPN name when the connection negotiates TLS directly.
pub(super) fn client_config(
    verification: Verification,
    options: TlsOptions,
    alpn: bool,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut versions = Vec::new();
    if options.tls13 {
        versions.push(&rustls::version::TLS13);
    }
    if options.tls12 {
        versions.push(&rustls::version::TLS12);
    }
    let tls_setup = |error: &dyn StdError| TlsError::TlsSetup {
        reason: error_chain(error),
    };
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&versions)
        .map_err(|e| tls_setup(&e))?;
    let mut tls_config = match verification {
        Verification::AcceptAny => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert { provider }))
            .with_no_client_auth(),
        Verification::ChainOnly(roots) => {
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| tls_setup(&e))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(VerifyChainOnly { webpki }))
                .with_no_client_auth()
        }
        Verification::Full(roots) => builder.with_root_certificates(roots).with_no_client_auth(),
    };
    tls_config.enable_sni = options.sni;
    if alpn {
        tls_config.alpn_protocols = vec![b"postgresql".to_vec()];
    }
    Ok(tls_config)
}

pub(super) fn load_root_file(path: &Path) -> Result<RootCertStore, TlsError> {
    let unreadable = |reason: String| TlsError::RootCertUnreadable {
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| unreadable(error_chain(&e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unreadable(error_chain(&e)))?;
    if certs.is_empty() {
        return Err(unreadable("it holds no PEM certificate".to_owned()));
    }
    let mut roots = RootCertStore::empty();
    let (_, n_ignored) = roots.add_parsable_certificates(certs);
    if roots.is_empty() {
        return Err(unreadable(format!(
            "none of its {n_ignored} certificates could be parsed"
        )));
    }
    Ok(roots)
}

pub(super) fn load_system_roots() -> Result<RootCertStore, TlsError> {
    let loaded = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(loaded.certs);
    if roots.is_empty() {
        let reason = match loaded.errors.first() {
            Some(error) => error_chain(error),
            None => "none found".to_owned(),
        };
        return Err(TlsError::SystemRootCerts { reason });
    }
    Ok(roots)
}

pub(super) enum Verification {
    /// Any certificate (libpq's `require` without a root file); the handshake signature is
    /// still checked against it.
    AcceptAny,
    /// The chain up to these roots, not the host name (`verify-ca`).
    ChainOnly(RootCertStore),
    /// The chain and the host name (`verify-full`).
    Full(RootCertStore),
}

#[derive(Debug)]
struct AcceptAnyServerCert {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// webpki's full check with a wrong host name forgiven. webpki checks the name last, after
/// the chain, validity and usage, so forgiving that one error skips nothing else.
#[derive(Debug)]
struct VerifyChainOnly {
    webpki: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for VerifyChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// `MakeRustlsConnect`, except for hosts without a name. tokio-postgres asks for a connector
/// even for a unix socket and passes "" as its name, which rustls refuses; it then declines
/// the handshake itself when there is no name, so the stand-in name is never sent.
#[derive(Clone)]
pub(super) struct MakeTls(pub(super) MakeRustlsConnect);

impl MakeTlsConnect<Socket> for MakeTls {
    type Stream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;
    type TlsConnect = <MakeRustlsConnect as MakeTlsConnect<Socket>>::TlsConnect;
    type Error = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Error;

    fn make_tls_connect(&mut self, hostname: &str) -> Result<Self::TlsConnect, Self::Error> {
        let name = if hostname.is_empty() {
            "localhost"
        } else {
            hostname
        };
        MakeTlsConnect::<Socket>::make_tls_connect(&mut self.0, name)
    }
}

/// "outer: cause: cause", as `{:#}` prints an anyhow chain; consecutive repeats dropped
/// (`io::Error` displays its inner error and also returns that error's source).
pub(super) fn error_chain(error: &dyn StdError) -> String {
    let mut parts = vec![error.to_string()];
    let mut cause = error.source();
    while let Some(current) = cause {
        let text = current.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        cause = current.source();
    }
    parts.join(": ")
}
