//! Resize and Upsample as [`Step::Resize`]: their attributes and inputs read and checked.

use super::{err, Attrs, Builder, NodeProto, Result, MAX_WINDOW};
use crate::network::{ResizeTo, Step};
use crate::resize::{Coord, Nearest, Sample};

impl Builder {
    /// Resize (opset 10 on) and the older Upsample: H and W of [N, C, H, W] by constant factors
    /// or to sizes (constant or computed from shapes), nearest or linear.
    pub(super) fn resize(&mut self, node: &NodeProto, ins: &[&str], mut a: Attrs) -> Result<()> {
        let op = node.op_type.as_deref().unwrap_or("");
        let opt = |i: usize| ins.get(i).copied().filter(|s| !s.is_empty());
        let x = self.runtime(opt(0).ok_or_else(|| err(format!("{op} needs input 0")))?)?;
        let mode = a.string("mode").unwrap_or_else(|| "nearest".into());
        // Upsample, and Resize before opset 11, sample from the top-left corner.
        let old = op == "Upsample" || self.opset < 11;
        let coord = a.string("coordinate_transformation_mode").unwrap_or_else(|| if old { "asymmetric".into() } else { "half_pixel".into() });
        let nearest = a.string("nearest_mode").unwrap_or_else(|| if old { "floor".into() } else { "round_prefer_floor".into() });
        a.take("cubic_coeff_a");
        a.take("extrapolation_value"); // read by tf_crop_and_resize only
        if a.int("exclude_outside", 0)? != 0 {
            return Err(err("exclude_outside 1 is not supported"));
        }
        if a.int("antialias", 0)? != 0 {
            return Err(err("antialias 1 is not supported: Stride's linear resizing reads the two nearest inputs"));
        }
        let policy = a.string("keep_aspect_ratio_policy").unwrap_or_else(|| "stretch".into());
        if policy != "stretch" {
            return Err(err(format!("keep_aspect_ratio_policy '{policy}' is not supported: Stride stretches to the sizes given")));
        }
        let axes = a.ints("axes");
        // Upsample at opset 7 gives its factors as an attribute.
        let scales_attr = a.take("scales").map(|s| s.floats.clone());
        a.done()?;
        let sample = match mode.as_str() {
            "nearest" => Sample::Nearest(match nearest.as_str() {
                "floor" => Nearest::Floor,
                "ceil" => Nearest::Ceil,
                "round_prefer_floor" => Nearest::RoundPreferFloor,
                "round_prefer_ceil" => Nearest::RoundPreferCeil,
                other => return Err(err(format!("nearest_mode '{other}' is not one of floor, ceil, round_prefer_floor and round_prefer_ceil"))),
            }),
            "linear" | "bilinear" => Sample::Linear,
            other => return Err(err(format!("mode '{other}' is not supported: Stride resizes by nearest or linear sampling"))),
        };
        let coord = match coord.as_str() {
            "half_pixel" => Coord::HalfPixel,
            "pytorch_half_pixel" => Coord::PytorchHalfPixel,
            "align_corners" => Coord::AlignCorners,
            "asymmetric" => Coord::Asymmetric,
            other => return Err(err(format!("coordinate_transformation_mode '{other}' is not supported"))),
        };
        // Which axes the factors or sizes are for: all four, or H and W.
        let spatial = match axes.as_deref() {
            None => false,
            Some([2, 3]) | Some([-2, -1]) => true,
            Some(v) => return Err(err(format!("axes {v:?}: Stride resizes H and W of [N, C, H, W] (axes [2, 3])"))),
        };
        // Inputs: X, scales (Upsample; Resize at opset 10); X, roi, scales, sizes (later).
        let (scales_at, sizes_at) = if old { (1, None) } else { (2, Some(3)) };
        let scales = match opt(scales_at) {
            Some(n) => Some(self.const_f32(n, "scales")?.data().to_vec()).filter(|v| !v.is_empty()),
            None => scales_attr,
        };
        let sizes = sizes_at.and_then(opt);
        let to = match (scales, sizes) {
            (Some(sc), None) => {
                let (sh, sw) = match (sc.as_slice(), spatial) {
                    ([1.0, 1.0, h, w], false) | ([h, w], true) => (*h as f64, *w as f64),
                    _ => return Err(err(format!("scales {sc:?}: Stride resizes H and W of [N, C, H, W] (N and C by 1)"))),
                };
                let ok = |f: f64| f.is_finite() && f > 0.0 && f <= MAX_WINDOW as f64;
                if !ok(sh) || !ok(sw) {
                    return Err(err(format!("scales {sc:?}: each factor must be above 0 and at most {MAX_WINDOW}")));
                }
                ResizeTo::Scales(sh, sw)
            }
            (None, Some(n)) => {
                let pieces = self.int_pieces(n).ok_or_else(|| err(format!("sizes '{n}' are not a list of integers")))?;
                if spatial && pieces.len() != 2 {
                    return Err(err("sizes for axes [2, 3] must be two"));
                }
                ResizeTo::Sizes(pieces)
            }
            (Some(_), Some(_)) => return Err(err("both scales and sizes are given; ONNX takes one")),
            (None, None) => return Err(err("neither scales nor sizes are given")),
        };
        let id = self.push(Step::Resize { input: x, to, coord, sample });
        self.set_output(node, id)
    }
}
