//! A throwaway PKI for TLS tests: a CA, a server certificate it signed for `localhost` and
//! `127.0.0.1`, and a second, unrelated CA (to check that a client trusting only it refuses the
//! server), written as PEM files in a temporary directory.

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// The files of a test PKI (removed when dropped).
pub struct TestPki {
    _dir: tempfile::TempDir,
    /// The CA that signed the server certificate.
    pub ca: PathBuf,
    /// The server certificate (`localhost`, `127.0.0.1`).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// A CA that signed nothing here.
    pub other_ca: PathBuf,
}

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().expect("a CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let pem = params.self_signed(&key).expect("self-signed CA").pem();
    (params, key, pem)
}

impl TestPki {
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (ca_params, ca_key, ca_pem) = ca("Baton test CA");
        let (_, _, other_pem) = ca("Unrelated test CA");
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().expect("a server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("server parameters");
        params
            .distinguished_name
            .push(DnType::CommonName, "baton-api");
        let cert = params.signed_by(&key, &issuer).expect("server certificate");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write a PEM file");
            path
        };
        TestPki {
            ca: write("ca.pem", &ca_pem),
            cert: write("server.pem", &cert.pem()),
            key: write("server-key.pem", &key.serialize_pem()),
            other_ca: write("other-ca.pem", &other_pem),
            _dir: dir,
        }
    }

    /// An HTTP client trusting this PKI's CA.
    pub fn client(&self) -> reqwest::Client {
        let pem = std::fs::read(&self.ca).expect("read the CA");
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("CA certificate"))
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .expect("an HTTPS client")
    }
}
