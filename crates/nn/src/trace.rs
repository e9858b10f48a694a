//! Looking inside a forward pass: with `Ctx::trace` set, every layer a container runs leaves a
//! row with its output shape, parameters, multiply-adds, receptive field and the bytes it put
//! on the autograd tape. `stride summary` prints these rows.

use stride_autograd::{Var, Workspace};

/// Memory a layer holds while it runs besides its input and output, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scratch {
    /// Per image of the batch (max pooling's argmax, a block's intermediate value).
    pub per_image: u64,
    /// A convolution's working memory (im2col columns, Winograd's transformed tiles).
    pub work: Workspace,
}

impl Scratch {
    pub fn per_image(bytes: u64) -> Scratch {
        Scratch { per_image: bytes, ..Scratch::default() }
    }
    /// Bytes held at once for a batch of `batch` images on `threads` threads.
    pub fn bytes(&self, batch: usize, threads: usize) -> u64 {
        self.per_image * batch as u64 + self.work.total(batch, threads)
    }
}

/// What one output value sees of the input image, along (height, width).
///
/// `size` is the receptive field in input pixels and `jump` the distance in input pixels
/// between neighbouring outputs (the effective stride). A layer with kernel k, stride s and
/// dilation d maps (size, jump) to (size + (k - 1) d jump, jump s). `whole` marks values that
/// depend on every input pixel (after a dense layer).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Field {
    pub size: [f64; 2],
    pub jump: [f64; 2],
    pub whole: bool,
}

impl Field {
    /// An input pixel sees itself.
    pub const PIXEL: Field = Field { size: [1.0; 2], jump: [1.0; 2], whole: false };

    /// After a sliding window.
    pub fn window(self, kernel: (usize, usize), stride: (usize, usize), dilation: (usize, usize)) -> Field {
        let k = [kernel.0, kernel.1];
        let s = [stride.0, stride.1];
        let d = [dilation.0, dilation.1];
        let mut out = self;
        for i in 0..2 {
            out.size[i] = self.size[i] + (k[i].max(1) - 1) as f64 * d[i] as f64 * self.jump[i];
            out.jump[i] = self.jump[i] * s[i] as f64;
        }
        out
    }

    /// After a transposed convolution with stride s: each output sees ceil(k / s) inputs along
    /// an axis, and outputs are s times closer together.
    pub fn transposed(self, kernel: (usize, usize), stride: (usize, usize), dilation: (usize, usize)) -> Field {
        let k = [kernel.0, kernel.1];
        let s = [stride.0.max(1), stride.1.max(1)];
        let d = [dilation.0, dilation.1];
        let mut out = self;
        for i in 0..2 {
            let span = ((k[i].max(1) - 1) * d[i]) / s[i];
            out.size[i] = self.size[i] + span as f64 * self.jump[i];
            out.jump[i] = self.jump[i] / s[i] as f64;
        }
        out
    }

    /// Every value depends on the whole input.
    pub fn whole(self) -> Field {
        Field { whole: true, ..self }
    }

    /// Where branches meet (a residual sum, a concatenation): the larger field.
    pub fn max(self, other: Field) -> Field {
        Field {
            size: [self.size[0].max(other.size[0]), self.size[1].max(other.size[1])],
            jump: [self.jump[0].max(other.jump[0]), self.jump[1].max(other.jump[1])],
            whole: self.whole || other.whole,
        }
    }
}

/// One layer of a traced forward pass. Counts are per image.
#[derive(Clone, Debug)]
pub struct Row {
    /// Dotted path, as the layer's parameters are named (`layer1.0.conv1`).
    pub path: String,
    /// The layer's description, or what a block does where its branches meet (`add, relu`).
    pub layer: String,
    pub input: Vec<usize>,
    pub output: Vec<usize>,
    pub params: usize,
    /// Multiply-adds per image (convolutions and dense layers).
    pub macs: u64,
    /// Scratch bytes besides the output; see `Module::scratch`.
    pub scratch: Scratch,
    pub field: Field,
    /// Bytes per image this layer put on the autograd tape (what training keeps for backward).
    pub tape_bytes: u64,
    /// The rows whose outputs this layer reads (`None`: the network's input).
    pub inputs: Vec<Option<usize>>,
}

/// The rows of a traced pass, and which row made each value seen so far.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    pub rows: Vec<Row>,
    /// (value, row): a container read the value (`None`: the network's input) and holds it
    /// until that row, its last, has run.
    pub holds: Vec<(Option<usize>, usize)>,
    made_by: Vec<(Var, usize)>,
}

impl Trace {
    pub fn new() -> Self {
        Trace::default()
    }
    /// The row whose output `v` is (`None` for the network's input or a value made inside a block).
    pub fn producer(&self, v: &Var) -> Option<usize> {
        self.made_by.iter().rev().find(|(k, _)| k.same(v)).map(|(_, i)| *i)
    }
    /// The receptive field of `v`: its producer's, or a pixel's for the input.
    pub fn field_of(&self, v: &Var) -> Field {
        self.producer(v).map_or(Field::PIXEL, |i| self.rows[i].field)
    }
    /// The value row `i` produced (kept while the trace lives: feature maps, Grad-CAM).
    pub fn output(&self, i: usize) -> Option<&Var> {
        self.made_by.get(i).map(|(v, _)| v)
    }
    /// The index of the row at dotted `path`, or an error listing the paths there are.
    pub fn find(&self, path: &str) -> std::result::Result<usize, String> {
        self.rows.iter().position(|r| r.path == path).ok_or_else(|| {
            let some: Vec<&str> = self.rows.iter().map(|r| r.path.as_str()).collect();
            format!("no layer '{path}'; the layers are: {}", some.join(", "))
        })
    }
    pub(crate) fn push(&mut self, row: Row, output: &Var) {
        self.made_by.push((output.clone(), self.rows.len()));
        self.rows.push(row);
    }
}
