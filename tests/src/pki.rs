//! Certificates made inside a test with rcgen: a CA and a server certificate it signs, and a CA
//! that signed nothing (for the refusals).

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

use crate::TestResult;

/// A CA, and a server certificate for `names` (the first is also its common name) signed by it,
/// each as PEM.
pub struct ServerPki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A CA named `ca_name` and a server certificate for `names`, signed by it.
pub fn server(ca_name: &str, names: &[&str]) -> TestResult<ServerPki> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;
    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
    server.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("server"));
    let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key)?;
    Ok(ServerPki { ca_pem: ca_cert.pem(), cert_pem: server_cert.pem(), key_pem: server_key.serialize_pem() })
}

/// Another CA, which signed nothing a server under test holds: its PEM.
pub fn stranger_ca() -> TestResult<String> {
    let key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "another CA");
    Ok(ca.self_signed(&key)?.pem())
}
