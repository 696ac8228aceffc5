//! PCP authentication (RFC 7652) settings of the core. The PA session itself is
//! `pcp_auth::client::Client`; the core owns one and decides what every other request
//! does around it (see the [module docs](super) for the rules).

use std::sync::Arc;

use pcp_auth::eap::EapPeer;
use serde::Serialize;

/// The PA session the core drives.
pub(crate) type PaClient = pcp_auth::client::Client<Box<dyn EapPeer + Send>>;

/// How the client authenticates (RFC 7652): the EAP peer to use, and the PA session's
/// timing. Put it in [`Config::authentication`](super::Config::authentication) (or the
/// tokio/blocking `ClientOptions::authentication`).
///
/// [`Authentication::ttls`] and [`Authentication::ttls_with_roots`] make the usual
/// EAP-TTLS/PAP one from an identity, a password, the CA and the server's name;
/// [`Authentication::new`] takes any [`EapPeer`].
#[derive(Clone)]
pub struct Authentication {
    make_peer: Arc<dyn Fn() -> Box<dyn EapPeer + Send> + Send + Sync>,
    /// Retransmission of PA messages (RFC 7652 §6.3: RFC 6887 timing; the exchange
    /// fails after its MRD, 120 s by default, and is started again while the client has
    /// mappings to keep).
    pub retransmit: pcp_auth::RetransmitConfig,
    /// Re-authenticate at this share of the session lifetime, in percent (1–99,
    /// default 80).
    pub reauth_percent: u8,
    /// Answer a server's unsolicited PA-Server (server-initiated authentication, RFC
    /// 7652 §3.1.2). On by default.
    pub accept_server_initiated: bool,
}

impl Authentication {
    /// Authenticates with the EAP peer `make_peer` makes (called once per client).
    pub fn new(make_peer: impl Fn() -> Box<dyn EapPeer + Send> + Send + Sync + 'static) -> Self {
        let d = pcp_auth::client::ClientConfig::new(std::net::Ipv4Addr::UNSPECIFIED.into());
        Authentication {
            make_peer: Arc::new(make_peer),
            retransmit: d.retransmit,
            reauth_percent: d.reauth_percent,
            accept_server_initiated: d.accept_server_initiated,
        }
    }

    /// Sets the PA retransmission parameters.
    pub fn retransmit(mut self, r: pcp_auth::RetransmitConfig) -> Self {
        self.retransmit = r;
        self
    }

    /// A new PA session for a client at `client_addr`, seeded for determinism.
    pub(crate) fn session(&self, client_addr: std::net::IpAddr, seed: u64) -> PaClient {
        use rand::SeedableRng;
        let mut cfg = pcp_auth::client::ClientConfig::new(client_addr);
        cfg.retransmit = self.retransmit;
        cfg.reauth_percent = self.reauth_percent;
        cfg.accept_server_initiated = self.accept_server_initiated;
        pcp_auth::client::Client::with_rng(
            cfg,
            (self.make_peer)(),
            rand::rngs::StdRng::seed_from_u64(seed),
        )
    }
}

impl std::fmt::Debug for Authentication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authentication")
            .field("retransmit", &self.retransmit)
            .field("reauth_percent", &self.reauth_percent)
            .field("accept_server_initiated", &self.accept_server_initiated)
            .finish_non_exhaustive()
    }
}

/// Equal when made from the same peer factory with the same settings.
impl PartialEq for Authentication {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.make_peer, &other.make_peer)
            && self.retransmit == other.retransmit
            && self.reauth_percent == other.reauth_percent
            && self.accept_server_initiated == other.accept_server_initiated
    }
}

impl Eq for Authentication {}

/// Why (re-)authentication failed: `pcp_auth`'s [`Failure`](pcp_auth::client::Failure),
/// serializable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthFailure {
    /// The server said AUTHENTICATION_FAILED (wrong identity or password).
    AuthenticationFailed,
    /// The server said AUTHORIZATION_FAILED (authenticated, but not allowed to use it).
    AuthorizationFailed,
    /// The server said DOWNGRADE_ATTACK_DETECTED.
    DowngradeDetected,
    /// The server offers no PRF or MAC algorithm this client implements.
    NoCommonAlgorithm,
    /// This client's EAP method gave up (e.g. the server's certificate is not valid for
    /// the configured CA and name).
    Eap,
    /// No answer within the PA retransmission limit (MRD).
    Timeout,
}

impl From<pcp_auth::client::Failure> for AuthFailure {
    fn from(f: pcp_auth::client::Failure) -> Self {
        use pcp_auth::client::Failure as F;
        match f {
            F::AuthenticationFailed => AuthFailure::AuthenticationFailed,
            F::AuthorizationFailed => AuthFailure::AuthorizationFailed,
            F::DowngradeDetected => AuthFailure::DowngradeDetected,
            F::NoCommonAlgorithm => AuthFailure::NoCommonAlgorithm,
            F::Eap => AuthFailure::Eap,
            F::Timeout => AuthFailure::Timeout,
        }
    }
}

impl From<AuthFailure> for pcp_auth::client::Failure {
    fn from(f: AuthFailure) -> Self {
        use pcp_auth::client::Failure as F;
        match f {
            AuthFailure::AuthenticationFailed => F::AuthenticationFailed,
            AuthFailure::AuthorizationFailed => F::AuthorizationFailed,
            AuthFailure::DowngradeDetected => F::DowngradeDetected,
            AuthFailure::NoCommonAlgorithm => F::NoCommonAlgorithm,
            AuthFailure::Eap => F::Eap,
            AuthFailure::Timeout => F::Timeout,
        }
    }
}

impl AuthFailure {
    /// The result code a mapping lost to this failure reports
    /// ([`LostReason::Refused`](super::LostReason::Refused)).
    pub fn result_code(self) -> pcp_proto::ResultCode {
        use pcp_proto::ResultCode as R;
        match self {
            AuthFailure::AuthorizationFailed => R::AuthorizationFailed,
            AuthFailure::DowngradeDetected => R::DowngradeAttackDetected,
            _ => R::AuthenticationFailed,
        }
    }
}

/// Why an authenticated session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionEnd {
    /// The server sent SESSION_TERMINATED (RFC 7652 §3.3).
    ByServer,
    /// This client ended it ([`Client::end_session`](super::Client::end_session)).
    ByClient,
    /// Its lifetime ran out before a re-authentication succeeded.
    Expired,
    /// The server no longer knows it (UNKNOWN_SESSION_ID or AUTHENTICATION_REQUIRED to a
    /// tagged request, e.g. after a restart, RFC 7652 §3.2).
    Lost,
}

impl From<pcp_auth::client::Ended> for SessionEnd {
    fn from(e: pcp_auth::client::Ended) -> Self {
        use pcp_auth::client::Ended as E;
        match e {
            E::ByServer => SessionEnd::ByServer,
            E::ByClient => SessionEnd::ByClient,
            E::Expired => SessionEnd::Expired,
            E::Lost => SessionEnd::Lost,
        }
    }
}
