//! The Linux nftables data plane: pcpd's own table of named maps and sets, changed by
//! element add/delete in batched netlink transactions over one persistent socket.
//!
//! The table (declared once at start, see [`ruleset`]) holds, per address family:
//! - `dnat4`/`dnat6`: MAP, inbound. `external addr . protocol . external port` →
//!   `internal addr . internal port`, used by a `dnat` rule at prerouting.
//! - `msnat4`/`msnat6`: MAP, outbound. `internal addr . protocol . internal port` →
//!   `external addr . external port`: what the mapped host sends from its mapped port
//!   leaves from the mapped external port (endpoint-independent mapping, RFC 6887
//!   §11.3), and the mapping's flows are picked up again after a failover from either
//!   side.
//! - `snat4`/`snat6`: PEER. `internal addr . protocol . internal port . remote addr .
//!   remote port` → `external addr . external port`.
//! - `filtered4`/`filtered6` and `allow4`/`allow6`: FILTER. The external endpoints of
//!   MAPs that carry filters, and `external endpoint . remote addr . remote port`
//!   intervals they allow; new inbound connections to a filtered endpoint from
//!   anywhere else are dropped.
//!
//! Only the elements change at run time, and only through netlink: each
//! [`DataPlane::apply`] is one transaction (`NFNL_MSG_BATCH_BEGIN` … `END`) of
//! `NEWSETELEM`/`DELSETELEM` messages, each message carrying up to
//! [`ELEMS_PER_MESSAGE`] elements. The kernel commits a transaction whole or not at
//! all, which is what lets the server refuse a request cleanly when it fails.
//!
//! Why hand-encoded messages over `netlink-sys`: no maintained pure-Rust crate encodes
//! map elements with data and concatenated keys (rustables' set elements carry a key
//! only; Mullvad's nftnl needs the libnftnl C library; the `nftables` crate runs one
//! `nft` process per call, which caps the rate at a few hundred transactions a
//! second). The element messages are a few attributes each; `netlink-sys` supplies
//! the socket. The table's rules are declared in nft syntax by one `nft -f` at start:
//! rule expressions are the bulk of the nftables netlink surface, run once, and the
//! declaration is then exactly what an operator reads in `nft list table`.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::Duration;

use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};

use crate::memory::EntryId;
use crate::{DataPlane, DataPlaneError, Direction, Entry, Filter, Op};

/// Elements per NEWSETELEM/DELSETELEM message.
pub const ELEMS_PER_MESSAGE: usize = 128;
/// A transaction is cut after this many octets (the socket's default send buffer is
/// 208 KiB); only bulk batches (a takeover, a reconcile) ever reach it.
const MAX_TRANSACTION: usize = 128 * 1024;
/// How long to wait for the kernel's answer to a transaction.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

// Netlink and nfnetlink constants (linux/netlink.h, linux/netfilter/nfnetlink.h,
// linux/netfilter/nf_tables.h).
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_DONE: u16 = 0x3;
const NLA_F_NESTED: u16 = 0x8000;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFPROTO_INET: u8 = 1;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
const NFTA_DATA_VALUE: u16 = 1;

/// The sets and maps of pcpd's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Set {
    Dnat4,
    Dnat6,
    Msnat4,
    Msnat6,
    Snat4,
    Snat6,
    Filtered4,
    Filtered6,
    Allow4,
    Allow6,
}

impl Set {
    const ALL: [Set; 10] = [
        Set::Dnat4,
        Set::Dnat6,
        Set::Msnat4,
        Set::Msnat6,
        Set::Snat4,
        Set::Snat6,
        Set::Filtered4,
        Set::Filtered6,
        Set::Allow4,
        Set::Allow6,
    ];

    fn name(self) -> &'static str {
        match self {
            Set::Dnat4 => "dnat4",
            Set::Dnat6 => "dnat6",
            Set::Msnat4 => "msnat4",
            Set::Msnat6 => "msnat6",
            Set::Snat4 => "snat4",
            Set::Snat6 => "snat6",
            Set::Filtered4 => "filtered4",
            Set::Filtered6 => "filtered6",
            Set::Allow4 => "allow4",
            Set::Allow6 => "allow6",
        }
    }
}

/// One element: its set and key identify it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Elem {
    set: Set,
    key: Box<[u8]>,
}

/// What an element holds besides its key.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Value {
    /// Interval sets: the last key of the interval.
    key_end: Option<Box<[u8]>>,
    /// Maps: the data.
    data: Option<Box<[u8]>>,
}

/// Settings of the nftables data plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftConfig {
    /// The table's name (family `inet`); pcpd owns it and touches no other.
    pub table: String,
    /// Delete the table when pcpd stops cleanly.
    pub remove_on_exit: bool,
    /// Most elements each map or set may hold (the kernel refuses more: NO_RESOURCES);
    /// `None`: no limit but memory.
    pub max_elements: Option<u32>,
    /// The `nft` binary that declares the table at start.
    pub nft: String,
}

impl Default for NftConfig {
    fn default() -> Self {
        NftConfig {
            table: "pcpd".into(),
            remove_on_exit: true,
            max_elements: None,
            nft: "nft".into(),
        }
    }
}

/// The table declaration: replaces any table of the same name in one transaction, so
/// that elements a previous run left behind are gone (pcpd's own table is empty at
/// start). Chains run just before the usual NAT priorities so that pcpd's mappings
/// win over an operator's catch-all masquerade in another table.
pub fn ruleset(cfg: &NftConfig) -> String {
    let t = &cfg.table;
    let size = cfg
        .max_elements
        .map_or(String::new(), |n| format!(" size {n};"));
    format!(
        "table inet {t} {{}}
delete table inet {t}
table inet {t} {{
  map dnat4 {{ type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service;{size} }}
  map dnat6 {{ type ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service;{size} }}
  map msnat4 {{ type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service;{size} }}
  map msnat6 {{ type ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service;{size} }}
  map snat4 {{ type ipv4_addr . inet_proto . inet_service . ipv4_addr . inet_service : ipv4_addr . inet_service;{size} }}
  map snat6 {{ type ipv6_addr . inet_proto . inet_service . ipv6_addr . inet_service : ipv6_addr . inet_service;{size} }}
  set filtered4 {{ type ipv4_addr . inet_proto . inet_service;{size} }}
  set filtered6 {{ type ipv6_addr . inet_proto . inet_service;{size} }}
  set allow4 {{ type ipv4_addr . inet_proto . inet_service . ipv4_addr . inet_service; flags interval;{size} }}
  set allow6 {{ type ipv6_addr . inet_proto . inet_service . ipv6_addr . inet_service; flags interval;{size} }}
  chain filter {{
    type filter hook prerouting priority dstnat - 20; policy accept;
    ct state new ip daddr . meta l4proto . th dport @filtered4 ip daddr . meta l4proto . th dport . ip saddr . th sport != @allow4 drop
    ct state new ip6 daddr . meta l4proto . th dport @filtered6 ip6 daddr . meta l4proto . th dport . ip6 saddr . th sport != @allow6 drop
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat - 10; policy accept;
    dnat ip to ip daddr . meta l4proto . th dport map @dnat4
    dnat ip6 to ip6 daddr . meta l4proto . th dport map @dnat6
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat - 10; policy accept;
    snat ip to ip saddr . meta l4proto . th sport . ip daddr . th dport map @snat4
    snat ip6 to ip6 saddr . meta l4proto . th sport . ip6 daddr . th dport map @snat6
    snat ip to ip saddr . meta l4proto . th sport map @msnat4
    snat ip6 to ip6 saddr . meta l4proto . th sport map @msnat6
  }}
}}
"
    )
}

/// Why the nftables data plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum NftStartError {
    /// `nft` could not be run.
    #[error("cannot run {nft}: {source}")]
    Spawn {
        /// The binary.
        nft: String,
        /// Why.
        source: io::Error,
    },
    /// `nft` refused the table declaration.
    #[error("{nft} refused the table declaration: {stderr}")]
    Declare {
        /// The binary.
        nft: String,
        /// What it said.
        stderr: String,
    },
    /// The netlink socket could not be opened.
    #[error("netlink socket: {0}")]
    Socket(io::Error),
}

/// The nftables data plane.
pub struct NftDataPlane {
    cfg: NftConfig,
    sock: Socket,
    seq: u32,
    /// What the kernel holds, as committed by this data plane.
    elems: HashMap<Elem, Value>,
    /// The elements of each installed entry.
    entries: HashMap<EntryId, Box<[Elem]>>,
    buf: Vec<u8>,
    rx: Vec<u8>,
    /// Transactions the kernel committed (for benchmarks and metrics).
    pub transactions: u64,
}

impl std::fmt::Debug for NftDataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NftDataPlane")
            .field("table", &self.cfg.table)
            .field("entries", &self.entries.len())
            .field("elements", &self.elems.len())
            .finish()
    }
}

impl NftDataPlane {
    /// Declares the table (replacing what a previous run left) and opens the netlink
    /// socket. Needs CAP_NET_ADMIN.
    pub fn open(cfg: NftConfig) -> Result<NftDataPlane, NftStartError> {
        declare(&cfg)?;
        let mut sock = Socket::new(NETLINK_NETFILTER).map_err(NftStartError::Socket)?;
        sock.bind_auto().map_err(NftStartError::Socket)?;
        socket2::SockRef::from(&sock)
            .set_read_timeout(Some(ANSWER_TIMEOUT))
            .map_err(NftStartError::Socket)?;
        // Larger receive buffer: a failed bulk transaction answers with an error per
        // message.
        let _ = sock.set_rx_buf_sz(1 << 20);
        Ok(NftDataPlane {
            cfg,
            sock,
            seq: 1,
            elems: HashMap::new(),
            entries: HashMap::new(),
            buf: Vec::with_capacity(MAX_TRANSACTION + 4096),
            rx: Vec::with_capacity(1 << 16),
            transactions: 0,
        })
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.cfg.table
    }

    /// Elements held in the kernel (several per entry).
    pub fn elements(&self) -> usize {
        self.elems.len()
    }

    /// Deletes the table (clean shutdown).
    pub fn remove_table(&mut self) -> Result<(), DataPlaneError> {
        self.buf.clear();
        let begin = self.next_seq();
        batch_marker(&mut self.buf, NFNL_MSG_BATCH_BEGIN, begin);
        let last = self.next_seq();
        let start = msg_start(
            &mut self.buf,
            NFT_MSG_DELTABLE,
            NLM_F_REQUEST | NLM_F_ACK,
            last,
        );
        attr_str(&mut self.buf, NFTA_TABLE_NAME, &self.cfg.table);
        msg_end(&mut self.buf, start);
        let end = self.next_seq();
        batch_marker(&mut self.buf, NFNL_MSG_BATCH_END, end);
        self.transact(begin, last)?;
        self.elems.clear();
        self.entries.clear();
        Ok(())
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// Sends the transaction in `buf` and waits for the kernel's verdict.
    fn transact(&mut self, begin: u32, last: u32) -> Result<(), DataPlaneError> {
        let sent = self
            .sock
            .send(&self.buf, 0)
            .map_err(|e| errno_error(&e, "sending a transaction"))?;
        if sent != self.buf.len() {
            return Err(DataPlaneError::Failure("short netlink send".into()));
        }
        let mut first_error: Option<DataPlaneError> = None;
        loop {
            self.rx.clear();
            match self.sock.recv(&mut self.rx, 0) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(first_error.unwrap_or_else(|| {
                        DataPlaneError::Failure("no answer from the kernel".into())
                    }));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(errno_error(&e, "receiving the kernel's answer")),
            }
            let mut at = 0;
            let mut done = false;
            while at + 16 <= self.rx.len() {
                let len = u32::from_ne_bytes(self.rx[at..at + 4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes(self.rx[at + 4..at + 6].try_into().unwrap());
                let seq = u32::from_ne_bytes(self.rx[at + 8..at + 12].try_into().unwrap());
                if len < 16 || at + len > self.rx.len() {
                    break;
                }
                // An answer to an earlier transaction that timed out is not this one's.
                let ours = seq.wrapping_sub(begin) <= last.wrapping_sub(begin);
                if ours && kind == NLMSG_ERROR && len >= 20 {
                    let code = i32::from_ne_bytes(self.rx[at + 16..at + 20].try_into().unwrap());
                    if code != 0 && first_error.is_none() {
                        first_error = Some(errno_error(
                            &io::Error::from_raw_os_error(-code),
                            "the kernel refused the transaction",
                        ));
                    }
                    // The batch header's own error ends the transaction (no more
                    // answers follow); the last message's answer comes last otherwise.
                    if seq == last || (code != 0 && seq == begin) {
                        done = true;
                    }
                } else if ours && kind == NLMSG_DONE && seq == last {
                    done = true;
                }
                at += (len + 3) & !3;
            }
            if done {
                break;
            }
        }
        match first_error {
            None => {
                self.transactions += 1;
                Ok(())
            }
            Some(e) => Err(e),
        }
    }

    /// Commits `changes` (in order: `None` deletes, `Some` adds), after flushing every
    /// set when `flush`, cut into transactions of at most [`MAX_TRANSACTION`] octets
    /// (one, for any batch a single request makes). The shadow follows each committed
    /// transaction; on an error, what came before it stays committed.
    fn commit(
        &mut self,
        changes: &[(Elem, Option<Value>)],
        mut flush: bool,
    ) -> Result<(), DataPlaneError> {
        let mut i = 0;
        while i < changes.len() || flush {
            self.buf.clear();
            let begin = self.next_seq();
            batch_marker(&mut self.buf, NFNL_MSG_BATCH_BEGIN, begin);
            let mut last = begin;
            let from = i;
            if flush {
                // A DELSETELEM without elements empties the set.
                for set in Set::ALL {
                    last = self.next_seq();
                    let start = msg_start(&mut self.buf, NFT_MSG_DELSETELEM, NLM_F_REQUEST, last);
                    attr_str(&mut self.buf, NFTA_SET_ELEM_LIST_TABLE, &self.cfg.table);
                    attr_str(&mut self.buf, NFTA_SET_ELEM_LIST_SET, set.name());
                    msg_end(&mut self.buf, start);
                }
            }
            while i < changes.len() && self.buf.len() < MAX_TRANSACTION {
                // One message: a run of same-set, same-kind changes.
                let (first, v) = &changes[i];
                let add = v.is_some();
                let kind = if add {
                    NFT_MSG_NEWSETELEM
                } else {
                    NFT_MSG_DELSETELEM
                };
                last = self.next_seq();
                let flags = NLM_F_REQUEST | if add { NLM_F_CREATE } else { 0 };
                let start = msg_start(&mut self.buf, kind, flags, last);
                attr_str(&mut self.buf, NFTA_SET_ELEM_LIST_TABLE, &self.cfg.table);
                attr_str(&mut self.buf, NFTA_SET_ELEM_LIST_SET, first.set.name());
                let list = nest_start(&mut self.buf, NFTA_SET_ELEM_LIST_ELEMENTS);
                let mut n = 0;
                while i < changes.len()
                    && n < ELEMS_PER_MESSAGE
                    && changes[i].0.set == first.set
                    && changes[i].1.is_some() == add
                {
                    let (e, v) = &changes[i];
                    let el = nest_start(&mut self.buf, NFTA_LIST_ELEM);
                    data_attr(&mut self.buf, NFTA_SET_ELEM_KEY, &e.key);
                    let end = match v {
                        Some(v) => v.key_end.clone(),
                        // A delete of an interval names its end too.
                        None => self.elems.get(e).and_then(|v| v.key_end.clone()),
                    };
                    if let Some(end) = &end {
                        data_attr(&mut self.buf, NFTA_SET_ELEM_KEY_END, end);
                    }
                    if let Some(Value { data: Some(d), .. }) = v {
                        data_attr(&mut self.buf, NFTA_SET_ELEM_DATA, d);
                    }
                    nest_end(&mut self.buf, el);
                    n += 1;
                    i += 1;
                }
                nest_end(&mut self.buf, list);
                msg_end(&mut self.buf, start);
            }
            // Only the last message asks for an acknowledgement: errors are reported
            // for every failing message regardless, and one answer per transaction
            // keeps bulk commits from overflowing the receive buffer.
            let last_start = self.last_msg_start();
            let flags_at = last_start + 6;
            let flags = u16::from_ne_bytes(self.buf[flags_at..flags_at + 2].try_into().unwrap());
            self.buf[flags_at..flags_at + 2].copy_from_slice(&(flags | NLM_F_ACK).to_ne_bytes());
            let end = self.next_seq();
            batch_marker(&mut self.buf, NFNL_MSG_BATCH_END, end);
            self.transact(begin, last)?;
            if std::mem::take(&mut flush) {
                self.elems.clear();
            }
            for (e, v) in &changes[from..i] {
                match v {
                    Some(v) => {
                        self.elems.insert(e.clone(), v.clone());
                    }
                    None => {
                        self.elems.remove(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Offset of the last message in `buf`.
    fn last_msg_start(&self) -> usize {
        let mut at = 0;
        let mut last = 0;
        while at + 4 <= self.buf.len() {
            let len = u32::from_ne_bytes(self.buf[at..at + 4].try_into().unwrap()) as usize;
            last = at;
            at += (len + 3) & !3;
        }
        last
    }

    /// Makes the table hold exactly the elements of `entries`, whatever it holds now
    /// (elements added or removed behind pcpd's back included): every set is flushed
    /// and refilled, in one transaction when it fits (up to some thousands of
    /// entries), else the flush and the first part in the first one.
    pub fn reconcile_entries(&mut self, entries: &[Entry]) -> Result<(), DataPlaneError> {
        let mut want: HashMap<Elem, Value> = HashMap::new();
        let mut by_entry = HashMap::new();
        for e in entries {
            let elems = elements(e)?;
            by_entry.insert(
                EntryId::of(e),
                elems.iter().map(|(k, _)| k.clone()).collect(),
            );
            want.extend(elems);
        }
        let mut changes: Vec<(Elem, Option<Value>)> =
            want.into_iter().map(|(k, v)| (k, Some(v))).collect();
        changes.sort_by_key(|(e, _)| e.set);
        self.entries.clear();
        self.commit(&changes, true)?;
        self.entries = by_entry;
        Ok(())
    }
}

impl DataPlane for NftDataPlane {
    fn apply(&mut self, batch: &[Op]) -> Result<(), DataPlaneError> {
        // The changes the batch makes, computed against what the kernel holds plus the
        // batch's own earlier operations.
        let mut overlay: HashMap<Elem, Option<Value>> = HashMap::new();
        let mut entries: HashMap<EntryId, Option<Box<[Elem]>>> = HashMap::new();
        let mut changes: Vec<(Elem, Option<Value>)> = Vec::new();
        for op in batch {
            let (entry, new) = match op {
                Op::Install(e) => (e, elements(e)?),
                Op::Remove(e) => (e, Vec::new()),
            };
            let id = EntryId::of(entry);
            let old: Box<[Elem]> = match entries.get(&id) {
                Some(x) => x.clone().unwrap_or_default(),
                None => self.entries.get(&id).cloned().unwrap_or_default(),
            };
            let current = |overlay: &HashMap<Elem, Option<Value>>, k: &Elem| match overlay.get(k) {
                Some(v) => v.clone(),
                None => self.elems.get(k).cloned(),
            };
            for k in old.iter() {
                let keep = new
                    .iter()
                    .any(|(n, v)| n == k && current(&overlay, k).as_ref() == Some(v));
                if !keep && current(&overlay, k).is_some() {
                    changes.push((k.clone(), None));
                    overlay.insert(k.clone(), None);
                }
            }
            for (k, v) in &new {
                match current(&overlay, k) {
                    Some(have) if have == *v => {}
                    Some(_) => {
                        // Another value under the same key (an entry's external
                        // endpoint re-pointed): delete, then add, in this transaction.
                        changes.push((k.clone(), None));
                        changes.push((k.clone(), Some(v.clone())));
                        overlay.insert(k.clone(), Some(v.clone()));
                    }
                    None => {
                        changes.push((k.clone(), Some(v.clone())));
                        overlay.insert(k.clone(), Some(v.clone()));
                    }
                }
            }
            let keys: Box<[Elem]> = new.into_iter().map(|(k, _)| k).collect();
            entries.insert(
                id,
                (!keys.is_empty() || matches!(op, Op::Install(_))).then_some(keys),
            );
        }
        if !changes.is_empty() {
            self.commit(&changes, false)?;
        }
        for (id, keys) in entries {
            match keys {
                Some(k) => {
                    self.entries.insert(id, k);
                }
                None => {
                    self.entries.remove(&id);
                }
            }
        }
        Ok(())
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn name(&self) -> &'static str {
        "nftables"
    }

    fn reconcile(&mut self, entries: &[Entry]) -> Result<(), DataPlaneError> {
        self.reconcile_entries(entries)
    }

    fn shutdown(&mut self) -> Result<(), DataPlaneError> {
        if self.cfg.remove_on_exit {
            self.remove_table()
        } else {
            Ok(())
        }
    }
}

/// Runs `nft -f -` with the table declaration.
fn declare(cfg: &NftConfig) -> Result<(), NftStartError> {
    use std::io::Write;
    if cfg.table.is_empty()
        || !cfg
            .table
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(NftStartError::Declare {
            nft: cfg.nft.clone(),
            stderr: format!("bad table name {:?}", cfg.table),
        });
    }
    let spawn = |source| NftStartError::Spawn {
        nft: cfg.nft.clone(),
        source,
    };
    let mut child = Command::new(&cfg.nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(ruleset(cfg).as_bytes()).map_err(spawn)?;
    }
    let out = child.wait_with_output().map_err(spawn)?;
    if !out.status.success() {
        return Err(NftStartError::Declare {
            nft: cfg.nft.clone(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Kernel errors that mean "out of room" are NO_RESOURCES, the rest NETWORK_FAILURE.
fn errno_error(e: &io::Error, what: &str) -> DataPlaneError {
    // ENOMEM 12, ENFILE 23 (set full), ENOSPC 28, E2BIG 7, ENOBUFS 105.
    match e.raw_os_error() {
        Some(12 | 23 | 28 | 7 | 105) => DataPlaneError::NoResources(format!("{what}: {e}")),
        _ => DataPlaneError::Failure(format!("{what}: {e}")),
    }
}

/// The elements that enforce `e`.
fn elements(e: &Entry) -> Result<Vec<(Elem, Value)>, DataPlaneError> {
    let v4 = match (e.internal, e.external) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => true,
        (SocketAddr::V6(_), SocketAddr::V6(_)) => false,
        _ => {
            return Err(DataPlaneError::Failure(format!(
                "{} → {}: translating between IPv4 and IPv6 is not supported",
                e.internal, e.external
            )));
        }
    };
    let pick = |a: Set, b: Set| if v4 { a } else { b };
    let proto = [e.protocol, 0, 0, 0];
    let mut out = Vec::new();
    let endpoint_key = |sa: SocketAddr| -> Vec<u8> {
        let mut k = addr_bytes(sa.ip());
        k.extend_from_slice(&proto);
        k.extend_from_slice(&port_bytes(sa.port()));
        k
    };
    let endpoint_data = |sa: SocketAddr| -> Box<[u8]> {
        let mut d = addr_bytes(sa.ip());
        d.extend_from_slice(&port_bytes(sa.port()));
        d.into()
    };
    let map = |set, key: Vec<u8>, data| {
        (
            Elem {
                set,
                key: key.into(),
            },
            Value {
                key_end: None,
                data: Some(data),
            },
        )
    };
    match e.direction {
        Direction::Inbound => {
            out.push(map(
                pick(Set::Dnat4, Set::Dnat6),
                endpoint_key(e.external),
                endpoint_data(e.internal),
            ));
            out.push(map(
                pick(Set::Msnat4, Set::Msnat6),
                endpoint_key(e.internal),
                endpoint_data(e.external),
            ));
            if !e.filters.is_empty() {
                out.push((
                    Elem {
                        set: pick(Set::Filtered4, Set::Filtered6),
                        key: endpoint_key(e.external).into(),
                    },
                    Value {
                        key_end: None,
                        data: None,
                    },
                ));
                let ext = endpoint_key(e.external);
                for b in disjoint_boxes(&e.filters, v4) {
                    let mut lo = ext.clone();
                    let mut hi = ext.clone();
                    if v4 {
                        lo.extend_from_slice(&(b.addr.0 as u32).to_be_bytes());
                        hi.extend_from_slice(&(b.addr.1 as u32).to_be_bytes());
                    } else {
                        lo.extend_from_slice(&b.addr.0.to_be_bytes());
                        hi.extend_from_slice(&b.addr.1.to_be_bytes());
                    }
                    lo.extend_from_slice(&port_bytes(b.port.0));
                    hi.extend_from_slice(&port_bytes(b.port.1));
                    out.push((
                        Elem {
                            set: pick(Set::Allow4, Set::Allow6),
                            key: lo.into(),
                        },
                        Value {
                            key_end: Some(hi.into()),
                            data: None,
                        },
                    ));
                }
            }
        }
        Direction::Outbound { remote } => {
            if remote.is_ipv4() != v4 {
                return Err(DataPlaneError::Failure(format!(
                    "PEER from {} to {remote}: mixed address families",
                    e.internal
                )));
            }
            let mut key = endpoint_key(e.internal);
            key.extend_from_slice(&addr_bytes(remote.ip()));
            key.extend_from_slice(&port_bytes(remote.port()));
            out.push(map(
                pick(Set::Snat4, Set::Snat6),
                key,
                endpoint_data(e.external),
            ));
        }
    }
    Ok(out)
}

fn addr_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// A port in its 4-octet register slot (network order, then padding).
fn port_bytes(p: u16) -> [u8; 4] {
    let b = p.to_be_bytes();
    [b[0], b[1], 0, 0]
}

/// An inclusive box of remote addresses × remote ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Box2 {
    addr: (u128, u128),
    port: (u16, u16),
}

/// The filters of one entry as non-overlapping boxes (the kernel's interval sets
/// refuse overlapping elements; a /24 and a host inside it are both legal FILTERs).
fn disjoint_boxes(filters: &[Filter], v4: bool) -> Vec<Box2> {
    let mut out: Vec<Box2> = Vec::new();
    for f in filters {
        let (bits, value) = match f.remote_addr {
            IpAddr::V4(a) if v4 => (32u32, u128::from(u32::from(a))),
            IpAddr::V6(a) if !v4 => (128u32, u128::from(a)),
            _ => continue,
        };
        let host_bits = bits - u32::from(f.prefix_len).min(bits);
        let mask = if host_bits >= 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        let b = Box2 {
            addr: (value & !mask, value | mask),
            port: if f.remote_port == 0 {
                (0, u16::MAX)
            } else {
                (f.remote_port, f.remote_port)
            },
        };
        let mut pieces = vec![b];
        for have in &out {
            pieces = pieces
                .into_iter()
                .flat_map(|p| subtract(p, *have))
                .collect();
        }
        out.extend(pieces);
    }
    out
}

/// `a` minus `b`, as up to four boxes.
fn subtract(a: Box2, b: Box2) -> Vec<Box2> {
    let lo = a.addr.0.max(b.addr.0);
    let hi = a.addr.1.min(b.addr.1);
    let plo = a.port.0.max(b.port.0);
    let phi = a.port.1.min(b.port.1);
    if lo > hi || plo > phi {
        return vec![a];
    }
    let mut out = Vec::new();
    if a.addr.0 < lo {
        out.push(Box2 {
            addr: (a.addr.0, lo - 1),
            port: a.port,
        });
    }
    if hi < a.addr.1 {
        out.push(Box2 {
            addr: (hi + 1, a.addr.1),
            port: a.port,
        });
    }
    if a.port.0 < plo {
        out.push(Box2 {
            addr: (lo, hi),
            port: (a.port.0, plo - 1),
        });
    }
    if phi < a.port.1 {
        out.push(Box2 {
            addr: (lo, hi),
            port: (phi + 1, a.port.1),
        });
    }
    out
}

// ---- message encoding ------------------------------------------------------------

fn batch_marker(buf: &mut Vec<u8>, kind: u16, seq: u32) {
    buf.extend_from_slice(&20u32.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: AF_UNSPEC, version 0, res_id = the nftables subsystem (big endian).
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&NFNL_SUBSYS_NFTABLES.to_be_bytes());
}

/// Starts an nftables message; returns its offset for [`msg_end`].
fn msg_start(buf: &mut Vec<u8>, msg: u16, flags: u16, seq: u32) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | msg).to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&[NFPROTO_INET, 0, 0, 0]);
    start
}

fn msg_end(buf: &mut [u8], start: usize) {
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

fn attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    buf.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

fn attr_str(buf: &mut Vec<u8>, kind: u16, s: &str) {
    let mut v = Vec::with_capacity(s.len() + 1);
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    attr(buf, kind, &v);
}

fn nest_start(buf: &mut Vec<u8>, kind: u16) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u16.to_ne_bytes());
    buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    start
}

fn nest_end(buf: &mut [u8], start: usize) {
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

/// A nested `NFTA_DATA_VALUE` attribute.
fn data_attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let n = nest_start(buf, kind);
    attr(buf, NFTA_DATA_VALUE, value);
    nest_end(buf, n);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(addr: &str, prefix_len: u8, remote_port: u16) -> Filter {
        Filter {
            remote_addr: addr.parse().unwrap(),
            prefix_len,
            remote_port,
        }
    }

    #[test]
    fn nested_and_overlapping_filters_become_disjoint_boxes() {
        let boxes = disjoint_boxes(
            &[
                filter("198.51.100.0", 24, 443),
                filter("198.51.100.7", 32, 0),
                filter("198.51.100.9", 32, 443),
            ],
            true,
        );
        // Every (addr, port) allowed by some filter is in exactly one box.
        let base = u128::from(u32::from(std::net::Ipv4Addr::new(198, 51, 100, 0)));
        for a in 0..=255u128 {
            for p in [0u16, 80, 442, 443, 444, 65535] {
                let want = p == 443 || a == 7;
                let hits = boxes
                    .iter()
                    .filter(|b| {
                        (b.addr.0..=b.addr.1).contains(&(base + a))
                            && (b.port.0..=b.port.1).contains(&p)
                    })
                    .count();
                assert_eq!(hits, usize::from(want), "198.51.100.{a}:{p}");
            }
        }
    }

    #[test]
    fn map_elements_use_register_layout() {
        let e = Entry {
            direction: Direction::Inbound,
            protocol: 6,
            internal: "10.0.0.2:5001".parse().unwrap(),
            external: "192.0.2.1:4001".parse().unwrap(),
            filters: Box::new([]),
        };
        let elems = elements(&e).unwrap();
        assert_eq!(elems.len(), 2);
        // What `nft --debug=netlink add element … { 192.0.2.1 . tcp . 4001 : 10.0.0.2 . 5001 }` sends.
        assert_eq!(
            &*elems[0].0.key,
            &[192, 0, 2, 1, 6, 0, 0, 0, 0x0f, 0xa1, 0, 0]
        );
        assert_eq!(
            elems[0].1.data.as_deref(),
            Some(&[10, 0, 0, 2, 0x13, 0x89, 0, 0][..])
        );
        assert_eq!(elems[1].0.set, Set::Msnat4);
    }

    #[test]
    fn ruleset_names_the_configured_table_and_size() {
        let r = ruleset(&NftConfig {
            table: "edge".into(),
            max_elements: Some(100),
            ..NftConfig::default()
        });
        assert!(r.contains("table inet edge {"));
        assert!(r.contains("size 100;"));
        assert_eq!(r.matches("size 100;").count(), 10, "every map and set");
    }
}
