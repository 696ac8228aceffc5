//! The server's session table with an index of each session's next deadline, so a timer
//! tick costs what is due, not how many sessions there are (an ISP's server holds tens
//! of thousands, and pcpd runs the timers under the lock its request path takes).
//!
//! Keeping the index right must not depend on every caller remembering to: a session
//! can only be changed through [`Table::get_mut`], which marks it for
//! [`Table::settle`] to re-index, or [`Table::update`], which re-indexes it at once.
//! Reading the index ([`Table::next`], [`Table::due`]) takes marked sessions into
//! account, so a missed `settle` costs time, never a timer.

use std::collections::{BTreeSet, HashMap};

use crate::Time;
use crate::retransmit::RetransmitConfig;

/// Something with timers: when they must next run.
pub(crate) trait Timed {
    /// When the timers must next run (`None`: never). Reads only the value itself and
    /// `cfg`.
    fn deadline(&self, cfg: &RetransmitConfig) -> Option<Time>;
}

struct Entry<S> {
    s: S,
    /// The deadline `index` holds for it.
    at: Option<Time>,
    /// Changed since `at` was computed (and listed in `Table::dirty`).
    dirty: bool,
}

/// Sessions by ID, indexed by deadline.
pub(crate) struct Table<S> {
    entries: HashMap<u32, Entry<S>>,
    index: BTreeSet<(Time, u32)>,
    /// Sessions changed since their deadline was last indexed: each at most once while
    /// its entry is marked, plus IDs of sessions removed meanwhile (skipped). A `Vec`,
    /// not a set: draining a hash set costs its capacity, which one busy moment
    /// would leave large for every tick after.
    dirty: Vec<u32>,
    cfg: RetransmitConfig,
}

impl<S: Timed> Table<S> {
    pub fn new(cfg: RetransmitConfig) -> Table<S> {
        Table {
            entries: HashMap::new(),
            index: BTreeSet::new(),
            dirty: Vec::new(),
            cfg,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn contains_key(&self, id: &u32) -> bool {
        self.entries.contains_key(id)
    }

    pub fn get(&self, id: &u32) -> Option<&S> {
        self.entries.get(id).map(|e| &e.s)
    }

    /// The session, to change: its deadline is indexed again at the next
    /// [`Table::settle`].
    pub fn get_mut(&mut self, id: &u32) -> Option<&mut S> {
        let e = self.entries.get_mut(id)?;
        if !e.dirty {
            e.dirty = true;
            self.dirty.push(*id);
        }
        Some(&mut e.s)
    }

    /// Changes a session with `f` and indexes its deadline at once: one lookup, for
    /// the request path (a deadline computed and compared, the index touched only when
    /// it moved).
    pub fn update<R>(&mut self, id: &u32, f: impl FnOnce(&mut S) -> R) -> Option<R> {
        let e = self.entries.get_mut(id)?;
        let r = f(&mut e.s);
        let at = e.s.deadline(&self.cfg);
        if at != e.at {
            if let Some(t) = e.at {
                self.index.remove(&(t, *id));
            }
            if let Some(t) = at {
                self.index.insert((t, *id));
            }
            e.at = at;
        }
        Some(r)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&u32, &S)> + '_ {
        self.entries.iter().map(|(id, e)| (id, &e.s))
    }

    /// Puts `s` in (replacing a session with the same ID), indexed.
    pub fn insert(&mut self, id: u32, s: S) {
        self.remove(&id);
        let at = s.deadline(&self.cfg);
        if let Some(t) = at {
            self.index.insert((t, id));
        }
        self.entries.insert(
            id,
            Entry {
                s,
                at,
                dirty: false,
            },
        );
    }

    /// Takes a session out of the table and the index.
    pub fn remove(&mut self, id: &u32) -> Option<S> {
        let e = self.entries.remove(id)?;
        if let Some(t) = e.at {
            self.index.remove(&(t, *id));
        }
        Some(e.s)
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.index.clear();
        self.dirty.clear();
    }

    /// Indexes the deadlines of the sessions changed since the last call.
    pub fn settle(&mut self) {
        for id in self.dirty.drain(..) {
            let Some(e) = self.entries.get_mut(&id).filter(|e| e.dirty) else {
                continue;
            };
            e.dirty = false;
            let at = e.s.deadline(&self.cfg);
            if at == e.at {
                continue;
            }
            if let Some(t) = e.at {
                self.index.remove(&(t, id));
            }
            if let Some(t) = at {
                self.index.insert((t, id));
            }
            e.at = at;
        }
    }

    /// New retransmission settings: every deadline may move (O(n log n), a reload).
    pub fn set_config(&mut self, cfg: RetransmitConfig) {
        self.cfg = cfg;
        self.settle();
        self.index.clear();
        for (&id, e) in &mut self.entries {
            e.at = e.s.deadline(&cfg);
            if let Some(t) = e.at {
                self.index.insert((t, id));
            }
        }
    }

    /// The earliest deadline of any session.
    pub fn next(&self) -> Option<Time> {
        if self.dirty.is_empty() {
            return self.index.first().map(|&(t, _)| t);
        }
        // Sessions changed and not settled yet have a stale entry (or none): their
        // current deadline counts instead. `dirty` is empty after every public call of
        // the server, so this is the first entry of the index.
        let indexed = self
            .index
            .iter()
            .find(|(_, id)| self.entries.get(id).is_some_and(|e| !e.dirty))
            .map(|&(t, _)| t);
        let fresh = self
            .dirty
            .iter()
            .filter_map(|id| self.entries.get(id).filter(|e| e.dirty))
            .filter_map(|e| e.s.deadline(&self.cfg))
            .min();
        indexed.into_iter().chain(fresh).min()
    }

    /// The sessions whose deadline is `now` or earlier, earliest first.
    pub fn due(&mut self, now: Time) -> Vec<u32> {
        self.settle();
        self.index
            .range(..=(now, u32::MAX))
            .map(|&(_, id)| id)
            .collect()
    }

    /// Sessions changed since the last [`Table::settle`] (tests: the server settles
    /// before it returns).
    pub fn unsettled(&self) -> usize {
        self.entries.values().filter(|e| e.dirty).count()
    }

    /// The brute-force answer to [`Table::next`], for tests and the benchmark baseline.
    pub fn scan_next(&self) -> Option<Time> {
        self.entries
            .values()
            .filter_map(|e| e.s.deadline(&self.cfg))
            .min()
    }

    /// The brute-force answer to [`Table::due`]: every session looked at.
    pub fn scan_due(&self, now: Time) -> Vec<u32> {
        let mut due: Vec<(Time, u32)> = self
            .entries
            .iter()
            .filter_map(|(&id, e)| e.s.deadline(&self.cfg).map(|t| (t, id)))
            .filter(|&(t, _)| t <= now)
            .collect();
        due.sort_unstable();
        due.into_iter().map(|(_, id)| id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct At(Option<Time>);
    impl Timed for At {
        fn deadline(&self, _: &RetransmitConfig) -> Option<Time> {
            self.0
        }
    }

    /// The index follows inserts, changes (settled or not), removals and clears.
    #[test]
    fn index_follows_every_change() {
        let mut t = Table::new(RetransmitConfig::default());
        t.insert(1, At(Some(Time(50))));
        t.insert(2, At(Some(Time(10))));
        t.insert(3, At(None));
        assert_eq!(t.next(), Some(Time(10)));
        t.get_mut(&2).unwrap().0 = Some(Time(70));
        // Not settled: still right.
        assert_eq!(t.next(), Some(Time(50)));
        assert_eq!(t.due(Time(60)), vec![1]);
        assert_eq!(t.unsettled(), 0);
        t.get_mut(&3).unwrap().0 = Some(Time(5));
        assert_eq!(t.next(), Some(Time(5)));
        t.insert(3, At(Some(Time(80))));
        assert_eq!(t.next(), Some(Time(50)));
        t.remove(&1);
        assert_eq!(t.due(Time(75)), vec![2]);
        assert_eq!(t.scan_due(Time(75)), vec![2]);
        assert_eq!(t.next(), t.scan_next());
        t.clear();
        assert_eq!(t.next(), None);
        assert!(t.due(Time(u64::MAX)).is_empty());
    }

    /// `update` indexes at once, also when the session is marked from before.
    #[test]
    fn update_indexes_at_once() {
        let mut t = Table::new(RetransmitConfig::default());
        t.insert(1, At(Some(Time(50))));
        t.insert(2, At(Some(Time(40))));
        assert_eq!(t.update(&1, |a| a.0 = Some(Time(30))), Some(()));
        assert_eq!(t.next(), Some(Time(30)));
        t.get_mut(&2).unwrap().0 = Some(Time(90));
        t.update(&2, |a| a.0 = Some(Time(20)));
        assert_eq!(t.next(), Some(Time(20)));
        t.settle();
        assert_eq!(t.due(Time(25)), vec![2]);
        assert_eq!(t.update(&3, |_| ()), None);
    }
}
