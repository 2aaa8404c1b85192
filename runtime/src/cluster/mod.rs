//! Peer mode: several rivulet processes share one pipeline's key groups.
//!
//! - [`membership`]: who is in the cluster, through the source's broker
//!   (retained presence, Last Will).
//! - [`assign`]: key groups to peers (bounded rendezvous hashing) with
//!   standbys.
//! - [`link`]: TCP links between peers (the exchange across processes,
//!   credit flow control, view fencing), with mutual TLS from [`tls`].
//! - [`run`]: one peer's life: views, restore from the last global
//!   checkpoint, global checkpoints, holds for missing peers, clean leave.
//!
//! `docs/peers.md` tells the user's side, `docs/architecture.md` the design.

pub mod assign;
pub mod link;
pub mod membership;
pub mod run;
pub mod tls;
