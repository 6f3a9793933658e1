//! The batching engine's device-independent parts. The scheduler and the
//! block manager are pure logic: they never touch a device, so they are
//! tested without a model.

pub mod block_manager;
pub mod scheduler;
