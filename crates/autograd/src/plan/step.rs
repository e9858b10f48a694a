//! A plan's steps (plain data: kernel, geometry, buffer ids) and the placement of their
//! buffers in one arena by liveness.

use stride_kernels::binary::BinOp;
use stride_kernels::conv::planned::{Layout, Prepared};
use stride_kernels::conv::ConvGeom;
use stride_kernels::gemm::Panels;
use stride_kernels::pool::PoolGeom;
use stride_kernels::unary::Unary;
use stride_tensor::{Result, Tensor};

/// A buffer of the arena, by index.
pub(super) type Buf = usize;

/// Where a step reads a value from: the arena or a constant captured at compile time.
#[derive(Clone, Copy, Debug)]
pub(super) enum Src {
    Buf(Buf),
    Const(usize),
}

pub(super) type Fallback = Box<dyn Fn(&[Tensor<f32>]) -> Result<Tensor<f32>>>;

pub(super) enum Step {
    Relayout {
        src: Buf,
        dst: Buf,
        from: Layout,
        to: Layout,
        dims: [usize; 3],
    },
    Conv {
        geom: ConvGeom,
        layout: Layout,
        w: Prepared<'static, f32>,
        bias: Option<Vec<f32>>,
        residual: Option<Buf>,
        act: Option<Unary>,
        /// A 2x2 average pooling of the output, done piece by piece inside the convolution
        /// (`dst` then holds the pooled values).
        pool: Option<Box<PoolGeom>>,
        src: Buf,
        dst: Buf,
    },
    MaxPool {
        geom: PoolGeom,
        src: Buf,
        dst: Buf,
    },
    /// Softmax or log-softmax along the middle axis of [outer, dim, inner] (`dims`).
    Softmax {
        dims: [usize; 3],
        log: bool,
        src: Buf,
        dst: Buf,
    },
    /// Nearest-neighbour upsampling of planes `hw` by whole factors `scale`.
    Upsample {
        hw: (usize, usize),
        scale: (usize, usize),
        src: Buf,
        dst: Buf,
    },
    AvgPool {
        geom: PoolGeom,
        src: Buf,
        dst: Buf,
    },
    /// Adaptive average pooling of [N, C, H, W] (`dims`) to `out` (global pooling at 1x1).
    AdaptiveAvg {
        dims: [usize; 4],
        out: (usize, usize),
        src: Buf,
        dst: Buf,
    },
    Unary {
        f: Unary,
        src: Buf,
        dst: Buf,
    },
    /// Add, sub, mul or div of operands shaped `shapes`, broadcast as NumPy does (both NCHW),
    /// or of the same shape (in any one layout), then an optional activation.
    Binary {
        op: BinOp,
        a: Src,
        b: Src,
        shapes: Box<[Vec<usize>; 2]>,
        act: Option<Unary>,
        dst: Buf,
    },
    /// Per-channel `x * scale + shift` (batch norm in inference), then an optional activation.
    Affine {
        scale: Vec<f32>,
        shift: Vec<f32>,
        layout: Layout,
        dims: [usize; 3],
        act: Option<Unary>,
        src: Buf,
        dst: Buf,
    },
    /// a [m, k] x b [k, n] (or b^T when b is stored [n, k]) + bias [n], then an activation.
    MatMul {
        a: Src,
        b: Src,
        dims: [usize; 3],
        transpose_b: bool,
        /// Weights stored [n, k] against a few rows (one image): laid out once in panels.
        panels: Option<Panels<f32>>,
        bias: Option<Vec<f32>>,
        act: Option<Unary>,
        dst: Buf,
    },
    /// Axes permuted: output axis `a` (of `shape[a]`) reads the input `read[a]` apart.
    Permute {
        shape: Vec<usize>,
        read: Vec<usize>,
        src: Buf,
        dst: Buf,
    },
    /// A slice along an axis: output row `i` (`row` values) is input row `i` (`from` values)
    /// from `offset` on (a channel split).
    Narrow {
        row: usize,
        from: usize,
        offset: usize,
        src: Buf,
        dst: Buf,
    },
    /// Sums of consecutive runs of `len` values (a sum over trailing axes: layer norm's).
    SumRuns {
        len: usize,
        src: Buf,
        dst: Buf,
    },
    /// Concatenation along an axis: `outer` runs of each source's `chunks[i]` elements.
    Concat {
        srcs: Vec<Src>,
        chunks: Vec<usize>,
        outer: usize,
        dst: Buf,
    },
    /// Layer norm over runs of `weight.len()` values (trailing axes), `weight` and `bias` per
    /// position of a run, matched from the ops `layer_norm` records.
    LayerNorm {
        eps: f32,
        weight: Vec<f32>,
        bias: Option<Vec<f32>>,
        src: Buf,
        dst: Buf,
    },
    /// Channels of 4-D sources in one layout, gathered (`planned::pick_channels`): output
    /// channel `k` is channel `picks[k].1` of `srcs[picks[k].0]` (buffer, channels). Channel
    /// concatenations, splits and shuffles, merged into one gather where one feeds the next.
    Channels {
        what: String,
        srcs: Vec<(Buf, usize)>,
        picks: Vec<(usize, usize)>,
        layout: Layout,
        /// Images and plane size.
        dims: [usize; 2],
        dst: Buf,
    },
    /// Anything else: the eager forward on copies of its inputs (NCHW).
    Fallback {
        name: &'static str,
        f: Fallback,
        srcs: Vec<(Src, Vec<usize>)>,
        dst: Buf,
    },
}

impl Step {
    pub(super) fn reads(&self) -> Vec<Buf> {
        let bufs = |s: &[Src]| s.iter().filter_map(|s| if let Src::Buf(b) = s { Some(*b) } else { None }).collect::<Vec<_>>();
        match self {
            Step::Relayout { src, .. }
            | Step::MaxPool { src, .. }
            | Step::Upsample { src, .. }
            | Step::Softmax { src, .. }
            | Step::AvgPool { src, .. }
            | Step::AdaptiveAvg { src, .. }
            | Step::Permute { src, .. }
            | Step::Narrow { src, .. }
            | Step::SumRuns { src, .. }
            | Step::LayerNorm { src, .. }
            | Step::Unary { src, .. }
            | Step::Affine { src, .. } => vec![*src],
            Step::Conv { src, residual, .. } => std::iter::once(*src).chain(*residual).collect(),
            Step::Binary { a, b, .. } | Step::MatMul { a, b, .. } => bufs(&[*a, *b]),
            Step::Concat { srcs, .. } => bufs(srcs),
            Step::Channels { srcs, .. } => srcs.iter().map(|s| s.0).collect(),
            Step::Fallback { srcs, .. } => bufs(&srcs.iter().map(|s| s.0).collect::<Vec<_>>()),
        }
    }
    pub(super) fn writes(&self) -> Buf {
        match self {
            Step::Relayout { dst, .. }
            | Step::Conv { dst, .. }
            | Step::MaxPool { dst, .. }
            | Step::Upsample { dst, .. }
            | Step::Softmax { dst, .. }
            | Step::AvgPool { dst, .. }
            | Step::AdaptiveAvg { dst, .. }
            | Step::Permute { dst, .. }
            | Step::Narrow { dst, .. }
            | Step::SumRuns { dst, .. }
            | Step::LayerNorm { dst, .. }
            | Step::Unary { dst, .. }
            | Step::Binary { dst, .. }
            | Step::Affine { dst, .. }
            | Step::MatMul { dst, .. }
            | Step::Concat { dst, .. }
            | Step::Channels { dst, .. }
            | Step::Fallback { dst, .. } => *dst,
        }
    }
    /// A short name for `describe`.
    pub(super) fn name(&self) -> String {
        match self {
            Step::Relayout { from, to, .. } => format!("relayout {from:?} -> {to:?}"),
            Step::Conv { w, layout, bias, residual, act, pool, .. } => {
                let mut s = format!("conv2d {:?} {layout:?}", w.algo());
                if bias.is_some() {
                    s += " +bias";
                }
                if residual.is_some() {
                    s += " +residual";
                }
                if let Some(a) = act {
                    s += &format!(" +{}", a.name());
                }
                if pool.is_some() {
                    s += " +avg_pool2d";
                }
                s
            }
            Step::MaxPool { .. } => "max_pool2d".into(),
            Step::Upsample { .. } => "upsample_nearest2d".into(),
            Step::Softmax { log, .. } => if *log { "log_softmax" } else { "softmax" }.into(),
            Step::AvgPool { .. } => "avg_pool2d".into(),
            Step::AdaptiveAvg { .. } => "adaptive_avg_pool2d".into(),
            Step::Permute { .. } => "permute".into(),
            Step::Narrow { .. } => "narrow".into(),
            Step::SumRuns { .. } => "sum".into(),
            Step::LayerNorm { .. } => "layer_norm".into(),
            Step::Unary { f, .. } => f.name().into(),
            Step::Binary { op, act, .. } => {
                let op = format!("{op:?}").to_lowercase();
                format!("{op}{}", act.map_or(String::new(), |a| format!(" +{}", a.name())))
            }
            Step::Affine { act, .. } => format!("batch_norm (affine){}", act.map_or(String::new(), |a| format!(" +{}", a.name()))),
            Step::MatMul { panels, bias, act, .. } => format!(
                "matmul{}{}{}",
                if panels.is_some() { " panels" } else { "" },
                if bias.is_some() { " +bias" } else { "" },
                act.map_or(String::new(), |a| format!(" +{}", a.name()))
            ),
            Step::Concat { .. } => "concat".into(),
            Step::Channels { what, layout, .. } => format!("{what} {layout:?}"),
            Step::Fallback { name, .. } => format!("{name} (eager)"),
        }
    }
    /// The shapes a convolution or product works on and its floating-point operations (a
    /// multiply-add counts two), for a profile's per-step lines; None for other steps.
    pub(super) fn geometry(&self) -> Option<(String, f64)> {
        match self {
            Step::Conv { geom: g, .. } => {
                let mut s = format!("{}x{}x{}x{} -> {}x{}x{} k{}x{}", g.n, g.c, g.h, g.w, g.k, g.p, g.q, g.r, g.s);
                if g.stride != (1, 1) {
                    s += &format!(" s{}x{}", g.stride.0, g.stride.1);
                }
                if g.dilation != (1, 1) {
                    s += &format!(" d{}x{}", g.dilation.0, g.dilation.1);
                }
                if g.groups > 1 {
                    s += &format!(" g{}", g.groups);
                }
                let macs = g.n * g.k * g.p * g.q * (g.c / g.groups) * g.r * g.s;
                Some((s, 2.0 * macs as f64))
            }
            Step::MatMul { dims: [m, k, n], .. } => Some((format!("{m}x{k} . {k}x{n}"), 2.0 * (m * k * n) as f64)),
            _ => None,
        }
    }
}

/// Merges a channel gather into the gather that reads its output, where nothing else reads that
/// output and it is not one of `keep` (a concatenation then shuffled is one copy, a split
/// then concatenated no copy of its own). The reader then picks from the first gather's
/// sources, which are computed before it (the first gather runs earlier) and stay live until
/// it runs (liveness is worked out from the steps after this).
pub(super) fn merge_gathers(steps: &mut Vec<Step>, keep: &[Buf]) {
    let mut t = 0;
    while t < steps.len() {
        let Some(p) = gather_feeding(steps, t, keep) else {
            t += 1;
            continue;
        };
        let up = steps.remove(p);
        t -= 1;
        let (Step::Channels { what: up_what, srcs: up_srcs, picks: up_picks, dst: mid, .. }, Step::Channels { what, srcs, picks, .. }) =
            (up, &mut steps[t])
        else {
            unreachable!("gather_feeding returns a gather feeding a gather");
        };
        // Each pick as (buffer, channels, channel), through the first gather, then indexed again.
        let resolved: Vec<(Buf, usize, usize)> = picks
            .iter()
            .map(|&(s, ch)| {
                let (b, cs) = srcs[s];
                if b == mid {
                    let (us, uch) = up_picks[ch];
                    (up_srcs[us].0, up_srcs[us].1, uch)
                } else {
                    (b, cs, ch)
                }
            })
            .collect();
        srcs.clear();
        picks.clear();
        for (b, cs, ch) in resolved {
            let s = srcs.iter().position(|&(sb, _)| sb == b).unwrap_or_else(|| {
                srcs.push((b, cs));
                srcs.len() - 1
            });
            picks.push((s, ch));
        }
        *what = format!("{up_what}+{what}");
    }
}

/// The gather whose output only step `t` (a gather of the same layout and sizes) reads.
fn gather_feeding(steps: &[Step], t: usize, keep: &[Buf]) -> Option<usize> {
    let Step::Channels { srcs, layout, dims, .. } = &steps[t] else {
        return None;
    };
    srcs.iter().find_map(|&(b, _)| {
        if keep.contains(&b) || steps.iter().map(|s| s.reads().iter().filter(|&&r| r == b).count()).sum::<usize>() != 1 {
            return None;
        }
        let p = steps[..t].iter().rposition(|s| s.writes() == b)?;
        matches!(&steps[p], Step::Channels { layout: l, dims: d, .. } if l == layout && d == dims).then_some(p)
    })
}

/// Where a buffer lives inside another (parent, offset in values), for [`place`].
pub(super) type Inside = Vec<Option<(Buf, usize)>>;

/// Turns the copies of one image's channel concatenations and splits into placement: a
/// concatenation's sources are written straight into their places in its output, a split's
/// output is read where it lies in its source, and the step goes. A gather (channels, or a
/// concatenation or narrow of one row) reads runs of values; each run is followed to the
/// outermost buffer it lies in, so that a concatenation of a buffer's halves (one of them split
/// off) takes that buffer whole, and DenseNet's concatenation of a block's features so far
/// holds the previous one as its first part. It qualifies when it has one image and the runs
/// make whole outermost buffers in order (a concatenation) or one run (a split). A buffer lies
/// inside at most one other, and `keep` (the plan's input and output) inside none; a gather
/// that cannot be placed so stays a copy. Batches of more images interleave the sources, so
/// their gathers stay copies.
pub(super) fn place_gathers(steps: &mut Vec<Step>, lens: &[usize], keep: &[Buf]) -> Inside {
    let mut inside: Inside = vec![None; lens.len()];
    let mut t = 0;
    while t < steps.len() {
        match gather_links(&steps[t], lens, &inside).filter(|links| links.iter().all(|l| !keep.contains(&l.0))) {
            Some(links) => {
                for (child, parent, offset) in links {
                    inside[child] = Some((parent, offset));
                }
                steps.remove(t);
            }
            None => t += 1,
        }
    }
    inside
}

/// The placements that make `step` a no-op, as (child, parent, offset), when it is a one-image
/// gather whose runs make whole outermost buffers (each placed in the output) or one run
/// (the output placed there).
fn gather_links(step: &Step, lens: &[usize], inside: &Inside) -> Option<Vec<(Buf, Buf, usize)>> {
    // The runs of values the output is made of, in order: (buffer, start, length).
    let runs: Vec<(Buf, usize, usize)> = match step {
        Step::Channels { srcs, picks, dims: [1, plane], .. } => picks.iter().map(|&(s, ch)| (srcs[s].0, ch * plane, *plane)).collect(),
        Step::Concat { srcs, outer: 1, .. } => {
            srcs.iter().map(|s| if let Src::Buf(b) = *s { Some((b, 0, lens[b])) } else { None }).collect::<Option<_>>()?
        }
        // One row: the destination holds `row` values.
        Step::Narrow { row, offset, src, dst, .. } if lens[*dst] == *row => vec![(*src, *offset, *row)],
        _ => return None,
    };
    // Each run where it lies in its outermost buffer, adjacent runs of one buffer merged.
    let mut merged: Vec<(Buf, usize, usize)> = Vec::new();
    for (mut b, mut start, len) in runs {
        while let Some((parent, offset)) = inside[b] {
            (b, start) = (parent, start + offset);
        }
        match merged.last_mut() {
            Some((mb, ms, ml)) if *mb == b && *ms + *ml == start => *ml += len,
            _ => merged.push((b, start, len)),
        }
    }
    let dst = step.writes();
    let whole = |&(b, start, len): &(Buf, usize, usize)| start == 0 && len == lens[b] && b != dst;
    match merged[..] {
        [(b, start, _)] if !whole(&merged[0]) && b != dst => Some(vec![(dst, b, start)]),
        _ if merged.iter().all(whole) => {
            // Each buffer once (a buffer taken twice stays a copy).
            let distinct = merged.iter().enumerate().all(|(i, m)| !merged[..i].iter().any(|o| o.0 == m.0));
            let mut at = 0;
            let links = merged.iter().map(|&(b, _, len)| {
                at += len;
                (b, dst, at - len)
            });
            distinct.then(|| links.collect())
        }
        _ => None,
    }
}

/// Places buffers in one arena by liveness: a buffer lives from the step that writes it to the
/// last step that reads it (the input from the start, the output to the end). First fit over
/// the free gaps; the outputs of a step are placed before its inputs are released, so a step
/// never reads and writes the same memory. A buffer inside another ([`place_gathers`]) is
/// placed with the outermost one, which lives from the first write of any of them to the
/// last read of any.
pub(super) fn place(steps: &[Step], lens: &[usize], inside: &Inside, input: Buf, output: Buf) -> (Vec<(usize, usize)>, usize) {
    // Each buffer's outermost container and its offset there.
    let root = |mut b: Buf| {
        let mut offset = 0;
        while let Some((parent, o)) = inside[b] {
            (b, offset) = (parent, offset + o);
        }
        (b, offset)
    };
    let mut last = vec![0usize; lens.len()];
    for (s, step) in steps.iter().enumerate() {
        for b in step.reads().into_iter().chain([step.writes()]) {
            let r = root(b).0;
            last[r] = last[r].max(s);
        }
    }
    last[root(output).0] = usize::MAX;
    let mut at = vec![(0, 0); lens.len()];
    let mut free: Vec<(usize, usize)> = Vec::new(); // (offset, len), sorted by offset
    let mut end = 0;
    let take = |len: usize, free: &mut Vec<(usize, usize)>, end: &mut usize| -> usize {
        if let Some(i) = free.iter().position(|&(_, l)| l >= len) {
            let (o, l) = free[i];
            if l == len {
                free.remove(i);
            } else {
                free[i] = (o + len, l - len);
            }
            return o;
        }
        // Grow the arena, starting inside a free gap that reaches its end.
        match free.last() {
            Some(&(o, l)) if o + l == *end => {
                free.pop();
                *end = o + len;
                o
            }
            _ => {
                *end += len;
                *end - len
            }
        }
    };
    let release = |o: usize, len: usize, free: &mut Vec<(usize, usize)>| {
        let i = free.partition_point(|&(fo, _)| fo < o);
        free.insert(i, (o, len));
        // Merge with neighbours.
        if i + 1 < free.len() && free[i].0 + free[i].1 == free[i + 1].0 {
            free[i].1 += free[i + 1].1;
            free.remove(i + 1);
        }
        if i > 0 && free[i - 1].0 + free[i - 1].1 == free[i].0 {
            free[i - 1].1 += free[i].1;
            free.remove(i);
        }
    };
    let mut placed = vec![false; lens.len()];
    let r = root(input).0;
    at[r] = (take(lens[r], &mut free, &mut end), lens[r]);
    placed[r] = true;
    for (s, step) in steps.iter().enumerate() {
        let w = root(step.writes()).0;
        if !placed[w] {
            at[w] = (take(lens[w], &mut free, &mut end), lens[w]);
            placed[w] = true;
        }
        let mut dead: Vec<Buf> = step.reads().into_iter().chain([w]).map(|b| root(b).0).filter(|&b| last[b] == s).collect();
        dead.sort_unstable();
        dead.dedup();
        for b in dead {
            if lens[b] > 0 {
                release(at[b].0, at[b].1, &mut free);
            }
        }
    }
    // The buffers inside others, where their outermost containers went.
    for b in 0..lens.len() {
        let (r, offset) = root(b);
        if r != b {
            at[b] = (at[r].0 + offset, lens[b]);
        }
    }
    (at, end)
}
