//! Quantized checkpoint formats, defined once here: `lite` writes them and
//! the engine reads them.

pub mod awq;
pub mod kv;
