//! Which peer owns which key group, and which peer stands by for it.
//!
//! Bounded-load rendezvous hashing (HRW): every peer computes the same
//! table from the member list alone, with no history and no coordinator.
//! Each group gives every member a score (xxh3 of the member's id and the
//! group); the groups are visited in a fixed pseudo-random order and each
//! goes to its highest-scoring member still under the cap of
//! ⌈256 / members⌉ groups. Loads stay within one group of equal, and a
//! join or leave moves a few more groups than the minimum (about 5–35 %
//! more in simulation), against half of all groups for contiguous ranges.
//!
//! **Standby.** A group's standby is its owner in the table computed
//! without that owner. When the owner leaves, the survivors compute exactly
//! that table, so every group of the departed peer lands on its standby,
//! which already holds a copy of its checkpointed state.
//!
//! ```
//! use rivulet::cluster::assign::PeerTable;
//! let t = PeerTable::compute(7, &["pi-01", "pi-02", "pi-03"]);
//! let g = rivulet::partition::KeyGroup(42);
//! assert_ne!(Some(t.owner(g)), t.standby(g));
//! let without = PeerTable::compute(8, &["pi-01", "pi-03"]);
//! if t.owner_id(g) == "pi-02" {
//!     assert_eq!(without.owner_id(g), t.standby_id(g).unwrap());
//! }
//! ```

use crate::partition::{Assignment, KeyGroup, KEY_GROUPS};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Seed of the visiting order; fixed, so every peer visits alike.
const ORDER_SEED: u64 = 0x7269_7675_6c65_7431;

/// The owners and standbys of every key group for one member list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerTable {
    /// Bumped by every membership change (the view number).
    epoch: u64,
    /// Member ids, sorted.
    members: Vec<String>,
    /// Index into `members` per group.
    owners: Vec<u16>,
    /// Index into `members` per group; `None` with a single member.
    standbys: Vec<Option<u16>>,
}

fn score(member: &str, g: usize) -> u64 {
    xxh3_64_with_seed(member.as_bytes(), g as u64)
}

/// The groups in the fixed visiting order.
fn visiting_order() -> Vec<usize> {
    let mut order: Vec<usize> = (0..KEY_GROUPS).collect();
    order.sort_by_key(|&g| xxh3_64_with_seed(&[g as u8], ORDER_SEED));
    order
}

/// Bounded HRW over `members` (sorted, distinct): the owner index per group.
fn bounded_hrw(members: &[&str]) -> Vec<u16> {
    let n = members.len();
    let cap = KEY_GROUPS.div_ceil(n);
    let mut load = vec![0usize; n];
    let mut owners = vec![0u16; KEY_GROUPS];
    let mut ranked: Vec<(u64, usize)> = Vec::with_capacity(n);
    for g in visiting_order() {
        ranked.clear();
        ranked.extend(members.iter().enumerate().map(|(i, m)| (score(m, g), i)));
        // Highest score first; ties (never in practice) by member order.
        ranked.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        // n · cap ≥ 256, so a member under the cap always exists.
        let i = ranked
            .iter()
            .map(|&(_, i)| i)
            .find(|&i| load[i] < cap)
            .unwrap_or(ranked[0].1);
        load[i] += 1;
        owners[g] = i as u16;
    }
    owners
}

impl PeerTable {
    /// The table for `members` (any order; duplicates count once). An
    /// empty list gives an empty table that owns nothing.
    pub fn compute<S: AsRef<str>>(epoch: u64, members: &[S]) -> PeerTable {
        let mut ids: Vec<&str> = members.iter().map(AsRef::as_ref).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.is_empty() {
            return PeerTable {
                epoch,
                members: Vec::new(),
                owners: Vec::new(),
                standbys: Vec::new(),
            };
        }
        let owners = bounded_hrw(&ids);
        let mut standbys = vec![None; KEY_GROUPS];
        if ids.len() > 1 {
            for (gone, _) in ids.iter().enumerate() {
                let rest: Vec<&str> = ids
                    .iter()
                    .enumerate()
                    .filter(|&(i, _)| i != gone)
                    .map(|(_, m)| *m)
                    .collect();
                let without = bounded_hrw(&rest);
                for g in 0..KEY_GROUPS {
                    if owners[g] as usize == gone {
                        let heir = rest[without[g] as usize];
                        standbys[g] = ids.iter().position(|m| *m == heir).map(|i| i as u16);
                    }
                }
            }
        }
        PeerTable {
            epoch,
            members: ids.into_iter().map(str::to_string).collect(),
            owners,
            standbys,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Member ids, sorted; owners are indices into this list.
    pub fn members(&self) -> &[String] {
        &self.members
    }

    /// Index of a member, if it is one.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.members.binary_search_by(|m| m.as_str().cmp(id)).ok()
    }

    /// The owner of a group, as a member index.
    pub fn owner(&self, g: KeyGroup) -> usize {
        self.owners.get(g.index()).copied().unwrap_or(0) as usize
    }

    pub fn owner_id(&self, g: KeyGroup) -> &str {
        self.members
            .get(self.owner(g))
            .map(String::as_str)
            .unwrap_or("")
    }

    /// The standby of a group, as a member index (`None` alone).
    pub fn standby(&self, g: KeyGroup) -> Option<usize> {
        self.standbys
            .get(g.index())
            .copied()
            .flatten()
            .map(|i| i as usize)
    }

    pub fn standby_id(&self, g: KeyGroup) -> Option<&str> {
        self.standby(g)
            .and_then(|i| self.members.get(i))
            .map(String::as_str)
    }

    /// The groups a member owns.
    pub fn owned_by(&self, member: usize) -> Vec<KeyGroup> {
        KeyGroup::all()
            .filter(|g| self.owner(*g) == member)
            .collect()
    }

    /// The routing table of the exchange: owners by member index.
    pub fn assignment(&self) -> Option<Assignment> {
        Assignment::from_owners(self.epoch, self.owners.clone())
    }

    /// Groups whose owner differs between two tables (by member id).
    pub fn moved_from(&self, before: &PeerTable) -> Vec<KeyGroup> {
        KeyGroup::all()
            .filter(|g| self.owner_id(*g) != before.owner_id(*g))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(seed: u64, n: usize) -> Vec<String> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                format!("peer-{:x}", x % 100_000)
            })
            .collect()
    }

    #[test]
    fn every_peer_computes_the_same_table_whatever_the_order() {
        let a = PeerTable::compute(3, &["c", "a", "b"]);
        let b = PeerTable::compute(3, &["b", "c", "a", "a"]);
        assert_eq!(a, b);
        assert_eq!(a.members(), &["a", "b", "c"]);
    }

    #[test]
    fn loads_stay_under_the_cap() {
        for n in 1..=12 {
            for seed in 1..20 {
                let t = PeerTable::compute(0, &ids(seed * 31 + n as u64, n));
                let n = t.members().len();
                let cap = KEY_GROUPS.div_ceil(n);
                let loads: Vec<usize> = (0..n).map(|m| t.owned_by(m).len()).collect();
                assert_eq!(loads.iter().sum::<usize>(), KEY_GROUPS);
                assert!(loads.iter().all(|&l| l <= cap), "{loads:?} cap {cap}");
            }
        }
    }

    #[test]
    fn a_departed_peers_groups_land_on_their_standbys() {
        for seed in 1..40 {
            let members = ids(seed, 2 + (seed as usize % 5));
            let t = PeerTable::compute(1, &members);
            for gone in t.members().to_vec() {
                let rest: Vec<&String> = t.members().iter().filter(|m| **m != gone).collect();
                let after = PeerTable::compute(2, &rest);
                for g in KeyGroup::all() {
                    assert_ne!(t.standby(g), Some(t.owner(g)), "standby differs from owner");
                    if t.owner_id(g) == gone {
                        assert_eq!(Some(after.owner_id(g)), t.standby_id(g));
                    }
                }
            }
        }
    }

    #[test]
    fn a_join_or_a_leave_moves_few_groups() {
        let mut join_worst: f64 = 0.0;
        let mut leave_worst: f64 = 0.0;
        for seed in 1..40 {
            let four = ids(seed * 7919, 4);
            let three = PeerTable::compute(1, &four[..3]);
            let all = PeerTable::compute(2, &four);
            // Join: the optimum is the newcomer's fair share.
            let moved = all.moved_from(&three).len() as f64;
            join_worst = join_worst.max(moved / (KEY_GROUPS.div_ceil(4)) as f64);
            // Leave: the optimum is the departed peer's own groups.
            let gone = all.index_of(&four[1]).unwrap_or(0);
            let own = all.owned_by(gone).len() as f64;
            let rest: Vec<&String> = four.iter().filter(|m| **m != four[1]).collect();
            let after = PeerTable::compute(3, &rest);
            leave_worst = leave_worst.max(after.moved_from(&all).len() as f64 / own);
        }
        assert!(
            join_worst <= 1.35,
            "join moved {join_worst:.2}× the minimum"
        );
        assert!(
            leave_worst <= 1.35,
            "leave moved {leave_worst:.2}× the minimum"
        );
    }

    #[test]
    fn the_table_routes_the_exchange() {
        let t = PeerTable::compute(9, &["x", "y"]);
        let a = t.assignment().expect("256 groups");
        assert_eq!(a.epoch(), 9);
        for g in KeyGroup::all() {
            assert_eq!(a.owner(g), t.owner(g));
        }
        let alone = PeerTable::compute(1, &["solo"]);
        assert_eq!(alone.standby(KeyGroup(0)), None);
        assert_eq!(alone.owned_by(0).len(), KEY_GROUPS);
        assert!(PeerTable::compute(1, &[] as &[&str]).assignment().is_none());
    }
}
