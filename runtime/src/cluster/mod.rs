//! Peer mode: several rivulet processes share one pipeline's key groups.
//!
//! Built so far: the assignment of key groups to peers with standbys
//! ([`assign`]), the links that carry frames between peers ([`link`]),
//! which implement the exchange across processes, and membership through
//! the broker ([`membership`]). Global checkpoints, recovery on a
//! membership change and the `peers:` section come next.

pub mod assign;
pub mod link;
pub mod membership;
pub mod tls;
