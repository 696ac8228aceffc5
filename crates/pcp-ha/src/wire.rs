//! The replication protocol's frames (one per UDP datagram).
//!
//! ```text
//! header:  "PCPH" | version (1) | kind (1) | flags (1) | 0 (1) | term (8) | sender (8) | stream (8)
//! DATA:    header | first seq (8) | count (2) | records…
//! ACK:     header | applied seq (8)                 flags bit 0: backup ready (bulk done)
//! HELLO:   header | applied seq (8)                 stream: the active stream the backup followed
//! BEAT:    header | last seq (8) | epoch ms (8)      from the active: its liveness and epoch clock
//! HANDOVER:header | last seq (8)                    planned switchover: promote once applied
//! record:  kind (1) | length (2) | body
//! ```
//!
//! All integers are big-endian. Frames from a newer major version are dropped.
//!
//! Compatibility within a version: a record's body may grow at its end — a reader
//! ignores octets after the fields it knows, and a field a sender did not write reads
//! as its default (the upsert's subscriber, added later, reads as "by address"). New
//! record kinds are sent only to a backup that announced it reads them: flag
//! [`FLAG_SESSIONS`] in its ACK/HELLO says it reads the session records (6–8); a
//! backup of an older build never gets them, and the pair works as before without
//! session replication. [`FLAG_STEPPED_DOWN`] adds two fields after an ACK/HELLO's
//! body, which an older active does not read.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use pcp_proto::{Filter, decode_addr, encode_addr};
use pcp_server::{MappingKey, Origin};

/// Magic at the start of every frame.
pub const MAGIC: [u8; 4] = *b"PCPH";
/// Protocol version.
pub const VERSION: u8 = 1;
/// Header length.
pub const HEADER_LEN: usize = 32;
/// Largest frame this crate emits (fits a loopback or jumbo-frame datagram).
pub const MAX_FRAME: usize = 8192;
/// Longest identity or subscriber id replicated (RADIUS caps User-Name at 253
/// octets; configured names are short): a longer one is not replicated, so no record
/// can outgrow a frame and wedge the stream.
pub const MAX_NAME: usize = 1024;
/// ACK/HELLO flag: the backup reads the PA session records (kinds 6–8).
pub const FLAG_SESSIONS: u8 = 2;
/// ACK/HELLO flag: the sender stepped down from active (and is not active again); after
/// the records applied, the body carries the stream it ran (its incarnation) and that
/// stream's last sequence number (a reader without the flag, or of an older build,
/// ignores both).
pub const FLAG_STEPPED_DOWN: u8 = 4;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Records from the active.
    Data,
    /// Cumulative acknowledgement from the backup.
    Ack,
    /// A backup introducing itself.
    Hello,
    /// The active's heartbeat.
    Beat,
    /// Planned switchover.
    Handover,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Data,
            2 => Kind::Ack,
            3 => Kind::Hello,
            4 => Kind::Beat,
            5 => Kind::Handover,
            _ => return None,
        })
    }
    fn to_u8(self) -> u8 {
        match self {
            Kind::Data => 1,
            Kind::Ack => 2,
            Kind::Hello => 3,
            Kind::Beat => 4,
            Kind::Handover => 5,
        }
    }
}

/// A frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Frame kind.
    pub kind: Kind,
    /// Flags (kind-specific).
    pub flags: u8,
    /// The sender's term.
    pub term: u64,
    /// The sender's incarnation (random per process start).
    pub sender: u64,
    /// The replication stream (the active's incarnation) the frame belongs to.
    pub stream: u64,
}

/// A replicated mapping: everything a successor needs to serve it unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct MappingRecord {
    /// Identity.
    pub key: MappingKey,
    /// Owner's nonce.
    pub nonce: [u8; 12],
    /// External address.
    pub external_addr: IpAddr,
    /// External port.
    pub external_port: u16,
    /// Milliseconds of lifetime left when the frame was written.
    pub remaining_ms: u32,
    /// Lifetime granted by the last request.
    pub lifetime: u32,
    /// PCP or NAT-PMP.
    pub origin: Origin,
    /// Whether the last request carried 192.
    pub requested: bool,
    /// Forced by this rule, or `None` for requested.
    pub forced_by: Option<String>,
    /// The PCP client (differs from the internal host under THIRD_PARTY).
    pub client: IpAddr,
    /// FILTERs.
    pub filters: Vec<Filter>,
    /// DESCRIPTION.
    pub description: Option<String>,
    /// Whom the active charged it to (so a successor charges the same subscriber).
    pub subscriber: Subscriber,
}

/// The subscriber a replicated mapping is charged to, as the successor must find it
/// again in its own configuration (docs/HA.md, docs/AUTH.md). Names are shared
/// (`Arc<str>`, interned by the receiver: see [`Interner`]), never one allocation per
/// mapping.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Subscriber {
    /// By the internal address: the successor looks it up in its own prefixes.
    #[default]
    Address,
    /// An authenticated PCP identity (RFC 7652): the successor resolves it as for an
    /// authenticated request (its configured entry, else the identity's own subscriber).
    Identity(Arc<str>),
    /// A configured subscriber entry, by id (reached by prefix or by an identity it
    /// lists).
    Entry(Arc<str>),
}

/// An established PCP authentication session (RFC 7652) as a successor needs it to
/// keep verifying and tagging the client's messages (docs/AUTH.md "Pair mode"). Holds
/// a transport key: see docs/HA.md on the replication link.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// Session ID.
    pub session_id: u32,
    /// The client's address.
    pub client: SocketAddr,
    /// The authenticated identity.
    pub identity: Arc<str>,
    /// The session's nonce.
    pub nonce: u32,
    /// Key ID of the transport key.
    pub key_id: u32,
    /// The transport key.
    pub key: [u8; 32],
    /// Negotiated PRF.
    pub prf: u32,
    /// Negotiated MAC algorithm.
    pub mac: u32,
    /// Milliseconds of session lifetime left when the frame was written.
    pub remaining_ms: u32,
    /// Next PA sequence number expected from the client.
    pub pa_in: u32,
    /// Next PA sequence number to send.
    pub pa_out: u32,
    /// Common-message sequence numbers.
    pub sequence: SequenceRecord,
}

impl std::fmt::Debug for SessionRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("SessionRecord")
            .field("session_id", &self.session_id)
            .field("client", &self.client)
            .field("identity", &self.identity)
            .field("key_id", &self.key_id)
            .field("remaining_ms", &self.remaining_ms)
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

/// A session's common-message sequence numbers (RFC 7652 §6.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SequenceRecord {
    /// The last request accepted: sequence number and MAC.
    pub last_in: Option<(u32, [u8; 16])>,
    /// The number the next reply gets.
    pub next_out: u32,
}

/// Shares equal names among records (identities, subscriber ids): a backup holding a
/// million mappings of a thousand subscribers holds a thousand strings.
#[derive(Debug, Default)]
pub struct Interner(pcp_server::FastSet<Arc<str>>);

impl Interner {
    /// The shared copy of `name`.
    pub fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(a) = self.0.get(name) {
            return a.clone();
        }
        let a: Arc<str> = name.into();
        self.0.insert(a.clone());
        a
    }
    /// Forgets names nothing else holds any more.
    pub fn prune(&mut self) {
        self.0.retain(|a| Arc::strong_count(a) > 1);
    }
    /// Names held.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One replicated change.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A checkpointed mapping's current state.
    Upsert(MappingRecord),
    /// A mapping is gone or no longer checkpointed.
    Remove(MappingKey),
    /// Whether a host holds unprotected mappings.
    Host {
        /// The host.
        host: IpAddr,
        /// It does.
        unprotected: bool,
    },
    /// A full copy starts: forget everything held.
    BulkStart,
    /// The full copy is complete: the backup is ready.
    BulkEnd,
    /// A PA session was established or re-authenticated (or is part of a full copy).
    Session(SessionRecord),
    /// The sequence numbers of a session moved (sent after authenticated requests).
    SessionSeq {
        /// Session ID.
        session_id: u32,
        /// Its sequence numbers now.
        sequence: SequenceRecord,
    },
    /// A PA session ended.
    SessionEnd(u32),
}

/// A malformed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Too short, wrong magic, or a field runs past the end.
    #[error("truncated or malformed frame")]
    Malformed,
    /// A version this node does not speak.
    #[error("unsupported replication protocol version {0}")]
    Version(u8),
    /// A kind this node does not know.
    #[error("unknown frame or record kind {0}")]
    UnknownKind(u8),
}

/// Appends big-endian values to a buffer.
#[derive(Debug)]
pub struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl<'a> Writer<'a> {
    /// A writer over `buf`.
    pub fn new(buf: &'a mut [u8]) -> Self {
        Writer { buf, at: 0 }
    }
    /// Octets written.
    pub fn len(&self) -> usize {
        self.at
    }
    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.at == 0
    }
    /// Octets left.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.at
    }
    fn put(&mut self, b: &[u8]) -> Option<()> {
        let end = self.at.checked_add(b.len())?;
        self.buf.get_mut(self.at..end)?.copy_from_slice(b);
        self.at = end;
        Some(())
    }
    fn u8(&mut self, v: u8) -> Option<()> {
        self.put(&[v])
    }
    fn u16(&mut self, v: u16) -> Option<()> {
        self.put(&v.to_be_bytes())
    }
    fn u32(&mut self, v: u32) -> Option<()> {
        self.put(&v.to_be_bytes())
    }
    fn u64(&mut self, v: u64) -> Option<()> {
        self.put(&v.to_be_bytes())
    }
    fn addr(&mut self, a: IpAddr) -> Option<()> {
        self.put(&encode_addr(a))
    }
    fn sequence(&mut self, s: &SequenceRecord) -> Option<()> {
        match s.last_in {
            Some((seq, mac)) => {
                self.u8(1)?;
                self.u32(seq)?;
                self.put(&mac)?;
            }
            None => {
                self.u8(0)?;
                self.u32(0)?;
                self.put(&[0; 16])?;
            }
        }
        self.u32(s.next_out)
    }
    fn bytes16(&mut self, b: &[u8]) -> Option<()> {
        self.u16(u16::try_from(b.len()).ok()?)?;
        self.put(b)
    }
    fn patch_u16(&mut self, at: usize, v: u16) {
        self.buf[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
}

/// Reads big-endian values.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Malformed);
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().map_err(|_| WireError::Malformed)?,
        ))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().map_err(|_| WireError::Malformed)?,
        ))
    }
    /// Reads a u64.
    pub fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().map_err(|_| WireError::Malformed)?,
        ))
    }
    fn addr(&mut self) -> Result<IpAddr, WireError> {
        let b: [u8; 16] = self
            .take(16)?
            .try_into()
            .map_err(|_| WireError::Malformed)?;
        Ok(decode_addr(&b))
    }
    fn bytes16(&mut self) -> Result<&'a [u8], WireError> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
    fn name(&mut self, names: &mut Interner) -> Result<Arc<str>, WireError> {
        let b = self.bytes16()?;
        Ok(match std::str::from_utf8(b) {
            Ok(s) => names.get(s),
            Err(_) => names.get(&String::from_utf8_lossy(b)),
        })
    }
    fn sequence(&mut self) -> Result<SequenceRecord, WireError> {
        let has = self.u8()? != 0;
        let seq = self.u32()?;
        let mac: [u8; 16] = self
            .take(16)?
            .try_into()
            .map_err(|_| WireError::Malformed)?;
        Ok(SequenceRecord {
            last_in: has.then_some((seq, mac)),
            next_out: self.u32()?,
        })
    }
}

/// Writes a header; `kind`-specific fields follow.
pub fn write_header(w: &mut Writer<'_>, h: &Header) -> Option<()> {
    w.put(&MAGIC)?;
    w.u8(VERSION)?;
    w.u8(h.kind.to_u8())?;
    w.u8(h.flags)?;
    w.u8(0)?;
    w.u64(h.term)?;
    w.u64(h.sender)?;
    w.u64(h.stream)
}

/// Reads a header.
pub fn read_header(r: &mut Reader<'_>) -> Result<Header, WireError> {
    if r.take(4)? != MAGIC {
        return Err(WireError::Malformed);
    }
    let version = r.u8()?;
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let kind = r.u8()?;
    let kind = Kind::from_u8(kind).ok_or(WireError::UnknownKind(kind))?;
    let flags = r.u8()?;
    r.u8()?;
    Ok(Header {
        kind,
        flags,
        term: r.u64()?,
        sender: r.u64()?,
        stream: r.u64()?,
    })
}

/// Writes a u64 field after the header.
pub fn write_u64(w: &mut Writer<'_>, v: u64) -> Option<()> {
    w.u64(v)
}

/// Writes the DATA fields before the records; returns the offset of the count to patch.
pub fn write_data_prefix(w: &mut Writer<'_>, first_seq: u64) -> Option<usize> {
    w.u64(first_seq)?;
    let at = w.len();
    w.u16(0)?;
    Some(at)
}

/// Patches the record count of a DATA frame.
pub fn patch_count(w: &mut Writer<'_>, at: usize, count: u16) {
    w.patch_u16(at, count);
}

/// Reads the DATA fields before the records.
pub fn read_data_prefix(r: &mut Reader<'_>) -> Result<(u64, u16), WireError> {
    Ok((r.u64()?, r.u16()?))
}

fn write_key(w: &mut Writer<'_>, k: &MappingKey) -> Option<()> {
    w.addr(k.internal)?;
    w.u8(k.protocol)?;
    w.u16(k.internal_port)?;
    match k.remote {
        Some((addr, port)) => {
            w.u8(1)?;
            w.addr(addr)?;
            w.u16(port)
        }
        None => w.u8(0),
    }
}

fn read_key(r: &mut Reader<'_>) -> Result<MappingKey, WireError> {
    let internal = r.addr()?;
    let protocol = r.u8()?;
    let internal_port = r.u16()?;
    let remote = match r.u8()? {
        0 => None,
        _ => Some((r.addr()?, r.u16()?)),
    };
    Ok(MappingKey {
        internal,
        protocol,
        internal_port,
        remote,
    })
}

/// Writes one record (kind, length, body). `None` when it does not fit.
pub fn write_record(w: &mut Writer<'_>, rec: &Record) -> Option<()> {
    let remaining = match rec {
        Record::Upsert(m) => m.remaining_ms,
        Record::Session(s) => s.remaining_ms,
        _ => 0,
    };
    write_record_remaining(w, rec, remaining)
}

/// [`write_record`] with an upsert's (or session's) remaining lifetime given (the sender computes it
/// when the frame is written; no copy of the record is made).
pub fn write_record_remaining(w: &mut Writer<'_>, rec: &Record, remaining_ms: u32) -> Option<()> {
    let start = w.len();
    let kind = match rec {
        Record::Upsert(_) => 1,
        Record::Remove(_) => 2,
        Record::Host { .. } => 3,
        Record::BulkStart => 4,
        Record::BulkEnd => 5,
        Record::Session(_) => 6,
        Record::SessionSeq { .. } => 7,
        Record::SessionEnd(_) => 8,
    };
    w.u8(kind)?;
    w.u16(0)?;
    match rec {
        Record::Upsert(m) => {
            write_key(w, &m.key)?;
            w.put(&m.nonce)?;
            w.addr(m.external_addr)?;
            w.u16(m.external_port)?;
            w.u32(remaining_ms)?;
            w.u32(m.lifetime)?;
            w.u8(match m.origin {
                Origin::Pcp => 0,
                Origin::NatPmp => 1,
            })?;
            w.u8(u8::from(m.requested))?;
            w.bytes16(m.forced_by.as_deref().unwrap_or("").as_bytes())?;
            w.u8(u8::from(m.forced_by.is_some()))?;
            w.addr(m.client)?;
            w.u8(u8::try_from(m.filters.len()).ok()?)?;
            for f in &m.filters {
                w.u8(f.prefix_len)?;
                w.u16(f.remote_port)?;
                w.addr(f.remote_addr)?;
            }
            w.bytes16(m.description.as_deref().unwrap_or("").as_bytes())?;
            w.u8(u8::from(m.description.is_some()))?;
            // Appended after the first release (older readers stop before it), and
            // only when it is not the default: by address.
            let named = match &m.subscriber {
                Subscriber::Address => None,
                Subscriber::Identity(n) => Some((1, n)),
                Subscriber::Entry(n) => Some((2, n)),
            };
            if let Some((kind, name)) = named {
                w.u8(kind)?;
                w.bytes16(name.as_bytes())?;
            }
        }
        Record::Session(s) => {
            w.u32(s.session_id)?;
            w.addr(s.client.ip())?;
            w.u16(s.client.port())?;
            w.bytes16(s.identity.as_bytes())?;
            w.u32(s.nonce)?;
            w.u32(s.key_id)?;
            w.put(&s.key)?;
            w.u32(s.prf)?;
            w.u32(s.mac)?;
            w.u32(remaining_ms)?;
            w.u32(s.pa_in)?;
            w.u32(s.pa_out)?;
            w.sequence(&s.sequence)?;
        }
        Record::SessionSeq {
            session_id,
            sequence,
        } => {
            w.u32(*session_id)?;
            w.sequence(sequence)?;
        }
        Record::SessionEnd(id) => w.u32(*id)?,
        Record::Remove(k) => write_key(w, k)?,
        Record::Host { host, unprotected } => {
            w.addr(*host)?;
            w.u8(u8::from(*unprotected))?;
        }
        Record::BulkStart | Record::BulkEnd => {}
    }
    let body = w.len() - start - 3;
    w.patch_u16(start + 1, u16::try_from(body).ok()?);
    Some(())
}

/// Reads one record.
pub fn read_record(r: &mut Reader<'_>) -> Result<Record, WireError> {
    read_record_in(r, &mut Interner::default())
}

/// Reads one record, sharing its names through `names`.
pub fn read_record_in(r: &mut Reader<'_>, names: &mut Interner) -> Result<Record, WireError> {
    let kind = r.u8()?;
    let body = r.bytes16()?;
    let mut r = Reader::new(body);
    let rec = match kind {
        1 => {
            let key = read_key(&mut r)?;
            let nonce: [u8; 12] = r.take(12)?.try_into().map_err(|_| WireError::Malformed)?;
            let external_addr = r.addr()?;
            let external_port = r.u16()?;
            let remaining_ms = r.u32()?;
            let lifetime = r.u32()?;
            let origin = match r.u8()? {
                0 => Origin::Pcp,
                _ => Origin::NatPmp,
            };
            let requested = r.u8()? != 0;
            let rule = r.bytes16()?;
            let forced = r.u8()? != 0;
            let forced_by = forced.then(|| String::from_utf8_lossy(rule).into_owned());
            let client = r.addr()?;
            let n = r.u8()?;
            let mut filters = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                let prefix_len = r.u8()?;
                let remote_port = r.u16()?;
                let remote_addr = r.addr()?;
                filters.push(Filter {
                    prefix_len,
                    remote_port,
                    remote_addr,
                });
            }
            let desc = r.bytes16()?;
            let has_desc = r.u8()? != 0;
            let description = has_desc.then(|| String::from_utf8_lossy(desc).into_owned());
            // Absent from a sender of the first release: by address.
            let subscriber = if r.is_empty() {
                Subscriber::Address
            } else {
                match (r.u8()?, r.name(names)?) {
                    (1, n) => Subscriber::Identity(n),
                    (2, n) => Subscriber::Entry(n),
                    _ => Subscriber::Address,
                }
            };
            Record::Upsert(MappingRecord {
                key,
                nonce,
                external_addr,
                external_port,
                remaining_ms,
                lifetime,
                origin,
                requested,
                forced_by,
                client,
                filters,
                description,
                subscriber,
            })
        }
        2 => Record::Remove(read_key(&mut r)?),
        3 => Record::Host {
            host: r.addr()?,
            unprotected: r.u8()? != 0,
        },
        4 => Record::BulkStart,
        5 => Record::BulkEnd,
        6 => {
            let session_id = r.u32()?;
            let ip = r.addr()?;
            let client = SocketAddr::new(ip, r.u16()?);
            let identity = r.name(names)?;
            let nonce = r.u32()?;
            let key_id = r.u32()?;
            let key: [u8; 32] = r.take(32)?.try_into().map_err(|_| WireError::Malformed)?;
            Record::Session(SessionRecord {
                session_id,
                client,
                identity,
                nonce,
                key_id,
                key,
                prf: r.u32()?,
                mac: r.u32()?,
                remaining_ms: r.u32()?,
                pa_in: r.u32()?,
                pa_out: r.u32()?,
                sequence: r.sequence()?,
            })
        }
        7 => Record::SessionSeq {
            session_id: r.u32()?,
            sequence: r.sequence()?,
        },
        8 => Record::SessionEnd(r.u32()?),
        other => return Err(WireError::UnknownKind(other)),
    };
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upsert() -> Record {
        Record::Upsert(MappingRecord {
            key: MappingKey {
                internal: "10.0.0.1".parse().unwrap(),
                protocol: 17,
                internal_port: 5060,
                remote: Some(("2001:db8::5".parse().unwrap(), 443)),
            },
            nonce: [9; 12],
            external_addr: "192.0.2.1".parse().unwrap(),
            external_port: 40000,
            remaining_ms: 123_456,
            lifetime: 3600,
            origin: Origin::Pcp,
            requested: true,
            forced_by: Some("emergency".into()),
            client: "10.0.0.1".parse().unwrap(),
            filters: vec![Filter {
                prefix_len: 120,
                remote_port: 80,
                remote_addr: "198.51.100.0".parse().unwrap(),
            }],
            description: Some("voip".into()),
            subscriber: Subscriber::Identity("alice".into()),
        })
    }

    fn session() -> Record {
        Record::Session(SessionRecord {
            session_id: 0xdead_beef,
            client: "[2001:db8::7]:5350".parse().unwrap(),
            identity: "alice@example.net".into(),
            nonce: 77,
            key_id: 2,
            key: [0x5a; 32],
            prf: 5,
            mac: 12,
            remaining_ms: 3_599_000,
            pa_in: 4,
            pa_out: 5,
            sequence: SequenceRecord {
                last_in: Some((41, [7; 16])),
                next_out: 40,
            },
        })
    }

    fn one(rec: &Record) -> Vec<u8> {
        let mut buf = vec![0u8; MAX_FRAME];
        let mut w = Writer::new(&mut buf);
        write_record(&mut w, rec).unwrap();
        let n = w.len();
        buf.truncate(n);
        buf
    }

    /// The subscriber was appended to the upsert body: a record of the first release
    /// (without it) reads as charged by address, and a record of a later release with
    /// more fields still reads (a reader ignores octets it does not know).
    #[test]
    fn upsert_body_grows_compatibly() {
        let Record::Upsert(m) = upsert() else {
            unreachable!()
        };
        let new = one(&upsert());
        // The first release's encoding: the same body without the 1 + 2 + 5 octets of
        // the subscriber, with its length patched.
        let mut old = new[..new.len() - 8].to_vec();
        let body = u16::try_from(old.len() - 3).unwrap();
        old[1..3].copy_from_slice(&body.to_be_bytes());
        let read = read_record(&mut Reader::new(&old)).unwrap();
        assert_eq!(
            read,
            Record::Upsert(MappingRecord {
                subscriber: Subscriber::Address,
                ..m.clone()
            })
        );
        // A later release's: more octets at the end.
        let mut later = new.clone();
        later.extend_from_slice(&[9, 9, 9]);
        let body = u16::try_from(later.len() - 3).unwrap();
        later[1..3].copy_from_slice(&body.to_be_bytes());
        assert_eq!(read_record(&mut Reader::new(&later)).unwrap(), upsert());
        for s in [
            Subscriber::Address,
            Subscriber::Entry("gold-7".into()),
            Subscriber::Identity("bob".into()),
        ] {
            let rec = Record::Upsert(MappingRecord {
                subscriber: s,
                ..m.clone()
            });
            assert_eq!(read_record(&mut Reader::new(&one(&rec))).unwrap(), rec);
        }
    }

    #[test]
    fn names_are_shared_among_records() {
        let mut names = Interner::default();
        let a = one(&upsert());
        let b = one(&session());
        let x = read_record_in(&mut Reader::new(&a), &mut names).unwrap();
        let y = read_record_in(&mut Reader::new(&a), &mut names).unwrap();
        let (Record::Upsert(x), Record::Upsert(y)) = (x, y) else {
            panic!()
        };
        let (Subscriber::Identity(x), Subscriber::Identity(y)) = (x.subscriber, y.subscriber)
        else {
            panic!()
        };
        assert!(Arc::ptr_eq(&x, &y), "one string for both");
        read_record_in(&mut Reader::new(&b), &mut names).unwrap();
        assert_eq!(names.len(), 2);
        drop(y);
        names.prune();
        assert_eq!(
            names.len(),
            1,
            "alice is still held, the session's name is not"
        );
        drop(x);
        names.prune();
        assert!(names.is_empty());
    }

    #[test]
    fn session_records_round_trip_and_hide_the_key() {
        for rec in [
            session(),
            Record::SessionSeq {
                session_id: 3,
                sequence: SequenceRecord {
                    last_in: None,
                    next_out: 9,
                },
            },
            Record::SessionEnd(3),
        ] {
            let b = one(&rec);
            assert_eq!(read_record(&mut Reader::new(&b)).unwrap(), rec);
            for cut in 0..b.len() {
                assert!(read_record(&mut Reader::new(&b[..cut])).is_err());
            }
        }
        let shown = format!("{:?}", session());
        assert!(
            !shown.contains("90, 90") && !shown.contains("key:"),
            "{shown}"
        );
    }

    #[test]
    fn frame_round_trips() {
        let mut buf = [0u8; MAX_FRAME];
        let mut w = Writer::new(&mut buf);
        let h = Header {
            kind: Kind::Data,
            flags: 1,
            term: 7,
            sender: 42,
            stream: 99,
        };
        write_header(&mut w, &h).unwrap();
        let at = write_data_prefix(&mut w, 1000).unwrap();
        let recs = [
            upsert(),
            Record::Remove(MappingKey {
                internal: "::1".parse().unwrap(),
                protocol: 6,
                internal_port: 1,
                remote: None,
            }),
            Record::Host {
                host: "10.0.0.9".parse().unwrap(),
                unprotected: true,
            },
            Record::BulkStart,
            Record::BulkEnd,
            session(),
            Record::SessionEnd(1),
        ];
        for r in &recs {
            write_record(&mut w, r).unwrap();
        }
        patch_count(&mut w, at, recs.len() as u16);
        let n = w.len();
        let mut r = Reader::new(&buf[..n]);
        assert_eq!(read_header(&mut r).unwrap(), h);
        let (first, count) = read_data_prefix(&mut r).unwrap();
        assert_eq!((first, count), (1000, 7));
        for want in &recs {
            assert_eq!(&read_record(&mut r).unwrap(), want);
        }
        assert!(r.is_empty());
    }

    #[test]
    fn truncations_are_errors_not_panics() {
        let mut buf = [0u8; 512];
        let mut w = Writer::new(&mut buf);
        write_header(
            &mut w,
            &Header {
                kind: Kind::Data,
                flags: 0,
                term: 1,
                sender: 1,
                stream: 1,
            },
        )
        .unwrap();
        let at = write_data_prefix(&mut w, 1).unwrap();
        write_record(&mut w, &upsert()).unwrap();
        patch_count(&mut w, at, 1);
        let n = w.len();
        for cut in 0..n {
            let mut r = Reader::new(&buf[..cut]);
            let ok = read_header(&mut r)
                .and_then(|_| read_data_prefix(&mut r))
                .and_then(|_| read_record(&mut r));
            assert!(ok.is_err(), "cut at {cut} parsed");
        }
    }
}
