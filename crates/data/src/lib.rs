//! Stride's data: readers for the real formats (IDX today), the embedded MNIST, and batching.
#![forbid(unsafe_code)]

mod augment;
mod cifar;
mod dataset;
mod error;
mod folder;
pub mod idx;
mod loader;
mod mix;
mod normalize;

pub use augment::Augment;
pub use cifar::{cifar100_folder, cifar10_folder, parse as parse_cifar, parse_batch as parse_cifar_batch, Labels as CifarLabels};
pub use dataset::{
    check_labels, default_class_names, embedded_mnist, from_idx, idx_folder, load, Dataset, Split, CIFAR10_CLASSES, FASHION_CLASSES,
    FASHION_MNIST_DIR,
};
pub use error::{DataError, Result};
pub use folder::{decode_image, image_files, image_folder, image_shape, load_image, MAX_IMAGE_ALLOC, MAX_IMAGE_SIDE};
pub use loader::{Batch, Batches};
pub use mix::{partners, BatchMix, MAX_ALPHA};
pub use normalize::{Normalize, IMAGENET_MEAN, IMAGENET_STD};
