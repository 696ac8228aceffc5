//! The public view of one mapping: everything the server knows about it, as owned
//! values (the table stores a compact form).

use std::net::IpAddr;

use crate::checkpoint::Reason;
use crate::pool::ExternalEndpoint;
use crate::subscriber::SubscriberId;
use crate::table::{MappingKey, Origin};
use crate::time::Time;

/// A mapping and all the server knows about it. Nonces are included for replication;
/// never log them.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapping {
    /// Identity.
    pub key: MappingKey,
    /// Nonce of the client that owns it.
    pub nonce: [u8; 12],
    /// PCP or NAT-PMP.
    pub origin: Origin,
    /// The PCP client that asked (differs from `key.internal` under THIRD_PARTY).
    pub client: IpAddr,
    /// Assigned external endpoint.
    pub external: ExternalEndpoint,
    /// When it expires.
    pub expires: Time,
    /// Lifetime granted by the last request, in seconds.
    pub lifetime: u32,
    /// Subscriber charged.
    pub subscriber: SubscriberId,
    /// Whether the client asked for a checkpoint (option 192) in its last request.
    pub checkpoint_requested: bool,
    /// Checkpoint state and why.
    pub checkpoint: Reason,
    /// FILTERs (MAP).
    pub filters: Box<[pcp_proto::Filter]>,
    /// DESCRIPTION, if given.
    pub description: Option<Box<str>>,
    /// When it was created (whole seconds).
    pub created: Time,
}

impl Mapping {
    /// Whether it is checkpointed.
    pub fn is_checkpointed(&self) -> bool {
        self.checkpoint.is_checkpointed()
    }
}
