//! What the PA session needs from an EAP method (RFC 3748), one conversation at a time.
//! The session carries whole EAP packets in EAP_PAYLOAD options; the method does its own
//! fragmentation (EAP-TTLS) so that each packet fits a PA message
//! ([`MAX_EAP_PACKET`]).

/// The largest EAP packet a method may hand to the session. A PA message is at most 1100
/// octets: 24 header + 8 body, NONCE 8, one PRF 8 and one MAC_ALGORITHM 8 (the server's
/// first message offers more, see below), the PA_AUTHENTICATION_TAG 24 and the
/// EAP_PAYLOAD header 4 leave 1020; 64 octets stay for the server's longer algorithm
/// lists and an ID_INDICATOR.
pub const MAX_EAP_PACKET: usize = 956;

/// What the peer (client side) does with one EAP packet from the authenticator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerStep {
    /// Send this EAP response.
    Respond(Vec<u8>),
    /// EAP-Success arrived and the method finished with keys ([`EapPeer::msk`]).
    Success,
    /// EAP-Failure arrived, or the method cannot go on (e.g. the server's certificate
    /// did not validate): the authentication failed.
    Failure,
    /// Not a packet for this conversation (wrong identifier, garbage): ignore it.
    Discard,
}

/// The EAP peer of the PCP client.
pub trait EapPeer {
    /// Processes one EAP packet (a request, EAP-Success or EAP-Failure).
    fn receive(&mut self, packet: &[u8]) -> PeerStep;
    /// The Master Session Key, once the method succeeded (at least 64 octets).
    fn msk(&self) -> Option<Vec<u8>>;
    /// Forgets the conversation, for a new authentication or a re-authentication.
    fn restart(&mut self);
}

/// What the authenticator (server side) does with one EAP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthStep {
    /// Send this EAP request.
    Request(Vec<u8>),
    /// The peer is authenticated: send `packet` (EAP-Success); `msk` keys the session.
    Success {
        /// The EAP-Success packet.
        packet: Vec<u8>,
        /// The Master Session Key.
        msk: Vec<u8>,
        /// The authenticated identity (the inner identity of a tunnelled method).
        identity: String,
    },
    /// The peer is not authenticated: send `packet` (EAP-Failure).
    Failure {
        /// The EAP-Failure packet.
        packet: Vec<u8>,
    },
    /// Not a response to the outstanding request: ignore it.
    Discard,
    /// The response went on to a back end (RADIUS pass-through); its answer comes
    /// later, through [`crate::server::Server::resume`]. Meanwhile the session
    /// acknowledges the client's message with a PA-Acknowledgement (RFC 7652 §3.1.3),
    /// and answers its copies with that again.
    Pending,
}

/// The EAP authenticator of the PCP server, one per PA conversation.
pub trait EapAuthenticator {
    /// The first EAP request of a conversation.
    fn start(&mut self) -> Vec<u8>;
    /// Processes one EAP response.
    fn receive(&mut self, packet: &[u8]) -> AuthStep;
    /// Whether the session answers [`AuthStep::Pending`] with a PA-Acknowledgement. A
    /// back end that answers within a fraction of the client's retransmission time (a
    /// local worker thread) says no: the answer itself follows at once, and an
    /// acknowledgement would double the PA messages of the exchange.
    fn acknowledge_pending(&self) -> bool {
        true
    }
}

impl<P: EapPeer + ?Sized> EapPeer for Box<P> {
    fn receive(&mut self, packet: &[u8]) -> PeerStep {
        (**self).receive(packet)
    }
    fn msk(&self) -> Option<Vec<u8>> {
        (**self).msk()
    }
    fn restart(&mut self) {
        (**self).restart()
    }
}
