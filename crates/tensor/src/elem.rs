//! The element types a tensor can hold: `f32` for work, `f64` for gradient checks.

use std::fmt::{Debug, Display};

/// A floating-point element. Implemented for `f32` and `f64` only.
pub trait Elem:
    num_traits::Float
    + num_traits::FloatConst
    + std::iter::Sum
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + Default
    + Debug
    + Display
    + Send
    + Sync
    + 'static
{
    /// Lossy conversion from f64 (exact for f64, rounded for f32).
    fn c(x: f64) -> Self;
    fn as_f64(self) -> f64;
    const NAME: &'static str;
}

impl Elem for f32 {
    #[inline(always)]
    fn c(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn as_f64(self) -> f64 {
        self as f64
    }
    const NAME: &'static str = "f32";
}

impl Elem for f64 {
    #[inline(always)]
    fn c(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn as_f64(self) -> f64 {
        self
    }
    const NAME: &'static str = "f64";
}
