//! Generated certificates: a CA and a server certificate signed by it.

use std::path::Path;

use pcp_eap::rustls::RootCertStore;
use pcp_eap::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A fresh CA and a server certificate signed by it, with its key.
pub struct Pki {
    /// The CA certificate (the trust anchor).
    pub ca: CertificateDer<'static>,
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// The server certificate.
    pub cert: CertificateDer<'static>,
    /// The server certificate, PEM.
    pub cert_pem: String,
    /// The server's private key, PEM (PKCS #8).
    pub key_pem: String,
    key_der: Vec<u8>,
}

impl Pki {
    /// A server certificate for `names` (the first is the one clients check).
    pub fn new(names: Vec<String>) -> Pki {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        Pki {
            ca: ca.der().clone(),
            ca_pem: ca.pem(),
            cert: cert.der().clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
        }
    }

    /// A server certificate for `name` alone.
    pub fn for_name(name: &str) -> Pki {
        Pki::new(vec![name.to_string()])
    }

    /// A server certificate for `name` and `n` filler names `filler-<i>.<domain>`: a
    /// large certificate, so that the server's TLS flight needs several EAP-TTLS
    /// fragments (and RADIUS several EAP-Message attributes each), as a real chain does.
    pub fn large(name: &str, n: usize, domain: &str) -> Pki {
        let mut names = vec![name.to_string()];
        names.extend((0..n).map(|i| format!("filler-{i}.{domain}")));
        Pki::new(names)
    }

    /// The server's chain: its certificate, then the CA's.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert.clone(), self.ca.clone()]
    }

    /// The server's chain, PEM.
    pub fn chain_pem(&self) -> String {
        format!("{}{}", self.cert_pem, self.ca_pem)
    }

    /// The server's private key.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// Writes the server's chain to `cert` and its key to `key` (PEM).
    pub fn write_server(&self, cert: &Path, key: &Path) {
        std::fs::write(cert, self.chain_pem()).expect("write the certificate");
        std::fs::write(key, &self.key_pem).expect("write the key");
    }
}

/// Trust anchors holding only `ca`.
pub fn roots(ca: &CertificateDer<'static>) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).expect("a CA certificate");
    roots
}
