//! Small helpers with no dependency on the rest of the crate (leaves of
//! the module graph, so no layer imports another just for them).

pub mod memory;
pub mod suggest;
