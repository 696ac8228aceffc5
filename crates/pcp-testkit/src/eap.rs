//! EAP-TTLS/PAP fixtures: credentials, the embedded back end, a peer, and the files
//! and `[auth]` section of a pcpd that authenticates with them.

use std::path::{Path, PathBuf};

use pcp_eap::rustls::pki_types::{CertificateDer, ServerName};
use pcp_eap::{Credentials, Embedded, PeerConfig, TtlsPeer, hash_password};

use crate::tls::{Pki, roots};

/// The password the fixtures give their user.
pub const PASSWORD: &str = "correct horse";

/// A credentials-file line for `user` with `password` (Argon2), newline included.
pub fn users_line(user: &str, password: &[u8]) -> String {
    format!(
        "{user}:{}\n",
        hash_password(password).expect("hash a password")
    )
}

/// Credentials holding `user` with `password`.
pub fn credentials(user: &str, password: &[u8]) -> Credentials {
    Credentials::parse(&users_line(user, password), "test").expect("credentials")
}

/// The embedded EAP-TTLS back end with `pki`'s chain and key and alice's
/// [`PASSWORD`].
pub fn embedded(pki: &Pki) -> Embedded {
    Embedded::new(
        pki.chain(),
        pki.key(),
        credentials("alice", PASSWORD.as_bytes()),
    )
    .expect("an embedded back end")
}

/// An EAP-TTLS/PAP peer (outer identity `anonymous`) for `user` with `password`,
/// trusting only `ca` for `server_name`.
pub fn ttls_peer(
    ca: &CertificateDer<'static>,
    server_name: &str,
    user: &str,
    password: &[u8],
) -> TtlsPeer {
    TtlsPeer::new(PeerConfig {
        outer_identity: "anonymous".into(),
        username: user.into(),
        password: password.to_vec(),
        server_name: ServerName::try_from(server_name.to_string()).expect("a server name"),
        roots: roots(ca),
    })
    .expect("a TTLS peer")
}

/// The files pcpd's embedded back end reads, in one directory: `cert.pem` (the chain),
/// `key.pem`, `ca.pem` (for clients) and `users`.
pub struct AuthFiles {
    /// The server's chain.
    pub cert: PathBuf,
    /// The server's key.
    pub key: PathBuf,
    /// The CA certificate, PEM (what a client trusts).
    pub ca: PathBuf,
    /// The credentials file.
    pub users: PathBuf,
    /// The CA certificate.
    pub ca_der: CertificateDer<'static>,
}

impl AuthFiles {
    /// A fresh CA and server certificate for `server_name` and the credentials file
    /// `users` (see [`users_line`]), written into `dir`.
    pub fn write(dir: &Path, server_name: &str, users: &str) -> AuthFiles {
        let files = AuthFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            ca: dir.join("ca.pem"),
            users: dir.join("users"),
            ca_der: CertificateDer::from(Vec::new()),
        };
        std::fs::write(&files.users, users).expect("write the credentials");
        files.renew(server_name)
    }

    /// A new CA and server certificate for `server_name` written over the old ones.
    pub fn renew(mut self, server_name: &str) -> AuthFiles {
        let pki = Pki::for_name(server_name);
        pki.write_server(&self.cert, &self.key);
        std::fs::write(&self.ca, &pki.ca_pem).expect("write the CA");
        self.ca_der = pki.ca;
        self
    }

    /// The `[auth]` section: `default = "<mode>"` and these files (more keys may
    /// follow).
    pub fn section(&self, mode: &str) -> String {
        format!(
            "[auth]\ndefault = \"{mode}\"\ncertificate = \"{}\"\nkey = \"{}\"\ncredentials = \"{}\"\n",
            self.cert.display(),
            self.key.display(),
            self.users.display()
        )
    }
}
