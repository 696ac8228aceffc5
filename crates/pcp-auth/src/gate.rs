//! The authentication gate in front of a PCP server core: per source prefix, whether
//! authentication is off, optional or required (RFC 7652, "If the networking environment
//! between the PCP client and the PCP server is not secure, PCP authentication MUST be
//! enabled"), and what that means for each datagram.
//!
//! Sans-IO and independent of the server core: [`Gate::inbound`] says what to do with a
//! datagram (serve it with the tag removed, answer with an error, or drop it), and
//! [`Gate::outbound`] tags the core's reply. PA messages go to the [`Server`] inside.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use pcp_proto::{Opcode, OptionCode, ResultCode, emit_error_response, remove_option};

use crate::Time;
use crate::eap::EapAuthenticator;
use crate::server::{Check, Discard, Server, Transmit};

/// What a prefix asks of its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// As a server without RFC 7652: AUTHENTICATION is UNSUPP_OPCODE, tagged requests
    /// UNSUPP_OPTION.
    Off,
    /// Authenticated and unauthenticated requests are both served; a tag, when present,
    /// must verify.
    Optional,
    /// Only requests with a valid tag are served; an untagged one gets
    /// AUTHENTICATION_REQUIRED.
    Required,
}

/// Modes per source prefix, longest prefix wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// Mode of sources no prefix matches.
    pub default: Mode,
    /// (prefix, mode) pairs.
    pub prefixes: Vec<(IpNet, Mode)>,
}

impl Rules {
    /// The mode for a source address.
    pub fn mode(&self, src: IpAddr) -> Mode {
        let src = src.to_canonical();
        self.prefixes
            .iter()
            .filter(|(p, _)| p.contains(&src))
            .max_by_key(|(p, _)| p.prefix_len())
            .map_or(self.default, |(_, m)| *m)
    }
}

/// What to do with a datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// Serve the request in `buf[..len]` with the server core (the tag, if any, is
    /// removed); pass its reply to [`Gate::outbound`] with `session`.
    Serve {
        /// Length of the request to serve.
        len: usize,
        /// The session that authenticated it, if any.
        session: Option<u32>,
        /// The authenticated identity, if any.
        identity: Option<std::sync::Arc<str>>,
    },
    /// Send this answer instead (AUTHENTICATION_REQUIRED, UNKNOWN_SESSION_ID).
    Answer(Vec<u8>),
    /// A PA message, handled: send what [`Gate::poll_transmit`] gives.
    Handled,
    /// Drop it silently.
    Drop,
}

/// Counters for the operator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GateStats {
    /// Requests whose tag verified.
    pub authenticated: u64,
    /// Untagged requests answered AUTHENTICATION_REQUIRED.
    pub required: u64,
    /// Tagged requests answered UNKNOWN_SESSION_ID.
    pub unknown_session: u64,
    /// Tagged requests dropped for a replayed sequence number.
    pub replayed: u64,
    /// Tagged requests dropped for a bad tag (MAC, key, client address, no SA yet).
    pub bad_tag: u64,
    /// PA messages handed to the session machine.
    pa_messages: u64,
}

impl GateStats {
    /// PA messages handed to the session machine.
    pub fn pa_messages(&self) -> u64 {
        self.pa_messages
    }
}

/// The gate: rules, the PA session server, counters.
#[derive(Debug)]
pub struct Gate<A, F> {
    /// Modes per prefix.
    pub rules: Rules,
    /// The PA sessions.
    pub server: Server<A, F>,
    /// Lifetime of AUTHENTICATION_REQUIRED answers (seconds): short, since the client
    /// can clear it at once by authenticating.
    pub required_lifetime: u32,
    /// Also start a server-initiated session when answering AUTHENTICATION_REQUIRED
    /// (RFC 7652 §3.1.2 "can reply with an unsolicited PA-Server").
    pub initiate: bool,
    stats: GateStats,
}

impl<A: EapAuthenticator, F: FnMut() -> A> Gate<A, F> {
    /// A gate with these rules in front of these sessions.
    pub fn new(rules: Rules, server: Server<A, F>) -> Gate<A, F> {
        Gate {
            rules,
            server,
            required_lifetime: 30,
            initiate: false,
            stats: GateStats::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> GateStats {
        self.stats
    }

    /// A datagram to send (PA messages).
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.server.poll_transmit()
    }

    /// Decides what to do with the PCP request in `buf[..len]` from `src`; `epoch` is
    /// what the server core would put in an answer to it.
    pub fn inbound(
        &mut self,
        now: Time,
        src: SocketAddr,
        epoch: u32,
        buf: &mut [u8],
        len: usize,
    ) -> Inbound {
        let serve = |len| Inbound::Serve {
            len,
            session: None,
            identity: None,
        };
        let Some(msg) = buf.get(..len) else {
            return Inbound::Drop;
        };
        // Responses, runts: the core drops them.
        if len < 2 || msg[1] & 0x80 != 0 {
            return serve(len);
        }
        let mode = self.rules.mode(src.ip());
        if mode == Mode::Off {
            return serve(len);
        }
        if msg[0] != pcp_proto::VERSION {
            // NAT-PMP (version 0) cannot authenticate: where authentication is required
            // it is not served. Other versions get UNSUPP_VERSION from the core.
            return if msg[0] == pcp_proto::NATPMP_VERSION && mode == Mode::Required {
                Inbound::Drop
            } else {
                serve(len)
            };
        }
        if Opcode::from_bits(msg[1]) == Opcode::Authentication {
            self.stats.pa_messages += 1;
            self.server.handle_at_epoch(now, src, epoch, msg);
            return Inbound::Handled;
        }
        match self.server.check_request(src.ip(), msg) {
            // §3.1.3: an untagged request from a client with a PA session is refused
            // even where authentication is optional (a stripped tag must not work).
            Check::Untagged
                if mode == Mode::Optional && !self.server.has_session_from(src.ip()) =>
            {
                serve(len)
            }
            Check::Untagged => {
                self.stats.required += 1;
                if self.initiate && !self.server.has_session_from(src.ip()) {
                    self.server.start_at_epoch(now, src, epoch);
                }
                self.answer(
                    msg,
                    ResultCode::AuthenticationRequired,
                    self.required_lifetime,
                    epoch,
                )
            }
            Check::UnknownSession => {
                self.stats.unknown_session += 1;
                // Long: the session will not come back; the client must authenticate.
                self.answer(msg, ResultCode::UnknownSessionId, 1800, epoch)
            }
            Check::Discard(why) => {
                match why {
                    Discard::Replay => self.stats.replayed += 1,
                    Discard::BadTag | Discard::NoKey | Discard::WrongClient => {
                        self.stats.bad_tag += 1
                    }
                }
                Inbound::Drop
            }
            Check::Authenticated {
                session_id,
                identity,
                ..
            } => {
                self.stats.authenticated += 1;
                self.server.note_epoch(session_id, now, epoch);
                let len = remove_option(buf, len, OptionCode::AuthenticationTag);
                Inbound::Serve {
                    len,
                    session: Some(session_id),
                    identity: Some(identity),
                }
            }
        }
    }

    fn answer(&self, msg: &[u8], rc: ResultCode, lifetime: u32, epoch: u32) -> Inbound {
        let mut out = vec![0u8; pcp_proto::MAX_MESSAGE_LEN];
        match emit_error_response(msg, rc, lifetime, epoch, true, &mut out) {
            Ok(n) => {
                out.truncate(n);
                Inbound::Answer(out)
            }
            Err(_) => Inbound::Drop,
        }
    }

    /// Tags the core's reply in `buf[..len]` to a request served for `session` and
    /// returns its length; `None` when it cannot be tagged (drop it: an untagged reply
    /// would be refused by the client anyway). Replies to unauthenticated requests pass
    /// unchanged.
    pub fn outbound(&mut self, session: Option<u32>, buf: &mut [u8], len: usize) -> Option<usize> {
        let Some(id) = session else {
            return Some(len);
        };
        // An error reply copies the request, which had its tag removed already; a
        // success reply has none. Remove any anyway: the server's tag must be the last
        // and only one.
        let len = remove_option(buf, len, OptionCode::AuthenticationTag);
        self.server.protect_response(id, buf, len).ok()
    }
}
