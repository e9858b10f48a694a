//! Stride's neural-network building blocks: the `Module` trait, layers, initialisers and
//! optimizers.
#![forbid(unsafe_code)]

pub mod blocks;
pub mod export;
pub mod init;
pub mod layers;
mod module;
pub mod optim;
pub mod planned;
pub mod schedule;
pub mod trace;

pub use module::{call, device_of, join, Ctx, Module, Slot};
pub use trace::{Field, Row, Scratch, Trace};

/// A library error with the layer it happened in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// Where: `layer 3 (Conv2d(20, 50, k5x5, ...))`, outermost first; empty at the top.
    pub context: Vec<String>,
    pub source: stride_autograd::Error,
}

impl Error {
    /// Adds an outer location to the error.
    pub fn context(mut self, c: String) -> Self {
        self.context.insert(0, c);
        self
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in &self.context {
            write!(f, "{c}: ")?;
        }
        write!(f, "{}", self.source)
    }
}

impl std::error::Error for Error {}

impl From<stride_autograd::Error> for Error {
    fn from(source: stride_autograd::Error) -> Self {
        Error { context: Vec::new(), source }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
