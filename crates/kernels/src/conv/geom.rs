//! Convolution geometry in one place: padding rules, output sizes and every validation.
//!
//! Dimension letters: N batch, C input channels, K output channels, H x W input, P x Q
//! output, R x S kernel. A `ConvGeom` always describes the *forward convolution* from the
//! large side (N, C, H, W) to the small side (N, K, P, Q). A transposed convolution is the
//! same geometry run backwards: its input is the small side and its output the large side.

use stride_tensor::{Error, Result};

/// How a convolution or pooling pads its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Padding {
    /// No padding.
    #[default]
    Valid,
    /// TensorFlow's "same": output = ceil(input / stride); the total padding is split with the
    /// extra row or column at the bottom/right when it is odd.
    Same,
    /// "Same" with the extra row or column at the top/left (ONNX's SAME_LOWER).
    SameLower,
    /// Explicit padding per side.
    Explicit { top: usize, bottom: usize, left: usize, right: usize },
}

impl Padding {
    /// The same padding on all four sides (PyTorch's `padding=p`).
    pub fn uniform(p: usize) -> Self {
        Padding::Explicit { top: p, bottom: p, left: p, right: p }
    }
    /// PyTorch's `padding=(ph, pw)`.
    pub fn hw(ph: usize, pw: usize) -> Self {
        Padding::Explicit { top: ph, bottom: ph, left: pw, right: pw }
    }
}

/// Options of a 2-D convolution, with PyTorch's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dOptions {
    pub stride: (usize, usize),
    pub padding: Padding,
    pub dilation: (usize, usize),
    pub groups: usize,
    /// Transposed convolution only: extra rows/columns at the bottom/right of the output.
    pub output_padding: (usize, usize),
}

impl Default for Conv2dOptions {
    fn default() -> Self {
        Conv2dOptions { stride: (1, 1), padding: Padding::Valid, dilation: (1, 1), groups: 1, output_padding: (0, 0) }
    }
}

impl Conv2dOptions {
    pub fn stride(mut self, s: usize) -> Self {
        self.stride = (s, s);
        self
    }
    pub fn padding(mut self, p: Padding) -> Self {
        self.padding = p;
        self
    }
    pub fn dilation(mut self, d: usize) -> Self {
        self.dilation = (d, d);
        self
    }
    pub fn groups(mut self, g: usize) -> Self {
        self.groups = g;
        self
    }
    pub fn output_padding(mut self, p: usize) -> Self {
        self.output_padding = (p, p);
        self
    }
}

/// The padding (before, after) of one spatial axis for a *forward* window op.
pub fn resolve_padding(padding: Padding, axis_h: bool, input: usize, k_eff: usize, stride: usize) -> (usize, usize) {
    match padding {
        Padding::Valid => (0, 0),
        Padding::Same | Padding::SameLower => {
            let out = input.div_ceil(stride);
            let total = ((out.max(1) - 1) * stride + k_eff).saturating_sub(input);
            if padding == Padding::Same {
                (total / 2, total - total / 2)
            } else {
                (total - total / 2, total / 2)
            }
        }
        Padding::Explicit { top, bottom, left, right } => {
            if axis_h {
                (top, bottom)
            } else {
                (left, right)
            }
        }
    }
}

/// Output size of a forward window op on one axis, or an error naming the numbers.
pub fn window_out(op: &'static str, axis: &str, input: usize, pad: (usize, usize), k: usize, dil: usize, stride: usize) -> Result<usize> {
    let k_eff = (k - 1) * dil + 1;
    let padded = input + pad.0 + pad.1;
    if padded < k_eff {
        let dil_note = if dil > 1 { format!(" (dilation {dil}: effective {k_eff})") } else { String::new() };
        return Err(Error::geometry(
            op,
            format!("kernel {k}{dil_note} is larger than the padded input {padded} along {axis} (input {input} + padding {}+{})", pad.0, pad.1),
        ));
    }
    Ok((padded - k_eff) / stride + 1)
}

/// The geometry of one convolution (see the module docs for the letters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    pub n: usize,
    pub c: usize,
    pub k: usize,
    pub h: usize,
    pub w: usize,
    pub p: usize,
    pub q: usize,
    pub r: usize,
    pub s: usize,
    pub stride: (usize, usize),
    pub dilation: (usize, usize),
    /// Padding (top, bottom, left, right) of the large side.
    pub pad: (usize, usize, usize, usize),
    pub groups: usize,
}

fn dims4(op: &'static str, what: &str, shape: &[usize]) -> Result<[usize; 4]> {
    match *shape {
        [a, b, c, d] => Ok([a, b, c, d]),
        _ => Err(Error::shape(op, format!("{what} must be 4-D, got shape {shape:?} (rank {})", shape.len()))),
    }
}

fn check_common(op: &'static str, o: &Conv2dOptions) -> Result<()> {
    if o.stride.0 == 0 || o.stride.1 == 0 {
        return Err(Error::arg(op, format!("stride must be at least 1, got {:?}", o.stride)));
    }
    if o.dilation.0 == 0 || o.dilation.1 == 0 {
        return Err(Error::arg(op, format!("dilation must be at least 1, got {:?}", o.dilation)));
    }
    if o.groups == 0 {
        return Err(Error::arg(op, "groups must be at least 1, got 0"));
    }
    Ok(())
}

impl ConvGeom {
    /// Geometry of `conv2d(x, weight)`: x is [N, C, H, W], weight is [K, C/groups, R, S].
    pub fn conv2d(x: &[usize], weight: &[usize], o: &Conv2dOptions) -> Result<Self> {
        const OP: &str = "conv2d";
        check_common(OP, o)?;
        let [n, c, h, w] = dims4(OP, "input", x)?;
        let [k, cg, r, s] = dims4(OP, "weight", weight)?;
        let g = o.groups;
        if c % g != 0 || k % g != 0 {
            return Err(Error::arg(OP, format!("groups {g} must divide both the input channels {c} and the output channels {k}")));
        }
        if cg * g != c {
            return Err(Error::shape(OP, format!("input has {c} channels but the weight expects {} (weight {weight:?}, groups {g})", cg * g)));
        }
        if r == 0 || s == 0 || k == 0 || c == 0 {
            return Err(Error::shape(OP, format!("input {x:?} or weight {weight:?} has no channels or an empty kernel")));
        }
        let ph = resolve_padding(o.padding, true, h, (r - 1) * o.dilation.0 + 1, o.stride.0);
        let pw = resolve_padding(o.padding, false, w, (s - 1) * o.dilation.1 + 1, o.stride.1);
        let p = window_out(OP, "height", h, ph, r, o.dilation.0, o.stride.0)?;
        let q = window_out(OP, "width", w, pw, s, o.dilation.1, o.stride.1)?;
        let g = ConvGeom { n, c, k, h, w, p, q, r, s, stride: o.stride, dilation: o.dilation, pad: (ph.0, ph.1, pw.0, pw.1), groups: g };
        g.check_size(OP)?;
        Ok(g)
    }

    /// Geometry of `conv_transpose2d(x, weight)`: x is [N, Cin, Hin, Win] and weight is
    /// [Cin, Cout/groups, R, S] (PyTorch's layout). The output is [N, Cout, Hout, Wout] with
    /// Hout = (Hin-1)*stride - pad_top - pad_bottom + dilation*(R-1) + output_padding + 1.
    /// `Padding::Same` gives Hout = Hin * stride (Keras's rule).
    pub fn conv_transpose2d(x: &[usize], weight: &[usize], o: &Conv2dOptions) -> Result<Self> {
        const OP: &str = "conv_transpose2d";
        check_common(OP, o)?;
        let [n, k, p, q] = dims4(OP, "input", x)?;
        let [wk, cg, r, s] = dims4(OP, "weight", weight)?;
        let g = o.groups;
        if k % g != 0 {
            return Err(Error::arg(OP, format!("groups {g} must divide the input channels {k}")));
        }
        if wk != k {
            return Err(Error::shape(OP, format!("input has {k} channels but the weight expects {wk} (weight {weight:?})")));
        }
        if r == 0 || s == 0 || cg == 0 {
            return Err(Error::shape(OP, format!("weight {weight:?} has an empty kernel or no output channels")));
        }
        let (st, dl, op) = (o.stride, o.dilation, o.output_padding);
        if (op.0 >= st.0 && op.0 >= dl.0) || (op.1 >= st.1 && op.1 >= dl.1) {
            return Err(Error::arg(OP, format!("output_padding {op:?} must be smaller than the stride {st:?} or the dilation {dl:?}")));
        }
        let axis = |inp: usize, kk: usize, stride: usize, dil: usize, outpad: usize, is_h: bool| -> Result<(usize, (usize, usize))> {
            let k_eff = (kk - 1) * dil + 1;
            let full = (inp.max(1) - 1) * stride + k_eff;
            let (pads, extra) = match o.padding {
                Padding::Same | Padding::SameLower => {
                    let total = k_eff.saturating_sub(stride);
                    let pads = if o.padding == Padding::Same { (total / 2, total - total / 2) } else { (total - total / 2, total / 2) };
                    (pads, stride.saturating_sub(k_eff) + outpad)
                }
                other => (resolve_padding(other, is_h, 0, k_eff, stride), outpad),
            };
            let full = full + extra;
            if inp == 0 || full <= pads.0 + pads.1 {
                return Err(Error::geometry(
                    OP,
                    format!(
                        "output {} would be empty: input {inp}, kernel {kk}, stride {stride}, padding {}+{}",
                        if is_h { "height" } else { "width" },
                        pads.0,
                        pads.1
                    ),
                ));
            }
            Ok((full - pads.0 - pads.1, pads))
        };
        let (h, ph) = axis(p, r, st.0, dl.0, op.0, true)?;
        let (w, pw) = axis(q, s, st.1, dl.1, op.1, false)?;
        let geo = ConvGeom { n, c: cg * g, k, h, w, p, q, r, s, stride: st, dilation: dl, pad: (ph.0, ph.1, pw.0, pw.1), groups: g };
        geo.check_size(OP)?;
        Ok(geo)
    }

    fn check_size(&self, op: &'static str) -> Result<()> {
        for shape in [self.large_shape(), self.small_shape()] {
            stride_tensor::shape::numel(op, &shape)?;
        }
        stride_tensor::shape::numel(op, &[self.cg(), self.r, self.s, self.p, self.q])?;
        Ok(())
    }

    /// [N, C, H, W]
    pub fn large_shape(&self) -> [usize; 4] {
        [self.n, self.c, self.h, self.w]
    }
    /// [N, K, P, Q]
    pub fn small_shape(&self) -> [usize; 4] {
        [self.n, self.k, self.p, self.q]
    }
    /// [K, C/groups, R, S]
    pub fn weight_shape(&self) -> [usize; 4] {
        [self.k, self.cg(), self.r, self.s]
    }
    /// Input channels per group.
    pub fn cg(&self) -> usize {
        self.c / self.groups
    }
    /// Output channels per group.
    pub fn kg(&self) -> usize {
        self.k / self.groups
    }
    /// Multiply-adds times two, per SPEC.md.
    pub fn flops(&self) -> f64 {
        2.0 * (self.n * self.k * self.p * self.q) as f64 * (self.cg() * self.r * self.s) as f64
    }
    /// 1x1 kernel, stride 1, no padding: the convolution is a plain matrix product.
    pub fn is_pointwise(&self) -> bool {
        self.r == 1 && self.s == 1 && self.stride == (1, 1) && self.pad == (0, 0, 0, 0) && self.p == self.h && self.q == self.w
    }
    /// One input channel per group (depthwise, or a single-channel input).
    pub fn is_depthwise(&self) -> bool {
        self.cg() == 1
    }
}
