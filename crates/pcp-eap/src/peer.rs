//! The EAP-TTLS peer (PCP client side): outer Identity, the TLS tunnel with strict
//! server-certificate validation, PAP inside (User-Name and User-Password AVPs), and the
//! MSK.

use std::io::Write;
use std::sync::Arc;

use pcp_auth::eap::{EapPeer, PeerStep};
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, RootCertStore};

use crate::packet::{self, Packet};
use crate::tls;
use crate::ttls::{self, Frame, Incoming, Outgoing, Reassembly};

/// Peer settings.
#[derive(Clone)]
pub struct PeerConfig {
    /// The identity sent outside the tunnel (RFC 7652 §8 asks for identity
    /// confidentiality: "anonymous" by default, the real name only inside).
    pub outer_identity: String,
    /// The user name for PAP inside the tunnel.
    pub username: String,
    /// The password for PAP inside the tunnel.
    pub password: Vec<u8>,
    /// The name the server's certificate must carry.
    pub server_name: ServerName<'static>,
    /// Trust anchors for the server's certificate.
    pub roots: RootCertStore,
}

impl std::fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConfig")
            .field("outer_identity", &self.outer_identity)
            .field("username", &self.username)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// The EAP-TTLS/PAP peer.
pub struct TtlsPeer {
    cfg: PeerConfig,
    tls: Arc<rustls::ClientConfig>,
    conn: Option<ClientConnection>,
    out: Outgoing,
    inc: Incoming,
    inner_sent: bool,
    last: Option<(u8, Vec<u8>)>,
    msk: Option<Vec<u8>>,
}

impl std::fmt::Debug for TtlsPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TtlsPeer")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl TtlsPeer {
    /// A peer; fails if rustls refuses the configuration.
    pub fn new(cfg: PeerConfig) -> Result<TtlsPeer, rustls::Error> {
        let tls = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(tls::VERSIONS)?
            .with_root_certificates(cfg.roots.clone())
            .with_no_client_auth();
        Ok(TtlsPeer {
            cfg,
            tls: Arc::new(tls),
            conn: None,
            out: Outgoing::default(),
            inc: Incoming::default(),
            inner_sent: false,
            last: None,
            msk: None,
        })
    }

    fn respond(&mut self, id: u8, typ: u8, data: &[u8]) -> PeerStep {
        let p = Packet {
            code: packet::RESPONSE,
            id,
            typ: Some(typ),
            data,
        }
        .to_vec();
        self.last = Some((id, p.clone()));
        PeerStep::Respond(p)
    }

    fn ttls(&mut self, id: u8, f: &Frame) -> PeerStep {
        if f.flags & ttls::FLAG_S != 0 {
            let Ok(mut conn) =
                ClientConnection::new(self.tls.clone(), self.cfg.server_name.clone())
            else {
                return PeerStep::Failure;
            };
            self.out.set(tls::drain(&mut conn));
            self.conn = Some(conn);
            self.inner_sent = false;
            let frag = self.out.next_fragment();
            return self.respond(id, packet::TYPE_TTLS, &frag);
        }
        let Some(conn) = self.conn.as_mut() else {
            return PeerStep::Discard;
        };
        if f.data.is_empty() {
            // The server acknowledged a fragment: the next one.
            if self.out.pending() {
                let frag = self.out.next_fragment();
                return self.respond(id, packet::TYPE_TTLS, &frag);
            }
            return self.respond(id, packet::TYPE_TTLS, &[0]);
        }
        match self.inc.add(f) {
            Reassembly::More => self.respond(id, packet::TYPE_TTLS, &[0]),
            Reassembly::Invalid => PeerStep::Failure,
            Reassembly::Done(msg) => {
                // A certificate that does not validate ends here (strict checking).
                if tls::feed(conn, &msg).is_err() {
                    return PeerStep::Failure;
                }
                if !conn.is_handshaking() && !self.inner_sent {
                    let mut avps = ttls::avp(ttls::AVP_USER_NAME, self.cfg.username.as_bytes());
                    avps.extend(ttls::avp(
                        ttls::AVP_USER_PASSWORD,
                        &ttls::pap_password(&self.cfg.password),
                    ));
                    if conn.writer().write_all(&avps).is_err() {
                        return PeerStep::Failure;
                    }
                    self.inner_sent = true;
                }
                let data = tls::drain(conn);
                if data.is_empty() {
                    return self.respond(id, packet::TYPE_TTLS, &[0]);
                }
                self.out.set(data);
                let frag = self.out.next_fragment();
                self.respond(id, packet::TYPE_TTLS, &frag)
            }
        }
    }
}

impl EapPeer for TtlsPeer {
    fn receive(&mut self, b: &[u8]) -> PeerStep {
        let Ok(p) = Packet::parse(b) else {
            return PeerStep::Discard;
        };
        match p.code {
            packet::REQUEST => {
                // A repeated request gets the same response (RFC 3748 §4.1).
                if let Some((id, r)) = &self.last
                    && *id == p.id
                {
                    return PeerStep::Respond(r.clone());
                }
                match p.typ {
                    Some(packet::TYPE_IDENTITY) => {
                        let outer = self.cfg.outer_identity.clone();
                        self.respond(p.id, packet::TYPE_IDENTITY, outer.as_bytes())
                    }
                    Some(packet::TYPE_TTLS) => match Frame::parse(p.data) {
                        Some(f) => self.ttls(p.id, &f),
                        None => PeerStep::Discard,
                    },
                    // Anything else: Nak, proposing EAP-TTLS (RFC 3748 §5.3.1).
                    Some(_) => self.respond(p.id, packet::TYPE_NAK, &[packet::TYPE_TTLS]),
                    None => PeerStep::Discard,
                }
            }
            packet::SUCCESS => {
                // Success counts only after our tunnel finished and PAP went inside it.
                let msk = self
                    .conn
                    .as_ref()
                    .filter(|_| self.inner_sent)
                    .and_then(|c| tls::msk(c));
                match msk {
                    Some(k) => {
                        self.msk = Some(k);
                        PeerStep::Success
                    }
                    None => PeerStep::Failure,
                }
            }
            packet::FAILURE => PeerStep::Failure,
            _ => PeerStep::Discard,
        }
    }

    fn msk(&self) -> Option<Vec<u8>> {
        self.msk.clone()
    }

    fn restart(&mut self) {
        self.conn = None;
        self.out = Outgoing::default();
        self.inc = Incoming::default();
        self.inner_sent = false;
        self.last = None;
        self.msk = None;
    }
}
