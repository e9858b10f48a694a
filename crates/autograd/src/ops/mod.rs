//! The public ops. Each primitive's forward sits beside its backward rule; composite ops
//! (built from primitives, so their gradients come for free) are marked as such.

pub mod arith;
pub mod conv;
pub mod linalg;
pub mod loss;
pub mod norm;
pub mod pool;
pub mod reduce;
pub mod shape;
