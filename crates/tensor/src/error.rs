//! The one error type of Stride. Every public op returns `Result<_, Error>`; the message names
//! the op and the values involved, so a user can fix the call without reading our code.

/// What went wrong, by category; the message carries the specifics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Shapes that do not fit together (rank, channel counts, broadcasting).
    Shape,
    /// An argument out of its domain (zero stride, groups that do not divide, p <= 0).
    Argument,
    /// Convolution or pooling geometry that produces no output (kernel larger than the input).
    Geometry,
    /// Misuse of the autograd tape (backward from a non-scalar, ...).
    Autograd,
    /// A tensor larger than the element limit.
    TooLarge,
    /// A device that is missing, not set up, or mixed with another in one op.
    Device,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{op}: {msg}")]
pub struct Error {
    pub kind: ErrorKind,
    /// The public op that refused its input, e.g. `conv2d`.
    pub op: &'static str,
    pub msg: String,
}

impl Error {
    pub fn new(kind: ErrorKind, op: &'static str, msg: impl Into<String>) -> Self {
        Error { kind, op, msg: msg.into() }
    }
    pub fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Shape, op, msg)
    }
    pub fn arg(op: &'static str, msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Argument, op, msg)
    }
    pub fn geometry(op: &'static str, msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Geometry, op, msg)
    }
    pub fn device(op: &'static str, msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Device, op, msg)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Return early with an error: `bail!(shape, "conv2d", "input has {} channels", c)`.
#[macro_export]
macro_rules! bail {
    ($kind:ident, $op:expr, $($fmt:tt)*) => {
        return Err($crate::Error::$kind($op, format!($($fmt)*)))
    };
}
