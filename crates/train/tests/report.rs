//! report.html: written by a training run, one self-contained file, and it renders in headless
//! Chromium with every picture decoded and no errors.

mod common;

use common::{cfg, chromium, model, small, tmp};
use stride_train::report::{self, Mistake, Report, Series};
use stride_train::{train, TrainConfig};

#[test]
fn a_training_run_writes_a_report_that_renders() {
    let dir = tmp("report");
    let data = small(2000, 400);
    let c = TrainConfig { report: Some("cnn".into()), ..cfg(2, Some(dir.clone())) };
    let out = train(&mut model(0), &data, &c, false, None, |_| {}).unwrap();
    let test = &out.reports.last().unwrap().test;
    let wrong: usize = (0..10).map(|t| test.confusion[t].iter().sum::<usize>() - test.confusion[t][t]).sum();
    assert!(wrong >= 16, "enough mistakes to show: {wrong}");
    // The mistakes are the most confident ones, most confident first, and really wrong.
    assert_eq!(test.mistakes.len(), 16);
    assert!(test.mistakes.windows(2).all(|w| w[0].confidence >= w[1].confidence));
    assert!(test.mistakes.iter().all(|m| m.truth != m.predicted && usize::from(data.test.labels[m.index]) == m.truth));

    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(!html.contains("src=\"http") && !html.contains("href="), "self-contained: nothing is fetched");
    assert_eq!(html.matches("<svg").count(), 3, "loss, accuracy and learning-rate charts");
    assert_eq!(html.matches("data:image/png;base64,").count(), 16, "the mistakes, inline");
    assert!(html.contains("Confusion matrix") && html.contains("2 of 2"));
    let Some((body, shot)) = chromium(&dir.join("report.html")) else { return };
    assert!(body.contains(r#"data-images-decoded="16/16""#) && !body.contains("data-errors"), "{body}");
    assert_eq!(shot.dimensions(), (1100, 1600));
    let inked = shot.pixels().filter(|p| p.0.iter().any(|&v| v < 200)).count();
    assert!(inked > shot.len() / 3 / 50, "the page shows something: {inked} dark pixels");
    // The confusion matrix's diagonal is drawn in blue.
    assert!(shot.pixels().any(|p| p.0[2] > 180 && p.0[0] < 120), "blue diagonal cells");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_browser_check_catches_a_broken_picture() {
    let dir = tmp("report-broken");
    std::fs::create_dir_all(&dir).unwrap();
    let good = report::image_png(&[0, 255, 255, 0], 1, 2, 2);
    let r = Report { title: "broken".into(), pictures: vec![("fine".into(), good), ("broken".into(), b"not a png".to_vec())], ..Report::default() };
    report::write(&dir.join("r.html"), &r).unwrap();
    let Some((body, _)) = chromium(&dir.join("r.html")) else { return };
    assert!(body.contains(r#"data-images-decoded="1/2""#) && body.contains(r#"data-errors="1""#), "{body}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn names_are_escaped_and_charts_survive_odd_values() {
    let evil = "<script>alert(1)</script>";
    let r = Report {
        title: format!("{evil} & co"),
        facts: vec![("data".into(), evil.into())],
        charts: vec![("loss".into(), vec![Series { name: evil.into(), color: "#000", values: vec![f64::NAN, 1.0, f64::INFINITY, 0.5] }])],
        confusion: Some((vec![vec![1, 0], vec![2, 3]], vec![evil.into(), "b\"c".into()])),
        mistakes: vec![(Mistake { index: 3, truth: 0, predicted: 1, confidence: 0.9 }, report::image_png(&[9; 4], 1, 2, 2))],
        ..Report::default()
    };
    let html = report::render(&r);
    assert!(!html.contains(evil) && html.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; co") && html.contains("b&quot;c"));
    // Rows end with the class's accuracy (recall), columns with its precision.
    assert!(
        html.contains(">3</td><td>60.0%</td></tr>") && html.contains("<tr><th>precision</th><td>33.3%</td><td>100.0%</td><td></td></tr>"),
        "{html}"
    );
    assert!(!html.contains("NaN") && !html.contains("inf"), "non-finite values are left out of the chart");
    // One series with one value, and none at all, still draw.
    assert!(report::chart("one", &[Series { name: "x".into(), color: "#000", values: vec![2.0] }]).contains("<circle"));
    assert!(report::chart("none", &[]).ends_with("</svg>"));
}

/// With augmentation on, the report shows what it does: six training images, seven draws each.
#[test]
fn an_augmented_run_shows_its_augmentation() {
    let dir = tmp("report-augment");
    let data = small(300, 100);
    let augment = stride_data::Augment::parse("hflip,crop2").unwrap();
    let c = TrainConfig { report: Some("cnn".into()), augment, ..cfg(1, Some(dir.clone())) };
    train(&mut model(0), &data, &c, false, None, |_| {}).unwrap();
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(html.contains("training images (left) and seven draws of their augmentation, hflip,crop2"), "the caption names the spec");
    assert_eq!(html.matches("data:image/png;base64,").count(), 16 + 1);
    std::fs::remove_dir_all(dir).unwrap();
}

/// The grid: row r starts with image r's own picture, and its draws of a left-right flip are
/// that picture or its mirror, pixel for pixel.
#[test]
fn the_augmentation_grid_shows_each_image_and_its_draws() {
    let data = small(100, 10);
    let flip = stride_data::Augment::parse("hflip").unwrap();
    let grid = stride_train::visual::augmentation_grid(&data.train, &flip, 3, 5, 1).unwrap();
    // Tiles of 56 (28 x 2), gaps of 2, and 4 more after the originals.
    assert_eq!(grid.dimensions(), (2 + 6 * 58 + 4, 2 + 3 * 58));
    let rows = stride_train::latent::spread(100, 3);
    let (mut flipped, mut kept) = (0, 0);
    for (r, &i) in rows.iter().enumerate() {
        let own = stride_train::visual::picture(data.train.image(i), 1, 28, 28, 56);
        let mirror = image::imageops::flip_horizontal(&own);
        let tile = |x: u32| image::imageops::crop_imm(&grid, x, 2 + r as u32 * 58, 56, 56).to_image();
        assert_eq!(tile(2), own, "row {r} starts with image {i}");
        for v in 0..5 {
            let t = tile(2 + (v + 1) * 58 + 4);
            if t == own {
                kept += 1;
            } else {
                assert_eq!(t, mirror, "row {r}, draw {v}: neither the image nor its mirror");
                flipped += 1;
            }
        }
    }
    assert!(flipped > 0 && kept > 0, "{flipped} flipped, {kept} kept of 15 fair coins");
    let e = stride_train::visual::augmentation_grid(&data.train, &flip, 0, 5, 1).unwrap_err().to_string();
    assert!(e.contains("1..=64 images in 1..=32 versions"), "{e}");
}
