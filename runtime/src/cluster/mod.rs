//! Peer mode: several rivulet processes share one pipeline's key groups.
//!
//! Built so far: the assignment of key groups to peers with standbys
//! ([`assign`]) and the links that carry frames between peers ([`link`]),
//! which implement the exchange across processes. Membership, global
//! checkpoints and hand-over come next (see `docs/architecture.md`).

pub mod assign;
pub mod link;
