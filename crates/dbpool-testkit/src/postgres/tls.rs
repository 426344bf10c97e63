//! TLS material for test servers: a generated CA and a server certificate it signed.
//!
//! Lives here: [`TlsMaterial`], [`generate_tls`] and [`unrelated_ca_pem`] (a CA that must fail
//! verification). Must not live here: writing the material into a server's data directory or
//! turning `ssl` on (`server`), or any client-side TLS (the tests and the probe own that).

/// A CA and a server certificate signed by it, all PEM.
pub struct TlsMaterial {
    /// The CA certificate clients verify against.
    pub ca_pem: String,
    /// The server certificate.
    pub cert_pem: String,
    /// The server's private key.
    pub key_pem: String,
}

/// A fresh CA with a server certificate for `names` (DNS names or IP addresses).
pub fn generate_tls(names: &[String]) -> TlsMaterial {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "dbpool-operator test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca cert");
    let key = rcgen::KeyPair::generate().expect("server key");
    let mut params = rcgen::CertificateParams::new(names.to_vec()).expect("server params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "postgres");
    let cert = params.signed_by(&key, &ca).expect("server cert");
    TlsMaterial {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A CA that signed nothing a test server uses: verification against it must fail.
pub fn unrelated_ca_pem() -> String {
    generate_tls(&["localhost".to_owned()]).ca_pem
}
