//! Loss and accuracy curves as a PNG: two panels (loss, accuracy) with train and test (or
//! validation) lines, gridlines and tick labels; the learning-rate range test; points coloured
//! by class (a VAE's codes). Drawn with a built-in 5x7 pixel font so no system fonts are needed.

use std::path::Path;

use crate::{checkpoint::write_atomic, Result, TrainError};

const W: usize = 900;
const H: usize = 380;
const BLUE: [u8; 3] = [31, 119, 180];
const ORANGE: [u8; 3] = [255, 127, 14];
const GREY: [u8; 3] = [220, 220, 220];
const PALE_BLUE: [u8; 3] = [174, 199, 232];
const BLACK: [u8; 3] = [40, 40, 40];

/// 5x7 glyphs, one byte per row, bit 4 = leftmost column.
fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        'a' => [0, 0, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'c' => [0, 0, 0x0E, 0x10, 0x10, 0x11, 0x0E],
        'e' => [0, 0, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'g' => [0, 0, 0x0F, 0x11, 0x0F, 0x01, 0x0E],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11],
        'i' => [0x04, 0, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'n' => [0, 0, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0, 0, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0, 0, 0x1E, 0x11, 0x1E, 0x10, 0x10],
        'r' => [0, 0, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0, 0, 0x0E, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'u' => [0, 0, 0x11, 0x11, 0x11, 0x13, 0x0D],
        'v' => [0, 0, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'y' => [0, 0, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'z' => [0, 0, 0x1F, 0x02, 0x04, 0x08, 0x1F],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        _ => [0; 7],
    }
}

struct Canvas {
    px: Vec<u8>,
    w: usize,
    h: usize,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Canvas { px: vec![255; w * h * 3], w, h }
    }
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if (0..self.w as i64).contains(&x) && (0..self.h as i64).contains(&y) {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }
    /// The picture as a PNG file, written atomically.
    fn save(&self, path: &Path) -> Result<()> {
        let mut bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut bytes, self.w as u32, self.h as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut w = enc.write_header().map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
            w.write_image_data(&self.px).map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
        }
        write_atomic(path, &bytes)
    }
    /// Text at (x, y) (top-left), scale 2.
    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        for (k, ch) in s.chars().enumerate() {
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            self.set(x + k as i64 * 12 + col * 2 + dx, y + row as i64 * 2 + dy, c);
                        }
                    }
                }
            }
        }
    }
    /// A line two pixels wide.
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3]) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = ((x0 + t * (x1 - x0)).round() as i64, (y0 + t * (y1 - y0)).round() as i64);
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                self.set(x + dx, y + dy, c);
            }
        }
    }
}

fn label(v: f64) -> String {
    if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// A panel's horizontal axis: its name and the ticks to label (position, text).
struct XAxis<'a> {
    name: &'a str,
    ticks: Vec<(f64, String)>,
}

/// Where a panel drew its plot area, and its horizontal scale.
struct Frame {
    left: f64,
    top: f64,
    w: f64,
    h: f64,
    e0: f64,
    e1: f64,
}

impl Frame {
    /// The pixel column of `e` on the horizontal axis.
    fn x(&self, e: f64) -> f64 {
        self.left + (e - self.e0) / (self.e1 - self.e0) * self.w
    }
}

/// One panel: title, frame, gridlines with y labels, the x axis's ticks, and the series (each
/// with its colour) over `xs`.
fn panel(cv: &mut Canvas, x0: usize, title: &str, xs: &[f64], axis: &XAxis, series: &[(&[f64], [u8; 3])]) -> Frame {
    let (left, top, w, h) = (x0 as f64 + 80.0, 40.0, 330.0, 280.0);
    let vals: Vec<f64> = series.iter().flat_map(|s| s.0.iter()).copied().filter(|v| v.is_finite()).collect();
    let (mut lo, mut hi) = (vals.iter().copied().fold(f64::INFINITY, f64::min), vals.iter().copied().fold(f64::NEG_INFINITY, f64::max));
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-6);
    (lo, hi) = (lo - pad, hi + pad);
    let (e0, e1) = (xs.first().copied().unwrap_or(1.0), xs.last().copied().unwrap_or(1.0));
    let (e0, e1) = if e1 > e0 { (e0, e1) } else { (e0 - 0.5, e1 + 0.5) };
    let frame = Frame { left, top, w, h, e0, e1 };
    let px = |e: f64| frame.x(e);
    let py = |v: f64| top + (hi - v) / (hi - lo) * h;
    cv.text(left as i64 + 130, 12, title, BLACK);
    for k in 0..=4 {
        let v = lo + (hi - lo) * k as f64 / 4.0;
        cv.line((left, py(v)), (left + w, py(v)), GREY);
        cv.text(x0 as i64 + 4, py(v) as i64 - 7, &label(v), BLACK);
    }
    for (e, text) in &axis.ticks {
        cv.line((px(*e), top + h), (px(*e), top + h + 5.0), BLACK);
        cv.text(px(*e) as i64 - 6 * text.len() as i64 + 1, (top + h + 10.0) as i64, text, BLACK);
    }
    cv.line((left, top), (left, top + h), BLACK);
    cv.line((left, top + h), (left + w, top + h), BLACK);
    cv.text((left + w / 2.0) as i64 - 6 * axis.name.len() as i64, (top + h + 30.0) as i64, axis.name, BLACK);
    for &(ys, color) in series {
        for i in 1..ys.len() {
            if ys[i - 1].is_finite() && ys[i].is_finite() {
                cv.line((px(xs[i - 1]), py(ys[i - 1])), (px(xs[i]), py(ys[i])), color);
            }
        }
        if ys.len() == 1 && ys[0].is_finite() {
            cv.line((px(xs[0]) - 3.0, py(ys[0])), (px(xs[0]) + 3.0, py(ys[0])), color);
        }
    }
    frame
}

/// Ticks at up to nine of the epochs, the last always among them.
fn epoch_ticks(epochs: &[f64]) -> Vec<(f64, String)> {
    let step = ((epochs.len() as f64) / 8.0).ceil().max(1.0) as usize;
    epochs.iter().enumerate().filter(|&(i, _)| i % step == 0 || i + 1 == epochs.len()).map(|(_, &e)| (e, format!("{}", e as usize))).collect()
}

/// The rows of a run's metrics.csv as numbers (epoch, train loss, train accuracy, test (or
/// validation) loss and accuracy, images/s, lr; NaN where a field does not parse), skipping the
/// header and short rows.
pub fn read_metrics(metrics_csv: &Path) -> Result<Vec<Vec<f64>>> {
    let text = std::fs::read_to_string(metrics_csv).map_err(|e| TrainError::Io(format!("{}: {e}", metrics_csv.display())))?;
    Ok(text
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(|v| v.trim().parse::<f64>().unwrap_or(f64::NAN)).collect())
        .filter(|r: &Vec<f64>| r.len() >= 7)
        .collect())
}

/// Whether a run's metrics.csv holds validation figures (header `val_loss`) rather than test
/// ones.
fn validated(metrics_csv: &Path) -> bool {
    std::fs::read_to_string(metrics_csv).is_ok_and(|t| t.lines().next().and_then(|h| h.split(',').nth(3)) == Some("val_loss"))
}

/// Draws curves.png from a run's metrics.csv (so a resumed run plots its whole history).
pub fn plot_from_metrics(metrics_csv: &Path, out_png: &Path) -> Result<()> {
    let rows = read_metrics(metrics_csv)?;
    let col = |i: usize| rows.iter().map(|r| r[i]).collect::<Vec<f64>>();
    let held_out = if validated(metrics_csv) { "val" } else { "test" };
    let mut cv = Canvas::new(W, H);
    let epochs = col(0);
    let axis = XAxis { name: "epoch", ticks: epoch_ticks(&epochs) };
    panel(&mut cv, 0, "loss", &epochs, &axis, &[(&col(1), BLUE), (&col(3), ORANGE)]);
    panel(&mut cv, 450, "accuracy", &epochs, &axis, &[(&col(2), BLUE), (&col(4), ORANGE)]);
    cv.text(W as i64 - 170, H as i64 - 24, "train", BLUE);
    cv.text(W as i64 - 90, H as i64 - 24, held_out, ORANGE);
    cv.save(out_png)
}

/// Draws a learning-rate range test: each step's loss (light) and the smoothed loss against
/// the rate on a logarithmic axis, with the steepest descent marked.
pub fn plot_lr_find(found: &crate::LrFinding, out_png: &Path) -> Result<()> {
    let xs: Vec<f64> = found.points.iter().map(|p| p.lr.log10()).collect();
    let raw: Vec<f64> = found.points.iter().map(|p| p.loss).collect();
    let smoothed: Vec<f64> = found.points.iter().map(|p| p.smoothed).collect();
    let (first, last) = (xs.first().copied().unwrap_or(0.0), xs.last().copied().unwrap_or(0.0));
    // Every decade, or every second or third where their labels (about 50 pixels) would meet.
    let (lo, hi) = (first.ceil() as i64, last.floor() as i64);
    let every = (((hi - lo + 1) as f64 * 50.0 / 330.0).ceil() as i64).max(1);
    let ticks = (lo..=hi).filter(|d| (d - lo) % every == 0).map(|d| (d as f64, format!("1e{d}"))).collect();
    let mut cv = Canvas::new(450, H);
    // The raw losses would stretch the scale where the sweep blew up: they are drawn only up
    // to the highest smoothed value.
    let top = smoothed.iter().copied().filter(|v| v.is_finite()).fold(f64::NEG_INFINITY, f64::max);
    let raw: Vec<f64> = raw.into_iter().map(|v| if v <= top { v } else { f64::NAN }).collect();
    let frame = panel(&mut cv, 0, "loss", &xs, &XAxis { name: "learning rate", ticks }, &[(&raw, PALE_BLUE), (&smoothed, BLUE)]);
    if let Some(lr) = found.steepest() {
        let x = frame.x(lr.log10());
        let mut y = frame.top;
        while y < frame.top + frame.h {
            cv.line((x, y), (x, y + 2.0), ORANGE);
            y += 6.0;
        }
        cv.text(x as i64 + 6, frame.top as i64 + 6, "steepest", ORANGE);
    }
    cv.save(out_png)
}

/// Ticks at round values (1, 2 or 5 times a power of ten apart, three to seven of them)
/// inside [lo, hi], each with its label.
fn round_ticks(lo: f64, hi: f64) -> Vec<(f64, String)> {
    let raw = (hi - lo) / 5.0;
    if !(raw.is_finite() && raw > 0.0) {
        return Vec::new();
    }
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * power).find(|&s| s >= raw).unwrap_or(10.0 * power);
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let first = (lo / step).ceil() as i64;
    (first..)
        .map(|k| k as f64 * step)
        .take_while(|&v| v <= hi)
        .map(|v| (v, format!("{:.*}", decimals, if v.abs() < step / 2.0 { 0.0 } else { v })))
        .collect()
}

/// Ten distinct colours (matplotlib's tab10), for classes; the eleventh class takes the first
/// again.
pub const CLASS_COLORS: [[u8; 3]; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

/// Draws `points` as dots coloured by `classes[i]` (a class index; [`CLASS_COLORS`] in turn),
/// with the axes named `axes` (horizontal, vertical), ticks, and a legend of class indices.
/// Non-finite points are left out; the scale spans the finite ones.
pub fn plot_scatter(points: &[[f64; 2]], classes: &[usize], axes: [&str; 2], out_png: &Path) -> Result<()> {
    if points.len() != classes.len() {
        return Err(TrainError::Config(format!("a scatter plot needs a class per point: {} points, {} classes", points.len(), classes.len())));
    }
    let (left, top, side) = (80.0, 30.0, 400.0);
    let mut cv = Canvas::new(600, 500);
    let finite: Vec<usize> = (0..points.len()).filter(|&i| points[i].iter().all(|v| v.is_finite())).collect();
    let range = |k: usize| {
        let (lo, hi) = finite.iter().map(|&i| points[i][k]).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
        let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (-1.0, 1.0) };
        let pad = ((hi - lo) * 0.05).max(1e-6);
        (lo - pad, hi + pad)
    };
    let ((x0, x1), (y0, y1)) = (range(0), range(1));
    let px = |v: f64| left + (v - x0) / (x1 - x0) * side;
    let py = |v: f64| top + (y1 - v) / (y1 - y0) * side;
    for (v, t) in round_ticks(x0, x1) {
        cv.line((px(v), top), (px(v), top + side), GREY);
        cv.text(px(v) as i64 - 6 * t.len() as i64 + 1, (top + side + 8.0) as i64, &t, BLACK);
    }
    for (v, t) in round_ticks(y0, y1) {
        cv.line((left, py(v)), (left + side, py(v)), GREY);
        cv.text(left as i64 - 8 - 12 * t.len() as i64, py(v) as i64 - 7, &t, BLACK);
    }
    cv.line((left, top), (left, top + side), BLACK);
    cv.line((left, top + side), (left + side, top + side), BLACK);
    cv.text((left + side / 2.0) as i64 - 6 * axes[0].len() as i64, (top + side + 30.0) as i64, axes[0], BLACK);
    cv.text(4, 8, axes[1], BLACK);
    for &i in &finite {
        let (x, y) = (px(points[i][0]).round() as i64, py(points[i][1]).round() as i64);
        let c = CLASS_COLORS[classes[i] % CLASS_COLORS.len()];
        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1), (-1, 0), (0, -1)] {
            cv.set(x + dx, y + dy, c);
        }
    }
    let shown = classes.iter().copied().max().map_or(0, |m| m + 1).min(20);
    for c in 0..shown {
        let y = top as i64 + 4 + c as i64 * 22;
        for dy in 0..10 {
            for dx in 0..10 {
                cv.set(500 + dx, y + dy, CLASS_COLORS[c % CLASS_COLORS.len()]);
            }
        }
        cv.text(516, y - 2, &c.to_string(), BLACK);
    }
    cv.save(out_png)
}
