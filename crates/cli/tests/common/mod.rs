//! What more than one of the CLI's test binaries needs.

use std::path::Path;

/// An image folder of two classes of 16x16 shapes, squares and circles, 30 each (shifted by a
/// pixel either way), which a small CNN learns in a few epochs.
pub fn shapes(dir: &Path) {
    for (class, square) in [("circle", false), ("square", true)] {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for i in 0..30u32 {
            let img = image::GrayImage::from_fn(16, 16, |x, y| {
                let (dx, dy) = (x as i32 - 8 + (i % 3) as i32 - 1, y as i32 - 8);
                let inside = if square { dx.abs() < 5 && dy.abs() < 5 } else { dx * dx + dy * dy < 25 };
                image::Luma([if inside { 220 } else { 10 }])
            });
            img.save(dir.join(class).join(format!("{i:02}.png"))).unwrap();
        }
    }
}

#[path = "../../../train/tests/common/scratch.rs"]
mod scratch;
pub use scratch::Scratch;
