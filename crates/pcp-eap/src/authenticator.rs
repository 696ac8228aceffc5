//! The EAP-TTLS authenticator (PCP server side) with the embedded back end: the server's
//! certificate and key, and a credentials file of Argon2 hashes checked against the PAP
//! user name and password received inside the tunnel.

use std::path::Path;
use std::sync::Arc;

use pcp_auth::eap::{AuthStep, EapAuthenticator};
use rustls::ServerConnection;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::credentials::{Credentials, CredentialsError};
use crate::packet::{self, Packet};
use crate::tls;
use crate::ttls::{self, Frame, Incoming, Outgoing, Reassembly};

/// Why the embedded back end cannot start.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The certificate or key file.
    #[error("{file}: {reason}")]
    Pem {
        /// The file.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// The credentials file.
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    /// rustls refused the certificate and key.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// The embedded EAP-TTLS back end: makes one [`TtlsAuthenticator`] per conversation.
#[derive(Debug, Clone)]
pub struct Embedded {
    tls: Arc<rustls::ServerConfig>,
    credentials: Arc<Credentials>,
}

impl Embedded {
    /// From a certificate chain, its key and the credentials.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        credentials: Credentials,
    ) -> Result<Embedded, BackendError> {
        let mut tls = rustls::ServerConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(tls::VERSIONS)?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        // Full handshakes only, no session resumption. A peer resuming a TTLS session
        // skips phase 2 (RFC 5281, "Session Resumption"; wpa_supplicant does), so the server would have
        // to remember who authenticated on that session — but rustls caches a TLS 1.2
        // session when the handshake completes, before the inner identity is known.
        // Resuming anyway made every re-authentication of wpa_supplicant fail (found
        // with `eapol_test -r 1`). FreeRADIUS's default (`cache { enable = no }`) too.
        tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        tls.send_tls13_tickets = 0;
        Ok(Embedded {
            tls: Arc::new(tls),
            credentials: Arc::new(credentials),
        })
    }

    /// From PEM files: certificate chain, private key, and the credentials file.
    pub fn load(cert: &Path, key: &Path, credentials: &Path) -> Result<Embedded, BackendError> {
        let pem = |p: &Path, e: String| BackendError::Pem {
            file: p.display().to_string(),
            reason: e,
        };
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| pem(cert, e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem(cert, e.to_string()))?;
        if chain.is_empty() {
            return Err(pem(cert, "no certificate".into()));
        }
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| pem(key, e.to_string()))?;
        Embedded::new(chain, key_der, Credentials::load(credentials)?)
    }

    /// Whether the credentials list `user`.
    pub fn knows(&self, user: &str) -> bool {
        self.credentials.contains(user)
    }

    /// An authenticator for one conversation.
    pub fn authenticator(&self) -> TtlsAuthenticator {
        TtlsAuthenticator {
            tls: self.tls.clone(),
            credentials: self.credentials.clone(),
            id: 0,
            conn: None,
            out: Outgoing::default(),
            inc: Incoming::default(),
            admission: None,
            attempted: None,
        }
    }
}

/// Whether an identity may have its password checked now (a failed-attempt limit).
pub type Admission = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// One EAP-TTLS/PAP conversation, authenticator side.
pub struct TtlsAuthenticator {
    tls: Arc<rustls::ServerConfig>,
    credentials: Arc<Credentials>,
    id: u8,
    conn: Option<ServerConnection>,
    out: Outgoing,
    inc: Incoming,
    /// Asked before a password is checked; a refusal fails the attempt unchecked.
    admission: Option<Admission>,
    /// The inner User-Name of the last attempt, and whether admission refused it.
    attempted: Option<(String, bool)>,
}

impl std::fmt::Debug for TtlsAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TtlsAuthenticator")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl TtlsAuthenticator {
    /// Sets the check made before each password verification (the caller's
    /// failed-attempt limits).
    pub fn set_admission(&mut self, admission: Option<Admission>) {
        self.admission = admission;
    }

    /// The inner identity of the last password check or refusal, and whether the
    /// admission check refused it (then its password was not checked).
    pub fn attempted(&self) -> Option<(&str, bool)> {
        self.attempted.as_ref().map(|(u, r)| (u.as_str(), *r))
    }

    /// Fails the conversation now (EAP-Failure for the outstanding request), e.g.
    /// because its source may not try again yet.
    pub fn refuse(&mut self) -> AuthStep {
        self.fail()
    }

    fn request(&mut self, typ: u8, data: &[u8]) -> AuthStep {
        self.id = self.id.wrapping_add(1);
        AuthStep::Request(
            Packet {
                code: packet::REQUEST,
                id: self.id,
                typ: Some(typ),
                data,
            }
            .to_vec(),
        )
    }

    fn fail(&mut self) -> AuthStep {
        AuthStep::Failure {
            packet: packet::failure(self.id),
        }
    }

    fn ttls(&mut self, f: &Frame) -> AuthStep {
        if self.conn.is_none() {
            return AuthStep::Discard;
        }
        if f.data.is_empty() {
            if self.out.pending() {
                let frag = self.out.next_fragment();
                return self.request(packet::TYPE_TTLS, &frag);
            }
            // The peer has nothing to say while we wait for its PAP AVPs.
            return self.fail();
        }
        let msg = match self.inc.add(f) {
            Reassembly::More => return self.request(packet::TYPE_TTLS, &[0]),
            Reassembly::Invalid => return self.fail(),
            Reassembly::Done(m) => m,
        };
        let Some(conn) = self.conn.as_mut() else {
            return AuthStep::Discard;
        };
        if tls::feed(conn, &msg).is_err() {
            return self.fail();
        }
        if !conn.is_handshaking() {
            let plain = tls::plaintext(conn);
            if !plain.is_empty() {
                return self.inner(&plain);
            }
        }
        let data = tls::drain(conn);
        if data.is_empty() {
            return self.request(packet::TYPE_TTLS, &[0]);
        }
        self.out.set(data);
        let frag = self.out.next_fragment();
        self.request(packet::TYPE_TTLS, &frag)
    }

    /// The PAP AVPs inside the tunnel: check them against the credentials.
    fn inner(&mut self, plain: &[u8]) -> AuthStep {
        let Some(avps) = ttls::parse_avps(plain) else {
            return self.fail();
        };
        let find = |code| {
            avps.iter()
                .find(|(c, v, _)| *c == code && v.is_none())
                .map(|(_, _, d)| *d)
        };
        let (Some(user), Some(pw)) = (find(ttls::AVP_USER_NAME), find(ttls::AVP_USER_PASSWORD))
        else {
            return self.fail();
        };
        // RFC 5281 §11.2.5: the password is NUL-padded to 16 octets.
        let end = pw.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        let Ok(user) = std::str::from_utf8(user) else {
            return self.fail();
        };
        let admitted = self.admission.as_ref().is_none_or(|f| f(user));
        self.attempted = Some((user.to_string(), !admitted));
        if !admitted {
            return self.fail();
        }
        if !self.credentials.verify(user, &pw[..end]) {
            return self.fail();
        }
        let msk = self.conn.as_ref().and_then(|c| tls::msk(c));
        match msk {
            Some(msk) => AuthStep::Success {
                packet: packet::success(self.id),
                msk,
                identity: user.to_string(),
            },
            None => self.fail(),
        }
    }
}

impl TtlsAuthenticator {
    /// Starts a conversation whose EAP-Request/Identity someone else sent — a NAS in
    /// front of a RADIUS server (RFC 3579 §2.1) — with the peer's EAP-Response/Identity,
    /// whatever its identifier: the EAP-TTLS Start that follows it, or `Discard` for
    /// anything but an identity response.
    pub fn begin(&mut self, identity_response: &[u8]) -> AuthStep {
        match Packet::parse(identity_response) {
            Ok(p) if p.code == packet::RESPONSE && p.typ == Some(packet::TYPE_IDENTITY) => {
                self.start();
                self.id = p.id;
                self.receive(identity_response)
            }
            _ => AuthStep::Discard,
        }
    }
}

impl EapAuthenticator for TtlsAuthenticator {
    fn start(&mut self) -> Vec<u8> {
        self.conn = None;
        self.attempted = None;
        self.out = Outgoing::default();
        self.inc = Incoming::default();
        match self.request(packet::TYPE_IDENTITY, &[]) {
            AuthStep::Request(p) => p,
            _ => Vec::new(),
        }
    }

    fn receive(&mut self, b: &[u8]) -> AuthStep {
        let Ok(p) = Packet::parse(b) else {
            return AuthStep::Discard;
        };
        if p.code != packet::RESPONSE || p.id != self.id {
            return AuthStep::Discard;
        }
        match p.typ {
            Some(packet::TYPE_IDENTITY) if self.conn.is_none() => {
                match ServerConnection::new(self.tls.clone()) {
                    Ok(c) => self.conn = Some(c),
                    Err(_) => return self.fail(),
                }
                self.request(packet::TYPE_TTLS, &[ttls::FLAG_S])
            }
            Some(packet::TYPE_TTLS) => match Frame::parse(p.data) {
                Some(f) => self.ttls(&f),
                None => AuthStep::Discard,
            },
            // A Nak: the peer does not do EAP-TTLS, the only method offered.
            Some(packet::TYPE_NAK) => self.fail(),
            _ => AuthStep::Discard,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};
    use rustls::pki_types::{PrivatePkcs8KeyDer, ServerName};

    /// Regression (eapol_test -r): a second handshake from the same TLS client is a
    /// full one. A resumed session lets wpa_supplicant skip phase 2, and the server
    /// would have no inner identity to authenticate.
    #[test]
    fn sessions_are_never_resumed() {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["aaa.example".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let backend = Embedded::new(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            Credentials::default(),
        )
        .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(tls::VERSIONS)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let store = Arc::new(rustls::client::ClientSessionMemoryCache::new(8));
        config.resumption = rustls::client::Resumption::store(store.clone());
        let client = Arc::new(config);
        let name = ServerName::try_from("aaa.example").unwrap();
        for _ in 0..2 {
            let mut c = rustls::ClientConnection::new(client.clone(), name.clone()).unwrap();
            let mut s = ServerConnection::new(backend.tls.clone()).unwrap();
            while c.is_handshaking() || s.is_handshaking() {
                tls::feed(&mut s, &tls::drain(&mut c)).unwrap();
                tls::feed(&mut c, &tls::drain(&mut s)).unwrap();
            }
            assert_eq!(c.handshake_kind(), Some(rustls::HandshakeKind::Full));
        }
        // The client keeps sessions to offer (with the server's session cache on, the
        // second handshake was `Resumed`); the server gives none to keep.
        use rustls::client::ClientSessionStore;
        assert!(store.tls12_session(&name).is_none());
    }
}
