//! Peer mode: several rivulet processes share one pipeline's key groups.
//!
//! Built so far: the assignment of key groups to peers with standbys
//! ([`assign`]), the links that carry frames between peers ([`link`]),
//! which implement the exchange across processes, membership through the
//! broker ([`membership`]), mutual TLS on links ([`tls`]) and the
//! coordinator's bookkeeping of global checkpoints ([`checkpoints`]). The
//! run that uses them, and recovery on a membership change, come next.

pub mod assign;
pub mod checkpoints;
pub mod link;
pub mod membership;
pub mod run;
pub mod tls;
