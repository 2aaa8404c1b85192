//! Global checkpoints: the bookkeeping of which checkpoints the whole
//! cluster has, kept by the coordinator (no I/O here).
//!
//! In peer mode a checkpoint `n` is a cut through every peer's input
//! journal (`J_n[p]`) plus the state of every key group at that cut. Each
//! peer commits its part locally and reports it; checkpoint `n` is
//! **complete** only when every member of the view has committed it. Then,
//! and only then:
//! - a peer may trim its journal below its position in `n` (nothing a
//!   rollback could need is lost);
//! - `n` is where the cluster restarts from after a membership change.
//!
//! Reports are fenced by the view: a report of another view, or of a peer
//! that is not a member, changes nothing. A view change abandons the
//! checkpoints in progress; the last complete one stays.

use std::collections::{BTreeMap, BTreeSet};

/// A complete checkpoint: its id and each member's journal position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Complete {
    pub id: u64,
    pub positions: BTreeMap<String, u64>,
}

/// The coordinator's view of checkpoints (see the module docs).
#[derive(Clone, Debug)]
pub struct GlobalCheckpoints {
    view: u64,
    members: BTreeSet<String>,
    /// Checkpoint id → the members that committed it, with positions.
    pending: BTreeMap<u64, BTreeMap<String, u64>>,
    complete: Option<Complete>,
}

impl GlobalCheckpoints {
    pub fn new<S: AsRef<str>>(view: u64, members: &[S]) -> Self {
        GlobalCheckpoints {
            view,
            members: members.iter().map(|m| m.as_ref().to_string()).collect(),
            pending: BTreeMap::new(),
            complete: None,
        }
    }

    pub fn view(&self) -> u64 {
        self.view
    }

    /// The last complete checkpoint, if any.
    pub fn complete(&self) -> Option<&Complete> {
        self.complete.as_ref()
    }

    /// Member `peer` of view `view` committed checkpoint `id` with its
    /// journal at `position`. Returns the id when this completes a
    /// checkpoint newer than the last complete one.
    pub fn committed(&mut self, view: u64, peer: &str, id: u64, position: u64) -> Option<u64> {
        if view != self.view || !self.members.contains(peer) {
            return None;
        }
        if self.complete.as_ref().is_some_and(|c| c.id >= id) {
            return None;
        }
        let got = self.pending.entry(id).or_default();
        got.insert(peer.to_string(), position);
        if got.len() < self.members.len() {
            return None;
        }
        let positions = self.pending.remove(&id).unwrap_or_default();
        // Anything older can no longer complete usefully.
        self.pending.retain(|&p, _| p > id);
        self.complete = Some(Complete { id, positions });
        Some(id)
    }

    /// Where `peer` may trim its journal up to (inclusive): its position
    /// in the last complete checkpoint.
    pub fn trim_point(&self, peer: &str) -> Option<u64> {
        self.complete.as_ref()?.positions.get(peer).copied()
    }

    /// A new view (members joined, left or restarted): checkpoints in
    /// progress are abandoned. Returns the checkpoint every member
    /// restarts from (`None`: from the beginning).
    pub fn change_view<S: AsRef<str>>(&mut self, view: u64, members: &[S]) -> Option<&Complete> {
        self.view = view;
        self.members = members.iter().map(|m| m.as_ref().to_string()).collect();
        self.pending.clear();
        self.complete.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_completes_when_every_member_committed_it() {
        let mut g = GlobalCheckpoints::new(1, &["a", "b", "c"]);
        assert_eq!(g.committed(1, "a", 1, 10), None);
        assert_eq!(g.committed(1, "c", 1, 30), None);
        assert_eq!(g.trim_point("a"), None, "nothing complete: trim nothing");
        assert_eq!(g.committed(1, "b", 1, 20), Some(1));
        assert_eq!(g.trim_point("b"), Some(20));
        assert_eq!(g.complete().map(|c| c.id), Some(1));
        // A repeated report changes nothing.
        assert_eq!(g.committed(1, "b", 1, 20), None);
    }

    #[test]
    fn reports_of_other_views_and_strangers_are_fenced() {
        let mut g = GlobalCheckpoints::new(2, &["a", "b"]);
        assert_eq!(g.committed(1, "a", 5, 1), None, "an old view");
        assert_eq!(g.committed(2, "zombie", 5, 1), None, "not a member");
        assert_eq!(g.committed(2, "a", 5, 1), None);
        assert_eq!(g.committed(1, "b", 5, 1), None, "b of the old view");
        assert!(g.complete().is_none());
        assert_eq!(g.committed(2, "b", 5, 2), Some(5));
    }

    #[test]
    fn a_newer_checkpoint_completing_drops_older_ones_in_progress() {
        let mut g = GlobalCheckpoints::new(1, &["a", "b"]);
        g.committed(1, "a", 1, 10);
        g.committed(1, "a", 2, 20);
        g.committed(1, "b", 2, 25);
        assert_eq!(g.complete().map(|c| c.id), Some(2));
        assert_eq!(g.committed(1, "b", 1, 15), None, "1 is older than 2");
        assert_eq!(g.trim_point("a"), Some(20));
    }

    #[test]
    fn a_view_change_abandons_what_is_in_progress_and_keeps_the_last_complete() {
        let mut g = GlobalCheckpoints::new(1, &["a", "b"]);
        g.committed(1, "a", 1, 10);
        g.committed(1, "b", 1, 11);
        g.committed(1, "a", 2, 20);
        let restart = g.change_view(2, &["a", "c"]).cloned();
        assert_eq!(restart.map(|c| c.id), Some(1));
        // The half-done checkpoint 2 is gone: c's report alone does not
        // complete it.
        assert_eq!(g.committed(2, "c", 2, 5), None);
        assert_eq!(g.committed(2, "a", 2, 21), Some(2));
        assert_eq!(g.view(), 2);
    }
}
