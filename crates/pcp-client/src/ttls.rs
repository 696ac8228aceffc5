//! The usual [`Authentication`]: EAP-TTLS/PAP (RFC 5281, the method RFC 7652 makes
//! mandatory) with `pcp_eap::TtlsPeer`, from an identity, a password, the CA that
//! signed the server's certificate, and the name that certificate must carry.

use std::path::{Path, PathBuf};

use pcp_eap::rustls::RootCertStore;
use pcp_eap::rustls::pki_types::pem::PemObject;
use pcp_eap::rustls::pki_types::{CertificateDer, ServerName};
use pcp_eap::{PeerConfig, TtlsPeer};

use crate::core::Authentication;

/// Why an EAP-TTLS [`Authentication`] could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// The CA file could not be read or holds something else than PEM certificates.
    #[error("{}: cannot read CA certificates: {reason}", .path.display())]
    CaFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The CA file holds no certificate.
    #[error("{}: no certificate in it (expected PEM \"BEGIN CERTIFICATE\" blocks)", .path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The server name is not a valid DNS name or IP address.
    #[error("server name {name:?}: {reason}")]
    ServerName {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the TLS configuration.
    #[error("TLS configuration: {0}")]
    Tls(String),
}

impl Authentication {
    /// EAP-TTLS/PAP as `identity` with `password`, trusting the CA certificates in the
    /// PEM file `ca_file`; the server's certificate must be valid for `server_name` (a
    /// DNS name or an IP address). The identity travels only inside the TLS tunnel
    /// (outside it the peer says "anonymous", RFC 7652 §8).
    ///
    /// ```no_run
    /// use pcp_client::core::Authentication;
    /// let auth = Authentication::ttls("alice", b"correct horse", "ca.pem", "pcp.example")?;
    /// # Ok::<(), pcp_client::AuthSetupError>(())
    /// ```
    pub fn ttls(
        identity: &str,
        password: &[u8],
        ca_file: impl AsRef<Path>,
        server_name: &str,
    ) -> Result<Authentication, AuthSetupError> {
        let path = ca_file.as_ref();
        let bad = |e: &dyn std::fmt::Display| AuthSetupError::CaFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))? {
            roots.add(c.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
        }
        if roots.is_empty() {
            return Err(AuthSetupError::NoCertificate {
                path: path.to_path_buf(),
            });
        }
        Authentication::ttls_with_roots(identity, password, roots, server_name)
    }

    /// [`Authentication::ttls`] with the trust anchors given directly.
    pub fn ttls_with_roots(
        identity: &str,
        password: &[u8],
        roots: RootCertStore,
        server_name: &str,
    ) -> Result<Authentication, AuthSetupError> {
        let name = ServerName::try_from(server_name.to_string()).map_err(|e| {
            AuthSetupError::ServerName {
                name: server_name.to_string(),
                reason: e.to_string(),
            }
        })?;
        let cfg = PeerConfig {
            outer_identity: "anonymous".into(),
            username: identity.to_string(),
            password: password.to_vec(),
            server_name: name,
            roots,
        };
        // Checked once here, so that making the peer later cannot fail.
        TtlsPeer::new(cfg.clone()).map_err(|e| AuthSetupError::Tls(e.to_string()))?;
        Ok(Authentication::new(move || {
            match TtlsPeer::new(cfg.clone()) {
                Ok(p) => Box::new(p),
                // The same configuration was accepted above; should rustls change its mind,
                // a peer that fails every conversation reports it (AuthFailure::Eap).
                Err(_) => Box::new(Refusing),
            }
        }))
    }
}

/// An EAP peer that fails at once.
struct Refusing;

impl pcp_auth::eap::EapPeer for Refusing {
    fn receive(&mut self, _: &[u8]) -> pcp_auth::eap::PeerStep {
        pcp_auth::eap::PeerStep::Failure
    }
    fn msk(&self) -> Option<Vec<u8>> {
        None
    }
    fn restart(&mut self) {}
}
