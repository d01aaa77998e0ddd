//! A test CA made here with rcgen, and the certificates it issues: the mesh's node
//! certificates and the homeserver stand-ins' server certificates.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

pub struct TestCa {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A node certificate usable as server and client: (certificate PEM, key PEM).
    pub fn node_cert(&self, name: &str) -> (String, String) {
        self.cert_for(name, &[name, "localhost"])
    }

    /// A server and client certificate with CN `name` and these DNS names.
    pub fn cert_for(&self, name: &str, dns_names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(dns_names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes `<dir>/ca.pem` and `<dir>/<name>.pem` (key + certificate, Sydent's combined
    /// form). Returns (certfile, cacert).
    pub fn write_node_files(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = self.node_cert(name);
        let certfile = dir.join(format!("{name}.pem"));
        std::fs::write(&certfile, format!("{key}{cert}")).unwrap();
        let cacert = dir.join("ca.pem");
        std::fs::write(&cacert, &self.cert_pem).unwrap();
        (certfile, cacert)
    }
}
