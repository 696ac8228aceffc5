//! Errors of the async and blocking APIs. Each says what to do about it.

use std::net::SocketAddr;
use std::time::Duration;

use pcp_proto::ResultCode;

use crate::core::{RequestError, result_name};
use crate::gateway::GatewayError;

/// What went wrong, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// PCP authentication (RFC 7652) did not succeed.
    #[error("PCP authentication failed: {}", auth_hint(*.0))]
    Authentication(pcp_auth::client::Failure),
    /// The authentication settings cannot be used (CA file, server name).
    #[error(transparent)]
    AuthenticationSetup(#[from] crate::AuthSetupError),
    /// The request itself cannot be made.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// No server address was given and none could be discovered.
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    /// A socket could not be opened.
    #[error("cannot open a UDP socket on {addr}: {source}; pick another local address or port")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The route to the server could not be determined.
    #[error(
        "cannot find a local address that reaches {server}: {source}; check the server address or pass a local address to bind"
    )]
    NoRoute {
        /// The server.
        server: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The server refused the mapping for good.
    #[error("the server refused: {} ({})", result_name(*.result), result_hint(*.result))]
    Refused {
        /// The result code.
        result: ResultCode,
    },
    /// The server refused for now; the client keeps asking in the background.
    #[error("the server answered {} ({}); the client asks again in {}s", result_name(*.result), result_hint(*.result), .retry_in.as_secs())]
    Temporary {
        /// The result code.
        result: ResultCode,
        /// When the client asks again.
        retry_in: Duration,
    },
    /// No answer within the retransmission limits (MRC/MRD) or the caller's timeout.
    #[error(
        "no answer from {server}: check that a PCP server listens there (UDP) and that nothing filters it"
    )]
    NoResponse {
        /// The server.
        server: SocketAddr,
    },
    /// The server speaks only NAT-PMP, which cannot make this mapping.
    #[error(
        "{server} speaks only NAT-PMP, which maps UDP and TCP ports only: use MAP for UDP or TCP"
    )]
    NatPmpOnly {
        /// The server.
        server: SocketAddr,
    },
    /// The mapping was deleted or lost before the awaited event.
    #[error("the mapping is gone ({0})")]
    Gone(String),
    /// The client's background task has stopped.
    #[error("the PCP client has shut down: create a new one")]
    Closed,
}

fn auth_hint(f: pcp_auth::client::Failure) -> &'static str {
    use pcp_auth::client::Failure as F;
    match f {
        F::AuthenticationFailed => {
            "the server refused the identity or password (AUTHENTICATION_FAILED)"
        }
        F::AuthorizationFailed => {
            "authenticated, but this identity may not use the server (AUTHORIZATION_FAILED)"
        }
        F::DowngradeDetected => {
            "the server saw its algorithm list altered on the way (DOWNGRADE_ATTACK_DETECTED): someone is in the path"
        }
        F::NoCommonAlgorithm => "the server offers no PRF or MAC algorithm this client has",
        F::Eap => {
            "the EAP method gave up: check that the server's certificate is signed by the CA given and valid for the server name"
        }
        F::Timeout => {
            "no answer to the PA messages: check that the server does PCP authentication and nothing filters UDP"
        }
    }
}

/// What a result code usually means for the user.
pub fn result_hint(r: ResultCode) -> &'static str {
    match r {
        ResultCode::Success => "success",
        ResultCode::UnsuppVersion => "the server does not speak this PCP version",
        ResultCode::NotAuthorized => {
            "the server's policy refuses it, or another client holds this mapping with another nonce"
        }
        ResultCode::MalformedRequest => "the server could not parse the request",
        ResultCode::UnsuppOpcode => "the server does not support this opcode",
        ResultCode::UnsuppOption => "the server does not support a mandatory option (THIRD_PARTY?)",
        ResultCode::MalformedOption => "the server rejected an option as malformed",
        ResultCode::NetworkFailure => "the server has no external connectivity right now",
        ResultCode::NoResources => "the server is out of ports or memory; try later",
        ResultCode::UnsuppProtocol => "the server does not map this protocol",
        ResultCode::UserExQuota => "you hold as many mappings as allowed: delete some",
        ResultCode::CannotProvideExternal => {
            "the suggested external address/port is not available; drop PREFER_FAILURE or suggest another"
        }
        ResultCode::AddressMismatch => {
            "a NAT sits between this host and the server: run the client behind the PCP server's NAT only"
        }
        ResultCode::ExcessiveRemotePeers => "the server cannot install that many FILTERs",
        ResultCode::AuthenticationRequired => {
            "the server requires PCP authentication: configure an identity, password and CA"
        }
        ResultCode::AuthenticationFailed => {
            "PCP authentication failed: check the identity, password, CA and server name"
        }
        ResultCode::AuthorizationFailed => {
            "authenticated, but this identity may not use the server: ask its operator"
        }
        ResultCode::DowngradeAttackDetected => {
            "the algorithm lists were tampered with on the way: someone is in the path"
        }
        ResultCode::UnknownSessionId => {
            "the server lost the PCP session; the client authenticates again"
        }
        _ => "see RFC 6887 §7.4",
    }
}
