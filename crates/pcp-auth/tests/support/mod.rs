//! A toy EAP method for driving the PA session machines in tests: Identity, then
//! `ROUNDS` HMAC challenge–response rounds keyed by a shared password, MSK derived
//! from the password and the challenges. Not a real method (no tunnel, no mutual
//! authentication); EAP-TTLS is the real one.
#![allow(dead_code)]

use std::collections::HashMap;

use hmac::{Hmac, KeyInit, Mac};
use pcp_auth::eap::{AuthStep, EapAuthenticator, EapPeer, PeerStep};
use sha2::Sha256;

pub const ROUNDS: u8 = 3;
const TYPE_IDENTITY: u8 = 1;
const TYPE_TOY: u8 = 255;

fn hmac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap();
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

fn packet(code: u8, id: u8, typ: Option<u8>, data: &[u8]) -> Vec<u8> {
    let len = 4 + usize::from(typ.is_some()) + data.len();
    let mut p = vec![code, id, (len >> 8) as u8, len as u8];
    p.extend(typ);
    p.extend_from_slice(data);
    p
}

fn msk(password: &[u8], challenges: &[u8]) -> Vec<u8> {
    let mut m = hmac(password, &[b"msk-1", challenges]);
    m.extend(hmac(password, &[b"msk-2", challenges]));
    m
}

/// The authenticator: users and their passwords.
pub struct ToyServer {
    users: HashMap<String, Vec<u8>>,
    id: u8,
    identity: Option<String>,
    round: u8,
    challenges: Vec<u8>,
    counter: u64,
}

impl ToyServer {
    pub fn new(users: &[(&str, &str)], seed: u64) -> ToyServer {
        ToyServer {
            users: users
                .iter()
                .map(|(u, p)| (u.to_string(), p.as_bytes().to_vec()))
                .collect(),
            id: 0,
            identity: None,
            round: 0,
            challenges: Vec::new(),
            counter: seed,
        }
    }

    fn challenge(&mut self) -> Vec<u8> {
        self.counter += 1;
        let c = hmac(b"toy", &[&self.counter.to_be_bytes()])[..16].to_vec();
        self.challenges.extend_from_slice(&c);
        self.id = self.id.wrapping_add(1);
        packet(1, self.id, Some(TYPE_TOY), &c)
    }
}

impl EapAuthenticator for ToyServer {
    fn start(&mut self) -> Vec<u8> {
        self.id = self.id.wrapping_add(1);
        self.identity = None;
        self.round = 0;
        self.challenges.clear();
        packet(1, self.id, Some(TYPE_IDENTITY), &[])
    }

    fn receive(&mut self, p: &[u8]) -> AuthStep {
        if p.len() < 5 || p[0] != 2 || p[1] != self.id {
            return AuthStep::Discard;
        }
        let fail = |id| AuthStep::Failure {
            packet: packet(4, id, None, &[]),
        };
        match (p[4], &self.identity) {
            (TYPE_IDENTITY, None) => {
                let name = String::from_utf8_lossy(&p[5..]).to_string();
                self.identity = Some(name);
                AuthStep::Request(self.challenge())
            }
            (TYPE_TOY, Some(name)) => {
                let Some(pw) = self.users.get(name).cloned() else {
                    return fail(self.id);
                };
                let c = &self.challenges[self.challenges.len() - 16..];
                if hmac(&pw, &[c]) != p[5..] {
                    return fail(self.id);
                }
                self.round += 1;
                if self.round < ROUNDS {
                    return AuthStep::Request(self.challenge());
                }
                AuthStep::Success {
                    packet: packet(3, self.id, None, &[]),
                    msk: msk(&pw, &self.challenges),
                    identity: name.clone(),
                }
            }
            _ => AuthStep::Discard,
        }
    }
}

/// The peer: one identity and password.
pub struct ToyPeer {
    identity: String,
    password: Vec<u8>,
    challenges: Vec<u8>,
    last: Option<(u8, Vec<u8>)>,
    done: bool,
}

impl ToyPeer {
    pub fn new(identity: &str, password: &str) -> ToyPeer {
        ToyPeer {
            identity: identity.into(),
            password: password.as_bytes().to_vec(),
            challenges: Vec::new(),
            last: None,
            done: false,
        }
    }
}

impl EapPeer for ToyPeer {
    fn receive(&mut self, p: &[u8]) -> PeerStep {
        if p.len() < 4 {
            return PeerStep::Discard;
        }
        match p[0] {
            3 => {
                self.done = !self.challenges.is_empty();
                if self.done {
                    PeerStep::Success
                } else {
                    PeerStep::Failure
                }
            }
            4 => PeerStep::Failure,
            1 if p.len() >= 5 => {
                if let Some((id, r)) = &self.last
                    && *id == p[1]
                {
                    return PeerStep::Respond(r.clone());
                }
                let r = match p[4] {
                    TYPE_IDENTITY => packet(2, p[1], Some(TYPE_IDENTITY), self.identity.as_bytes()),
                    TYPE_TOY => {
                        self.challenges.extend_from_slice(&p[5..]);
                        packet(2, p[1], Some(TYPE_TOY), &hmac(&self.password, &[&p[5..]]))
                    }
                    _ => return PeerStep::Discard,
                };
                self.last = Some((p[1], r.clone()));
                PeerStep::Respond(r)
            }
            _ => PeerStep::Discard,
        }
    }

    fn msk(&self) -> Option<Vec<u8>> {
        self.done.then(|| msk(&self.password, &self.challenges))
    }

    fn restart(&mut self) {
        self.challenges.clear();
        self.last = None;
        self.done = false;
    }
}
