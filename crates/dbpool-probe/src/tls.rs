//! TLS for the probe: the rustls client configuration of each sslMode, the certificate verifiers,
//! PostgreSQL's SSLRequest negotiation, and a connector that timestamps the end of the handshake.
//!
//! Lives here: everything that decides whether a server certificate is acceptable. The crypto
//! provider is always passed in explicitly (ring), never taken from a process-wide default. Must
//! not live here: classification of handshake errors (`classify`) or socket handling (`connect`).

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{Arc, Mutex},
};

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::{ProbeStage, SslMode};

use super::{
    guard::{AuthPolicy, Guarded, VerdictCell},
    stage::Failure,
};

/// The connector tokio-postgres-rustls makes for one host name.
type RustlsConnect = <MakeRustlsConnect as MakeTlsConnect<TcpStream>>::TlsConnect;

/// A TLS stream over TCP, as tokio-postgres-rustls produces it.
pub(crate) type TlsStream = <RustlsConnect as TlsConnect<TcpStream>>::Stream;

/// The rustls configuration for `mode`, or `None` for `disable`.
///
/// prefer and require accept any certificate (but still check the handshake signatures, so the
/// session is encrypted to whoever holds the key); verify-ca checks the chain against `ca_pem`
/// but not the host name; verify-full checks both.
pub(crate) fn client_config(
    mode: SslMode,
    ca_pem: Option<&[u8]>,
    provider: &Arc<CryptoProvider>,
) -> Result<Option<ClientConfig>, Failure> {
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::Disable => return Ok(None),
        SslMode::Prefer | SslMode::Require => Arc::new(AcceptAnyCertificate {
            provider: Arc::clone(provider),
        }),
        SslMode::VerifyCa => Arc::new(ChainOnly {
            inner: webpki_verifier(mode, ca_pem, provider)?,
        }),
        SslMode::VerifyFull => webpki_verifier(mode, ca_pem, provider)?,
    };
    let config = ClientConfig::builder_with_provider(Arc::clone(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| Failure::config(ProbeStage::Tls, format!("TLS setup failed: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Some(config))
}

/// The standard chain-and-name verifier over the CA bundle `ca_pem`.
fn webpki_verifier(
    mode: SslMode,
    ca_pem: Option<&[u8]>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, Failure> {
    let mode_name = ssl_mode_name(mode);
    let pem = ca_pem.ok_or_else(|| {
        Failure::config(
            ProbeStage::Tls,
            format!("sslMode {mode_name} needs a CA certificate, but none is configured"),
        )
    })?;
    let mut roots = RootCertStore::empty();
    let mut reader = pem;
    // Error texts of the PEM and certificate parsers may quote the input (which could be any
    // Secret key the author pointed at), so the messages name only the position.
    for (n, cert) in rustls_pemfile::certs(&mut reader).enumerate() {
        let position = n + 1;
        let cert = cert.map_err(|_| {
            Failure::config(
                ProbeStage::Tls,
                format!("CA bundle is not valid PEM (certificate {position})"),
            )
        })?;
        roots.add(cert).map_err(|_| {
            Failure::config(
                ProbeStage::Tls,
                format!("CA certificate {position} rejected: not a usable X.509 CA certificate"),
            )
        })?;
    }
    if roots.is_empty() {
        return Err(Failure::config(
            ProbeStage::Tls,
            "CA bundle contains no PEM certificate",
        ));
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
        .build()
        .map_err(|_| Failure::config(ProbeStage::Tls, "CA bundle unusable".to_owned()))
}

/// libpq's spelling of `mode`.
pub(crate) fn ssl_mode_name(mode: SslMode) -> &'static str {
    match mode {
        SslMode::Disable => "disable",
        SslMode::Prefer => "prefer",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
    }
}

/// prefer / require: any certificate is accepted, handshake signatures are still verified.
#[derive(Debug)]
struct AcceptAnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCertificate {
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

/// verify-ca: the chain must lead to the configured CA; the host name is not checked.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The webpki verifier checks the chain (and validity dates) first and the name last, so a
        // name error means everything else passed.
        match self.inner.verify_server_cert(
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
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The server's answer to an SSLRequest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SslAnswer {
    /// 'S': the next bytes on the wire are the TLS handshake.
    Supported,
    /// 'N': continue in plain text.
    NotSupported,
}

/// Sends PostgreSQL's SSLRequest and reads the one-byte answer.
pub(crate) async fn ssl_request(stream: &mut TcpStream, peer: &str) -> Result<SslAnswer, Failure> {
    match ssl_request_byte(stream, peer).await? {
        b'S' => Ok(SslAnswer::Supported),
        b'N' => Ok(SslAnswer::NotSupported),
        other => Err(Failure::config(
            ProbeStage::Tls,
            format!(
                "{peer} answered the TLS request with byte {other:#04x}: is it a PostgreSQL server?"
            ),
        )),
    }
}

/// Sends PostgreSQL's SSLRequest and returns the server's one-byte answer as it came ('S', 'N'
/// or anything else), for callers that tell "not PostgreSQL" apart themselves (the ping).
pub(crate) async fn ssl_request_byte(stream: &mut TcpStream, peer: &str) -> Result<u8, Failure> {
    // Length 8, request code 80877103 (1234 << 16 | 5679).
    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    let io_failure = |e: io::Error| super::classify::from_io_error(&e, ProbeStage::Tls, peer);
    stream.write_all(&SSL_REQUEST).await.map_err(io_failure)?;
    stream.read_u8().await.map_err(io_failure)
}

/// The TLS handshake with `host` (the name verify-full checks and SNI carries) over `stream`,
/// after the server said 'S', with the sslMode's `config` from [`client_config`]. The
/// certificate is verified here, before anything else is sent. A rejected certificate or a
/// handshake alert is a configuration failure, I/O trouble an outage (as for the probe).
pub(crate) async fn handshake(
    host: &str,
    config: ClientConfig,
    stream: TcpStream,
    peer: &str,
) -> Result<TlsStream, Failure> {
    let mut make = MakeRustlsConnect::new(config);
    let Ok(connect) =
        <MakeRustlsConnect as MakeTlsConnect<TcpStream>>::make_tls_connect(&mut make, host);
    connect
        .connect(stream)
        .await
        .map_err(|e| super::classify::from_tls_io_error(&e, peer))
}

/// A tokio-postgres-rustls connector that notes when the handshake finished, so that the time of
/// the TLS stage and of the authentication stage can be told apart.
pub(crate) struct TimedTls {
    inner: RustlsConnect,
    done: Arc<Mutex<Option<Instant>>>,
    policy: AuthPolicy,
    verdict: VerdictCell,
}

impl TimedTls {
    /// A connector for `host` (the name checked by verify-full and sent as SNI) with `config`.
    /// The returned cell receives the instant the handshake succeeded. The TLS stream is handed
    /// to tokio-postgres inside the authentication guard with `policy`, which reports to `verdict`.
    pub(crate) fn new(
        host: &str,
        config: ClientConfig,
        policy: AuthPolicy,
        verdict: VerdictCell,
    ) -> (Self, Arc<Mutex<Option<Instant>>>) {
        let mut make = MakeRustlsConnect::new(config);
        let Ok(inner) =
            <MakeRustlsConnect as MakeTlsConnect<TcpStream>>::make_tls_connect(&mut make, host);
        let done = Arc::new(Mutex::new(None));
        (
            Self {
                inner,
                done: Arc::clone(&done),
                policy,
                verdict,
            },
            done,
        )
    }
}

impl TlsConnect<TcpStream> for TimedTls {
    type Stream = Guarded<TlsStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Guarded<TlsStream>>> + Send>>;

    fn connect(self, stream: TcpStream) -> Self::Future {
        let Self {
            inner,
            done,
            policy,
            verdict,
        } = self;
        Box::pin(async move {
            let stream = inner.connect(stream).await?;
            let mut cell = done.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            *cell = Some(Instant::now());
            Ok(Guarded::new(stream, policy, verdict))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    struct Pki {
        ca_pem: String,
        server_der: CertificateDer<'static>,
    }

    fn pki(names: &[&str]) -> Pki {
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca");
        let key = rcgen::KeyPair::generate().expect("server key");
        let params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .expect("server params");
        let cert = params.signed_by(&key, &ca).expect("server cert");
        Pki {
            ca_pem: ca.pem(),
            server_der: cert.der().clone(),
        }
    }

    #[test]
    fn verify_modes_need_a_ca() {
        for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
            let err = client_config(mode, None, &provider()).expect_err("no CA");
            assert_eq!(err.stage, ProbeStage::Tls);
            assert_eq!(err.outcome, crate::ProbeOutcome::ConfigFailure);
            assert!(err.message.contains("needs a CA"), "{}", err.message);
        }
        let err = client_config(SslMode::VerifyFull, Some(b"not pem"), &provider())
            .expect_err("garbage CA");
        assert!(
            err.message.contains("no PEM certificate"),
            "{}",
            err.message
        );
        assert!(matches!(
            client_config(SslMode::Disable, None, &provider()),
            Ok(None)
        ));
        assert!(matches!(
            client_config(SslMode::Require, None, &provider()),
            Ok(Some(_))
        ));
    }

    #[test]
    fn pem_errors_never_echo_the_input() {
        let secret = "SUPER-SECRET-VALUE-42";
        let inputs = [
            format!("-----BEGIN CERTIFICATE-----\n{secret}\n-----END CERTIFICATE-----\n"),
            format!("-----BEGIN CERTIFICATE-----\n{secret}\n"),
            format!("-----BEGIN CERTIFICATE-----\nTUlJ{secret}==\n-----END CERTIFICATE-----\n"),
            secret.to_owned(),
        ];
        for input in inputs {
            let err = client_config(SslMode::VerifyFull, Some(input.as_bytes()), &provider())
                .expect_err("not a CA");
            assert!(!err.message.contains(secret), "{}", err.message);
            assert!(!err.message.contains("SUPER"), "{}", err.message);
        }
    }

    #[test]
    fn verify_ca_ignores_the_name_but_not_the_chain() {
        let provider = provider();
        let good = pki(&["db.example.internal"]);
        let other = pki(&["db.example.internal"]);
        let full = webpki_verifier(SslMode::VerifyFull, Some(good.ca_pem.as_bytes()), &provider)
            .expect("verifier");
        let chain_only = ChainOnly {
            inner: Arc::clone(&full),
        };
        let wrong_name = ServerName::try_from("127.0.0.1").expect("name");
        let right_name = ServerName::try_from("db.example.internal").expect("name");
        let now = UnixTime::now();

        assert!(
            full.verify_server_cert(&good.server_der, &[], &right_name, &[], now)
                .is_ok()
        );
        let name_err = full
            .verify_server_cert(&good.server_der, &[], &wrong_name, &[], now)
            .expect_err("name mismatch");
        assert!(matches!(
            name_err,
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            )
        ));
        assert!(
            chain_only
                .verify_server_cert(&good.server_der, &[], &wrong_name, &[], now)
                .is_ok()
        );
        let chain_err = chain_only
            .verify_server_cert(&other.server_der, &[], &right_name, &[], now)
            .expect_err("foreign chain");
        // Both CAs have the same name, so webpki finds the wrong one and the signature fails.
        assert!(
            matches!(
                chain_err,
                rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature
                )
            ),
            "{chain_err:?}"
        );
    }
}
