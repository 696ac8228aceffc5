//! The embedded back end's work queue (docs/AUTH.md, "EAP work off the gate's lock"):
//! bounded, and fair between sources. Under a flood of TLS handshakes from a few
//! sources, a FIFO made a legitimate login wait behind all of them — longer than its
//! client's retransmission time, whose copies are then duplicates — and grew without
//! bound. Here each source (address, IPv6 /64) has its own queue of at most
//! `per_source` jobs, the sources are served in turn, and at most `total` jobs wait
//! in all; a job beyond either bound is refused (counted), and the caller lets the
//! client's retransmission bring the message again.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

/// Jobs waiting in all, at most.
pub const MAX_QUEUED: usize = 1024;
/// Jobs waiting per source, at most.
pub const MAX_PER_SOURCE: usize = 8;

/// A bounded queue served round-robin by source.
#[derive(Debug)]
pub struct FairQueue<T> {
    by_source: HashMap<IpAddr, VecDeque<T>>,
    /// Sources with jobs, in the order they are served next.
    turn: VecDeque<IpAddr>,
    len: usize,
    total: usize,
    per_source: usize,
    /// Jobs refused because a bound was reached.
    pub dropped: u64,
}

impl<T> FairQueue<T> {
    /// A queue of at most `total` jobs, `per_source` of them from one source.
    pub fn new(total: usize, per_source: usize) -> FairQueue<T> {
        FairQueue {
            by_source: HashMap::new(),
            turn: VecDeque::new(),
            len: 0,
            total,
            per_source,
            dropped: 0,
        }
    }

    /// Queues `job` of `src`, or hands it back (counted) when a bound is reached.
    pub fn push(&mut self, src: IpAddr, job: T) -> Result<(), T> {
        let key = crate::limit::source_key(src);
        let queued = self.by_source.get(&key).map_or(0, VecDeque::len);
        if self.len >= self.total || queued >= self.per_source {
            self.dropped += 1;
            return Err(job);
        }
        if queued == 0 {
            self.turn.push_back(key);
        }
        self.by_source.entry(key).or_default().push_back(job);
        self.len += 1;
        Ok(())
    }

    /// The next job: the oldest of the source whose turn it is.
    pub fn pop(&mut self) -> Option<T> {
        let key = self.turn.pop_front()?;
        let q = self.by_source.get_mut(&key)?;
        let job = q.pop_front();
        if q.is_empty() {
            self.by_source.remove(&key);
        } else {
            self.turn.push_back(key);
        }
        self.len -= usize::from(job.is_some());
        job
    }

    /// Jobs waiting.
    pub fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A flooding source does not delay another source's job by more than one turn:
    /// sources are served in turn, each in its own order.
    #[test]
    fn sources_take_turns() {
        let mut q = FairQueue::new(100, 100);
        for i in 0..5 {
            q.push(ip("192.0.2.1"), ("flood", i)).unwrap();
        }
        q.push(ip("198.51.100.7"), ("login", 0)).unwrap();
        q.push(ip("192.0.2.2"), ("other", 0)).unwrap();
        q.push(ip("198.51.100.7"), ("login", 1)).unwrap();
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(
            order,
            [
                ("flood", 0),
                ("login", 0),
                ("other", 0),
                ("flood", 1),
                ("login", 1),
                ("flood", 2),
                ("flood", 3),
                ("flood", 4)
            ]
        );
        assert_eq!(q.len(), 0);
        assert!(q.by_source.is_empty() && q.turn.is_empty());
    }

    /// At most `per_source` jobs of one source (IPv6: one /64) and `total` in all;
    /// beyond, jobs are handed back and counted, and room comes back as jobs leave.
    #[test]
    fn bounded_per_source_and_in_all() {
        let mut q = FairQueue::new(5, 2);
        assert!(q.push(ip("2001:db8::1"), 1).is_ok());
        assert!(q.push(ip("2001:db8::2"), 2).is_ok());
        assert_eq!(q.push(ip("2001:db8::3"), 3), Err(3));
        for (i, s) in ["192.0.2.1", "192.0.2.2", "192.0.2.3"].iter().enumerate() {
            assert!(q.push(ip(s), 10 + i).is_ok());
        }
        assert_eq!(q.len(), 5);
        assert_eq!(q.push(ip("192.0.2.4"), 20), Err(20));
        assert_eq!(q.dropped, 2);
        assert_eq!(q.pop(), Some(1));
        assert!(q.push(ip("2001:db8::3"), 3).is_ok());
        assert_eq!(q.len(), 5);
    }
}
