//! PCP result codes (RFC 6887 §7.4, RFC 7652 §5.1).

/// A PCP result code. Codes this crate does not know are kept in [`ResultCode::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResultCode {
    /// 0: success.
    Success,
    /// 1: the version is not supported (long lifetime).
    UnsuppVersion,
    /// 2: operation disabled for this client or refused by security policy (long).
    NotAuthorized,
    /// 3: the request could not be parsed (long).
    MalformedRequest,
    /// 4: the opcode is not supported (long).
    UnsuppOpcode,
    /// 5: a mandatory-to-process option is not supported (long).
    UnsuppOption,
    /// 6: a mandatory-to-process option is malformed (long).
    MalformedOption,
    /// 7: the server or device has a network failure (short).
    NetworkFailure,
    /// 8: out of resources, e.g. mapping table full (short).
    NoResources,
    /// 9: the protocol is not supported (long).
    UnsuppProtocol,
    /// 10: the user exceeded their port quota (short).
    UserExQuota,
    /// 11: the suggested external address/port cannot be provided (short).
    CannotProvideExternal,
    /// 12: the client's address does not match the packet's source (long).
    AddressMismatch,
    /// 13: too many remote peers (long).
    ExcessiveRemotePeers,
    /// 14: RFC 7652 INITIATION.
    Initiation,
    /// 15: RFC 7652 AUTHENTICATION_REQUIRED.
    AuthenticationRequired,
    /// 16: RFC 7652 AUTHENTICATION_FAILED.
    AuthenticationFailed,
    /// 17: RFC 7652 AUTHENTICATION_SUCCEEDED.
    AuthenticationSucceeded,
    /// 18: RFC 7652 AUTHORIZATION_FAILED.
    AuthorizationFailed,
    /// 19: RFC 7652 SESSION_TERMINATED.
    SessionTerminated,
    /// 20: RFC 7652 UNKNOWN_SESSION_ID.
    UnknownSessionId,
    /// 21: RFC 7652 DOWNGRADE_ATTACK_DETECTED.
    DowngradeAttackDetected,
    /// 22: RFC 7652 AUTHENTICATION_REQUEST.
    AuthenticationRequest,
    /// 23: RFC 7652 AUTHENTICATION_REPLY.
    AuthenticationReply,
    /// Any other value, kept as received.
    Unknown(u8),
}

const KNOWN: [ResultCode; 24] = [
    ResultCode::Success,
    ResultCode::UnsuppVersion,
    ResultCode::NotAuthorized,
    ResultCode::MalformedRequest,
    ResultCode::UnsuppOpcode,
    ResultCode::UnsuppOption,
    ResultCode::MalformedOption,
    ResultCode::NetworkFailure,
    ResultCode::NoResources,
    ResultCode::UnsuppProtocol,
    ResultCode::UserExQuota,
    ResultCode::CannotProvideExternal,
    ResultCode::AddressMismatch,
    ResultCode::ExcessiveRemotePeers,
    ResultCode::Initiation,
    ResultCode::AuthenticationRequired,
    ResultCode::AuthenticationFailed,
    ResultCode::AuthenticationSucceeded,
    ResultCode::AuthorizationFailed,
    ResultCode::SessionTerminated,
    ResultCode::UnknownSessionId,
    ResultCode::DowngradeAttackDetected,
    ResultCode::AuthenticationRequest,
    ResultCode::AuthenticationReply,
];

impl From<u8> for ResultCode {
    fn from(value: u8) -> Self {
        KNOWN
            .get(usize::from(value))
            .copied()
            .unwrap_or(ResultCode::Unknown(value))
    }
}

impl From<ResultCode> for u8 {
    fn from(code: ResultCode) -> u8 {
        match code {
            ResultCode::Unknown(v) => v,
            known => KNOWN.iter().position(|k| *k == known).unwrap_or(0) as u8,
        }
    }
}

impl ResultCode {
    /// The numeric value on the wire.
    pub fn to_u8(self) -> u8 {
        self.into()
    }

    /// The RFC's upper-case name, e.g. `"USER_EX_QUOTA"`.
    pub fn name(self) -> &'static str {
        match self {
            ResultCode::Success => "SUCCESS",
            ResultCode::UnsuppVersion => "UNSUPP_VERSION",
            ResultCode::NotAuthorized => "NOT_AUTHORIZED",
            ResultCode::MalformedRequest => "MALFORMED_REQUEST",
            ResultCode::UnsuppOpcode => "UNSUPP_OPCODE",
            ResultCode::UnsuppOption => "UNSUPP_OPTION",
            ResultCode::MalformedOption => "MALFORMED_OPTION",
            ResultCode::NetworkFailure => "NETWORK_FAILURE",
            ResultCode::NoResources => "NO_RESOURCES",
            ResultCode::UnsuppProtocol => "UNSUPP_PROTOCOL",
            ResultCode::UserExQuota => "USER_EX_QUOTA",
            ResultCode::CannotProvideExternal => "CANNOT_PROVIDE_EXTERNAL",
            ResultCode::AddressMismatch => "ADDRESS_MISMATCH",
            ResultCode::ExcessiveRemotePeers => "EXCESSIVE_REMOTE_PEERS",
            ResultCode::Initiation => "INITIATION",
            ResultCode::AuthenticationRequired => "AUTHENTICATION_REQUIRED",
            ResultCode::AuthenticationFailed => "AUTHENTICATION_FAILED",
            ResultCode::AuthenticationSucceeded => "AUTHENTICATION_SUCCEEDED",
            ResultCode::AuthorizationFailed => "AUTHORIZATION_FAILED",
            ResultCode::SessionTerminated => "SESSION_TERMINATED",
            ResultCode::UnknownSessionId => "UNKNOWN_SESSION_ID",
            ResultCode::DowngradeAttackDetected => "DOWNGRADE_ATTACK_DETECTED",
            ResultCode::AuthenticationRequest => "AUTHENTICATION_REQUEST",
            ResultCode::AuthenticationReply => "AUTHENTICATION_REPLY",
            ResultCode::Unknown(_) => "UNKNOWN",
        }
    }

    /// Whether RFC 6887 §7.4 classes this error as short-lifetime (7, 8, 10): the
    /// condition should clear soon, so a client may retry after a short wait.
    ///
    /// CANNOT_PROVIDE_EXTERNAL (11) is not included: its lifetime "depends on the
    /// reason for the failure", which only the server knows.
    pub fn is_short_lifetime_error(self) -> bool {
        matches!(
            self,
            ResultCode::NetworkFailure | ResultCode::NoResources | ResultCode::UserExQuota
        )
    }
}

impl std::fmt::Display for ResultCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResultCode::Unknown(v) => write!(f, "UNKNOWN({v})"),
            known => f.write_str(known.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_round_trips() {
        for v in 0..=255u8 {
            assert_eq!(u8::from(ResultCode::from(v)), v);
        }
        assert_eq!(ResultCode::from(13), ResultCode::ExcessiveRemotePeers);
        assert_eq!(ResultCode::from(24), ResultCode::Unknown(24));
    }

    #[test]
    fn short_and_long_errors() {
        assert!(ResultCode::UserExQuota.is_short_lifetime_error());
        assert!(!ResultCode::NotAuthorized.is_short_lifetime_error());
        assert!(!ResultCode::MalformedRequest.is_short_lifetime_error());
    }
}
