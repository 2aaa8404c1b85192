//! Key groups: the unit of parallelism, of state storage and of movement.
//!
//! A key hashes (xxh3 of its encoded bytes, [`crate::value::hash_key`]) to
//! one of [`KEY_GROUPS`] groups: the top 8 bits of the hash. An
//! [`Assignment`] gives every group one owner — a worker thread today, a
//! peer in peer mode — and carries an epoch, bumped whenever owners change,
//! so a message routed under an old assignment can be recognised.
//!
//! This module is the only place that knows how a hash becomes a group and
//! how groups are dealt to owners. State written by earlier versions uses
//! the same rule (`hash >> 56`), so it still loads.
//!
//! ```
//! use rivulet::partition::{Assignment, KeyGroup};
//! let a = Assignment::contiguous(2);
//! let g = KeyGroup::of_key(b"sensor-7");
//! assert!(a.owner(g) < 2);
//! assert_eq!(a.groups_of(0).count() + a.groups_of(1).count(), 256);
//! ```
//!
//! Costs: finding an owner is one load from a 256-entry table.

use serde::{Deserialize, Serialize};

/// Number of key groups; fixed, since saved state is laid out by group.
pub const KEY_GROUPS: usize = 256;

/// One of the [`KEY_GROUPS`] key groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KeyGroup(pub u8);

impl KeyGroup {
    /// The group of a key hash.
    #[inline]
    pub fn of_hash(hash: u64) -> KeyGroup {
        KeyGroup((hash >> 56) as u8)
    }

    /// The group of encoded key bytes.
    #[inline]
    pub fn of_key(key: &[u8]) -> KeyGroup {
        Self::of_hash(crate::value::hash_key(key))
    }

    #[inline]
    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// Every group, in order.
    pub fn all() -> impl Iterator<Item = KeyGroup> {
        (0..KEY_GROUPS).map(|g| KeyGroup(g as u8))
    }
}

/// Which owner (worker or peer, by index) holds each key group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// Bumped by every change of owners.
    epoch: u64,
    /// Number of owners; every index in `owners` is below it.
    size: usize,
    /// `owners[g]`: the owner of group `g`.
    owners: Vec<u16>,
}

impl Assignment {
    /// `n` owners, each holding one contiguous range of groups of nearly
    /// equal size (owner `j` holds `[j·256/n, (j+1)·256/n)`); epoch 0.
    /// `n` is clamped to `1..=256`.
    pub fn contiguous(n: usize) -> Assignment {
        let n = n.clamp(1, KEY_GROUPS);
        let owners = (0..KEY_GROUPS)
            .map(|g| (g * n / KEY_GROUPS) as u16)
            .collect();
        Assignment {
            epoch: 0,
            size: n,
            owners,
        }
    }

    /// An assignment from an explicit table (`owners[g]` for each group).
    /// `None` unless it has [`KEY_GROUPS`] entries.
    pub fn from_owners(epoch: u64, owners: Vec<u16>) -> Option<Assignment> {
        if owners.len() != KEY_GROUPS {
            return None;
        }
        let size = owners.iter().map(|&o| o as usize + 1).max().unwrap_or(1);
        Some(Assignment {
            epoch,
            size,
            owners,
        })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Number of owners.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The owner of a group.
    #[inline]
    pub fn owner(&self, g: KeyGroup) -> usize {
        self.owners[g.index()] as usize
    }

    /// The owner of a key hash (the hot path of routing).
    #[inline]
    pub fn owner_of_hash(&self, hash: u64) -> usize {
        self.owner(KeyGroup::of_hash(hash))
    }

    /// The groups an owner holds, in order.
    pub fn groups_of(&self, owner: usize) -> impl Iterator<Item = KeyGroup> + '_ {
        KeyGroup::all().filter(move |g| self.owner(*g) == owner)
    }

    /// The share of `total` (a bound on keys, say) that belongs to an
    /// owner by the groups it holds, rounded up, at least 1.
    pub fn share_of(&self, owner: usize, total: usize) -> usize {
        let groups = self.groups_of(owner).count();
        (total * groups).div_ceil(KEY_GROUPS).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_is_the_top_byte_of_the_hash() {
        assert_eq!(KeyGroup::of_hash(0xAB00_0000_0000_0001), KeyGroup(0xAB));
        let key = b"\x03sensor-1";
        assert_eq!(
            KeyGroup::of_key(key).0 as u64,
            crate::value::hash_key(key) >> 56
        );
    }

    #[test]
    fn contiguous_owners_hold_ranges_of_nearly_equal_size() {
        for n in 1..=9 {
            let a = Assignment::contiguous(n);
            assert_eq!(a.size(), n);
            let mut last = 0;
            for g in KeyGroup::all() {
                let o = a.owner(g);
                assert!(o >= last && o < n, "ranges are contiguous and ordered");
                last = o;
                assert_eq!(
                    o,
                    g.index() * n / KEY_GROUPS,
                    "the layout of earlier versions"
                );
            }
            let sizes: Vec<usize> = (0..n).map(|j| a.groups_of(j).count()).collect();
            assert_eq!(sizes.iter().sum::<usize>(), KEY_GROUPS);
            assert!(sizes.iter().max().unwrap_or(&0) - sizes.iter().min().unwrap_or(&0) <= 1);
        }
    }

    #[test]
    fn shares_of_a_bound_cover_it() {
        let a = Assignment::contiguous(3);
        let total: usize = (0..3).map(|j| a.share_of(j, 1000)).sum();
        assert!((1000..1003).contains(&total));
        assert_eq!(a.share_of(0, 1), 1);
    }

    #[test]
    fn explicit_tables_must_name_every_group() {
        assert!(Assignment::from_owners(1, vec![0; 10]).is_none());
        let mut owners = vec![0u16; KEY_GROUPS];
        owners[7] = 2;
        let a = Assignment::from_owners(5, owners).expect("256 entries");
        assert_eq!((a.epoch(), a.size()), (5, 3));
        assert_eq!(a.groups_of(2).collect::<Vec<_>>(), vec![KeyGroup(7)]);
    }
}
