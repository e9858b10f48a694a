//! The HTML report of a run: one self-contained file (inline SVG charts, images as data URIs,
//! no scripts or styles fetched from anywhere) that any browser opens from disk.

use std::fmt::Write as _;
use std::path::Path;

use base64::Engine as _;

use crate::{checkpoint, Result};

/// One line of a chart: a name, a colour and one value per epoch.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub values: Vec<f64>,
}

/// A held-out image the model got wrong, with the probability it gave its answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Mistake {
    /// Index in the evaluated set.
    pub index: usize,
    pub truth: usize,
    pub predicted: usize,
    pub confidence: f32,
}

/// What a report shows; every part is optional.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub title: String,
    /// (label, value) lines: model, data, optimizer, ...
    pub facts: Vec<(String, String)>,
    /// Charts over epochs: (title, series).
    pub charts: Vec<(String, Vec<Series>)>,
    /// `confusion[true][predicted]`, with the class names.
    pub confusion: Option<(Vec<Vec<usize>>, Vec<String>)>,
    /// Which images the confusion matrix and the mistakes are of ("test", "validation"; empty
    /// reads as "test").
    pub evaluated_on: String,
    /// The most confident mistakes: each with its image as PNG bytes.
    pub mistakes: Vec<(Mistake, Vec<u8>)>,
    /// Captioned pictures (the VAE's sample grids per epoch).
    pub pictures: Vec<(String, Vec<u8>)>,
}

/// Escapes text for HTML content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn png_uri(png: &[u8]) -> String {
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png))
}

/// A line chart of `series` over epochs 1..=n as inline SVG.
pub fn chart(title: &str, series: &[Series]) -> String {
    let (w, h, left, right, top, bottom) = (520.0, 260.0, 56.0, 12.0, 28.0, 36.0);
    let n = series.iter().map(|s| s.values.len()).max().unwrap_or(0);
    let finite = || series.iter().flat_map(|s| s.values.iter().copied()).filter(|v| v.is_finite());
    let (mut lo, mut hi) = (finite().fold(f64::INFINITY, f64::min), finite().fold(f64::NEG_INFINITY, f64::max));
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        (lo, hi) = (lo - 0.5, hi + 0.5);
    }
    let pad = (hi - lo) * 0.05;
    let (lo, hi) = (lo - pad, hi + pad);
    let x = |i: usize| left + if n > 1 { i as f64 * (w - left - right) / (n - 1) as f64 } else { (w - left - right) / 2.0 };
    let y = |v: f64| top + (hi - v) / (hi - lo) * (h - top - bottom);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{}">"#,
        escape(title)
    );
    let _ = write!(s, r#"<text x="{left}" y="18" font-size="14" font-weight="bold">{}</text>"#, escape(title));
    let _ = write!(s, r##"<rect x="{left}" y="{top}" width="{}" height="{}" fill="none" stroke="#bbb"/>"##, w - left - right, h - top - bottom);
    for k in 0..=4 {
        let v = lo + (hi - lo) * k as f64 / 4.0;
        let _ = write!(s, r##"<text x="{}" y="{:.1}" font-size="11" text-anchor="end" fill="#555">{}</text>"##, left - 4.0, y(v) + 4.0, short(v));
    }
    for i in 0..n {
        let step = n.div_ceil(10).max(1);
        if i % step == 0 || i + 1 == n {
            let _ =
                write!(s, r##"<text x="{:.1}" y="{}" font-size="11" text-anchor="middle" fill="#555">{}</text>"##, x(i), h - bottom + 14.0, i + 1);
        }
    }
    let _ = write!(s, r##"<text x="{:.1}" y="{}" font-size="11" text-anchor="middle" fill="#555">epoch</text>"##, (left + w - right) / 2.0, h - 6.0);
    for (k, se) in series.iter().enumerate() {
        let pts: Vec<String> =
            se.values.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, &v)| format!("{:.1},{:.1}", x(i), y(v))).collect();
        let _ = write!(s, r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#, se.color, pts.join(" "));
        for p in &pts {
            let (px, py) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = write!(s, r#"<circle cx="{px}" cy="{py}" r="2.5" fill="{}"/>"#, se.color);
        }
        // The legend, right-aligned on the title's line.
        let lx = w - right - 80.0 * (series.len() - 1 - k) as f64;
        let _ = write!(s, r#"<text x="{lx}" y="18" font-size="12" text-anchor="end" fill="{}">&#9632; {}</text>"#, se.color, escape(&se.name));
    }
    s.push_str("</svg>");
    s
}

fn short(v: f64) -> String {
    if v != 0.0 && v.abs() < 0.01 {
        format!("{v:.2e}")
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// The report as one HTML document.
pub fn render(r: &Report) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{}</title><style>
body{{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}}
table{{border-collapse:collapse;font-size:13px}} td,th{{padding:3px 7px;text-align:right}}
.facts td{{text-align:left}} .cm td{{min-width:34px;border:1px solid #eee}}
figure{{display:inline-block;margin:6px;text-align:center;font-size:12px}} img{{image-rendering:pixelated}}
</style></head><body><h1>{}</h1>"#,
        escape(&r.title),
        escape(&r.title)
    );
    if !r.facts.is_empty() {
        h.push_str(r#"<table class="facts">"#);
        for (k, v) in &r.facts {
            let _ = write!(h, "<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(v));
        }
        h.push_str("</table>");
    }
    if !r.charts.is_empty() {
        h.push_str("<h2>Curves</h2><div>");
        for (title, series) in &r.charts {
            h.push_str(&chart(title, series));
        }
        h.push_str("</div>");
    }
    let set = if r.evaluated_on.is_empty() { "test" } else { r.evaluated_on.as_str() };
    if let Some((m, names)) = &r.confusion {
        h.push_str(&format!(
            "<h2>Confusion matrix ({} set; rows: true class, columns: predicted)</h2><table class=\"cm\"><tr><th></th>",
            escape(set)
        ));
        for n in names {
            let _ = write!(h, "<th>{}</th>", escape(n));
        }
        h.push_str("<th>accuracy</th></tr>");
        for (t, row) in m.iter().enumerate() {
            let total = row.iter().sum::<usize>().max(1) as f64;
            let _ = write!(h, "<tr><th>{}</th>", escape(names.get(t).map_or("?", |s| s.as_str())));
            for (p, &c) in row.iter().enumerate() {
                let share = c as f64 / total;
                // Blue on the diagonal, red off it; the deeper the larger the share of the row.
                let color = if p == t { format!("rgba(40,100,220,{share:.3})") } else { format!("rgba(220,50,40,{:.3})", (share * 3.0).min(1.0)) };
                let _ = write!(h, r#"<td style="background:{color}">{c}</td>"#);
            }
            let _ = write!(h, "<td>{:.1}%</td></tr>", 100.0 * row.get(t).copied().unwrap_or(0) as f64 / total);
        }
        // Each column's precision: of the images predicted as the class, the share that are.
        h.push_str("<tr><th>precision</th>");
        for p in 0..names.len() {
            let predicted: usize = m.iter().map(|row| row.get(p).copied().unwrap_or(0)).sum();
            let right = m.get(p).and_then(|row| row.get(p)).copied().unwrap_or(0);
            let _ = if predicted == 0 { write!(h, "<td>-</td>") } else { write!(h, "<td>{:.1}%</td>", 100.0 * right as f64 / predicted as f64) };
        }
        h.push_str("<td></td></tr></table>");
    }
    if !r.mistakes.is_empty() {
        let _ = write!(h, "<h2>Most confident mistakes ({} set)</h2><div>", escape(set));
        let name = |i: usize| r.confusion.as_ref().and_then(|(_, n)| n.get(i).cloned()).unwrap_or_else(|| i.to_string());
        for (m, png) in &r.mistakes {
            let _ = write!(
                h,
                r#"<figure><img src="{}" width="84" height="84" alt="{} image {}"><figcaption>#{}: true {}<br>said {} ({:.1}%)</figcaption></figure>"#,
                png_uri(png),
                escape(set),
                m.index,
                m.index,
                escape(&name(m.truth)),
                escape(&name(m.predicted)),
                100.0 * m.confidence
            );
        }
        h.push_str("</div>");
    }
    if !r.pictures.is_empty() {
        h.push_str("<h2>Pictures</h2><div>");
        for (caption, png) in &r.pictures {
            let _ =
                write!(h, r#"<figure><img src="{}" alt="{}"><figcaption>{}</figcaption></figure>"#, png_uri(png), escape(caption), escape(caption));
        }
        h.push_str("</div>");
    }
    // Records on the page whether every picture decoded and whether any script error happened,
    // so a headless browser (the test, or a user's CI) can check the file renders.
    h.push_str(
        "<script>addEventListener('error',()=>{document.body.dataset.errors=(+(document.body.dataset.errors||0)+1)+''},true);\
addEventListener('load',()=>{const i=[...document.images];document.body.dataset.imagesDecoded=\
i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length;});</script>",
    );
    h.push_str("</body></html>\n");
    h
}

/// Renders and writes atomically.
pub fn write(path: &Path, r: &Report) -> Result<()> {
    checkpoint::write_atomic(path, render(r).as_bytes())
}

/// An image of the data set (planar bytes, 1 or 3 channels) as PNG bytes.
pub fn image_png(bytes: &[u8], c: usize, h: usize, w: usize) -> Vec<u8> {
    // Encoding an in-memory RGB buffer cannot fail.
    crate::visual::png_bytes(&crate::visual::picture(bytes, c, h, w, 1)).unwrap_or_default()
}
