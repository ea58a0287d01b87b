//! The response cache (DESIGN.md 4): keys, the storing and freshness policy, and the stored
//! entry's encoding. Not wired into the request path yet.

pub mod entry;
pub mod key;
pub mod policy;
