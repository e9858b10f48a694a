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

/// A scratch folder under the system's temporary folder, named for the test and the process,
/// emptied when made and removed when dropped, unless the test is failing (then it is kept, and
/// named, for a look at what the run left).
pub struct Scratch(std::path::PathBuf);

impl Scratch {
    pub fn new(prefix: &str, name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("{prefix}-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        Scratch(d)
    }
}

impl std::ops::Deref for Scratch {
    type Target = std::path::PathBuf;
    fn deref(&self) -> &std::path::PathBuf {
        &self.0
    }
}

impl AsRef<std::path::Path> for Scratch {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept for a look: {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
