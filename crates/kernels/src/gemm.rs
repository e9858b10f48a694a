//! The one safe wrapper around the `gemm` crate's raw entry point.

use rayon::prelude::*;
use stride_tensor::Elem;

/// A read-only strided matrix view over a slice: element (i, j) is `data[i*rs + j*cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A row-major `rows x cols` matrix.
    pub fn rows(data: &'a [T], rows: usize, cols: usize) -> Self {
        MatRef { data, rows, cols, rs: cols, cs: 1 }
    }
    /// The transpose, free: only the strides swap.
    pub fn t(self) -> Self {
        MatRef { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }
    /// One past the largest offset this view reads.
    fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        }
    }
}

/// `c = a * b` (or `c += a * b` when `accumulate`), `c` row-major with row stride `c_rs`.
/// `threads > 1` lets the gemm crate split the product over rayon's pool.
///
/// Panics if the views or `c` are too small for the shapes: that is a bug in the caller.
pub fn matmul<T: Elem>(a: MatRef<T>, b: MatRef<T>, c: &mut [T], c_rs: usize, accumulate: bool, threads: usize) {
    assert!(c_rs >= b.cols || a.rows <= 1, "matmul: output rows overlap");
    matmul_strided(a, b, c, (c_rs, 1), accumulate, threads)
}

/// [`matmul`] into `c` with element (i, j) at `c[i * c_strides.0 + j * c_strides.1]`: a
/// transposed output is `(1, ld)`.
///
/// Panics if the views or `c` are too small for the shapes, or if two output elements share
/// an offset: that is a bug in the caller.
pub fn matmul_strided<T: Elem>(a: MatRef<T>, b: MatRef<T>, c: &mut [T], c_strides: (usize, usize), accumulate: bool, threads: usize) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let (c_rs, c_cs) = c_strides;
    assert_eq!(b.rows, k, "matmul: inner dimensions {k} and {}", b.rows);
    assert!(a.extent() <= a.data.len() && b.extent() <= b.data.len(), "matmul: view out of bounds");
    assert!(m == 0 || n == 0 || (m - 1) * c_rs + (n - 1) * c_cs < c.len(), "matmul: output out of bounds");
    // Distinct offsets: one stride steps over the whole extent of the other.
    assert!(m <= 1 || n <= 1 || c_rs > (n - 1) * c_cs || c_cs > (m - 1) * c_rs, "matmul: output elements overlap");
    assert!(m <= 1 || c_rs > 0, "matmul: output rows overlap");
    assert!(n <= 1 || c_cs > 0, "matmul: output columns overlap");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    c[i * c_rs + j * c_cs] = T::zero();
                }
            }
        }
        return;
    }
    if a.cs == 1 && b.rs == 1 && a.rs == k && b.cs == k && skinny_pays(m, k, n) {
        // A few contiguous rows against a large transposed row-major matrix (a convolution's
        // taps on a 2x2 map at batch 1: 4 x 512 by 512 x 512): its rows read once, split
        // over the threads asked for.
        return skinny_split(&a.data[..m * k], m, &b.data[..n * k], c, c_strides, accumulate, threads.min(auto_threads(m, k, n)));
    }
    if m <= THIN_ROWS && a.cs == 1 && b.rs == 1 {
        return thin_dots(a, b, c, c_strides, accumulate);
    }
    if aliasing_columns::<T>(m, n, b) && c_cs == 1 {
        return through_column_major(a, b, c, c_rs, accumulate, threads);
    }
    // SAFETY: the asserts above keep every offset the product reads or writes inside the
    // slices and every output element at its own offset; `c` is borrowed mutably for the
    // call, so nothing else accesses it.
    unsafe { packed(a, b, c.as_mut_ptr(), c_strides, accumulate, threads) }
}

/// A new row-major `a b` (m x n) whose elements the product writes without their being
/// zeroed first, where it writes every one (k > 0 and the packed path): zeroing a 500 x 1024
/// weight gradient cost as long as the product that then overwrote it.
pub fn matmul_new<T: Elem>(a: MatRef<T>, b: MatRef<T>, threads: usize) -> Vec<T> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul: inner dimensions {k} and {}", b.rows);
    assert!(a.extent() <= a.data.len() && b.extent() <= b.data.len(), "matmul: view out of bounds");
    let len = m.checked_mul(n).expect("matmul: output size overflows");
    if k == 0 || m <= 1 || n <= 1 || (m <= THIN_ROWS && a.cs == 1 && b.rs == 1) || aliasing_columns::<T>(m, n, b) {
        let mut c = vec![T::zero(); len];
        matmul(a, b, &mut c, n, false, threads);
        return c;
    }
    let mut c = Vec::with_capacity(len);
    // SAFETY: the views are in bounds (asserted above), the output has room for m x n
    // row-major elements at distinct offsets, and `packed` without accumulation writes every
    // one of them (k > 0) without reading any, so all `len` are initialised before set_len.
    unsafe {
        packed(a, b, c.as_mut_ptr(), (n, 1), false, threads);
        c.set_len(len);
    }
    c
}

/// `c (+)= a b` through the library's packed kernels, split over `threads`.
///
/// # Safety
/// The views' offsets must lie in their slices, the output's (m x n at `c_strides` from `c`)
/// inside one allocation that nothing else accesses during the call, each at its own offset;
/// k > 0. Without `accumulate` the output is only written, so it may be uninitialised.
unsafe fn packed<T: Elem>(a: MatRef<T>, b: MatRef<T>, c: *mut T, c_strides: (usize, usize), accumulate: bool, threads: usize) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let (c_rs, c_cs) = c_strides;
    // More threads: one single-threaded product per block of the longer output side, run
    // on the pool. The library's own threading (`Parallelism::Rayon`) was slower than one
    // thread on the products of dense layers at small batches (x[32,1024] W^T with 500
    // outputs: 555 vs 304 us on 2 cores) and faster than this split only in the case below.
    let (rows, len) = if m > n { (true, m) } else { (false, n) };
    if threads > 1 && k <= 64 && m.min(n) >= 256 {
        // Short sums into a large output (data gradients of thin layers, 1024 x 64 x 1024):
        // there the library's own split, which shares its packing between threads, was
        // 10-15% faster than the blocks below.
        // SAFETY: as for `product` below, over the whole product.
        return unsafe {
            product(
                m,
                n,
                k,
                c,
                c_strides,
                accumulate,
                a.data.as_ptr(),
                (a.rs, a.cs),
                b.data.as_ptr(),
                (b.rs, b.cs),
                gemm::Parallelism::Rayon(threads),
            )
        };
    }
    let parts = threads.min(m.saturating_mul(k).saturating_mul(n) / MIN_PART).max(1);
    let block = len.div_ceil(parts).next_multiple_of(SPLIT_ALIGN).min(len);
    let c_ptr = SendPtr(c);
    let part = |start: usize| {
        let l = block.min(len - start);
        let (mm, nn) = if rows { (l, n) } else { (m, l) };
        let (a_at, b_at, c_at) = if rows { (start * a.rs, 0, start * c_rs) } else { (0, start * b.cs, start * c_cs) };
        // SAFETY: the caller keeps every offset the whole product reads or writes inside its
        // allocation and every output element at its own offset; a block is the whole
        // product restricted to rows (or columns) start..start + l, so its offsets are a
        // subset, and blocks write disjoint elements. Nothing else accesses the output, so it
        // cannot alias `a` or `b`; strides fit in isize because every offset is below an
        // allocation's length.
        unsafe {
            product(
                mm,
                nn,
                k,
                c_ptr.at(c_at),
                c_strides,
                accumulate,
                a.data.as_ptr().add(a_at),
                (a.rs, a.cs),
                b.data.as_ptr().add(b_at),
                (b.rs, b.cs),
                gemm::Parallelism::None,
            )
        }
    };
    if block >= len {
        part(0);
    } else {
        use rayon::prelude::*;
        (0..len).into_par_iter().step_by(block).for_each(part);
    }
}

/// Multiply-adds below which a block of a split product costs more to hand to another thread
/// than to do (about 10 us on one core).
const MIN_PART: usize = 1 << 20;

/// Blocks of a split product are whole multiples of this many rows or columns (the widest
/// microkernel's), so only the last one has a ragged edge.
const SPLIT_ALIGN: usize = 16;

/// The output pointer, shared by the tasks of a split product (each writes its own block).
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);

// SAFETY: the tasks given a `SendPtr` write disjoint elements (see `matmul_strided`).
unsafe impl<T: Send> Send for SendPtr<T> {}
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer `offset` elements on (a method, so closures capture the whole wrapper).
    fn at(self, offset: usize) -> *mut T {
        self.0.wrapping_add(offset)
    }
}

/// `c (+)= a b`, m x k by k x n, threads as `par` says, element (i, j) of each matrix at
/// `i * strides.0 + j * strides.1` from its pointer.
///
/// # Safety
/// Every offset the product touches must lie inside the allocations behind the pointers,
/// output elements must have distinct offsets, and nothing else may access `c`'s elements
/// during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn product<T: Elem>(
    m: usize,
    n: usize,
    k: usize,
    c: *mut T,
    cs: (usize, usize),
    accumulate: bool,
    a: *const T,
    as_: (usize, usize),
    b: *const T,
    bs: (usize, usize),
    par: gemm::Parallelism,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            cs.1 as isize,
            cs.0 as isize,
            accumulate,
            a,
            as_.1 as isize,
            as_.0 as isize,
            b,
            bs.1 as isize,
            bs.0 as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            par,
        )
    }
}

/// Products of at most this many rows by a transposed row-major matrix (x W^T for a few
/// images: dense layers, and convolutions over 1x1 maps, at small batches) run as dot
/// products. On AVX-512 machines the library copies the whole of W into a packing buffer on
/// every such call (1.9 MB for ShuffleNet's 1024x464 layer), for a product that reads W once.
const THIN_ROWS: usize = 4;

crate::multiversion! {
    /// `c (+)= a b` for `a` with rows of unit stride and `b` with columns of unit stride:
    /// element (i, j) is the dot product of row i of `a` and column j of `b`.
    fn thin_dots<T: Elem>(a: MatRef<T>, b: MatRef<T>, c: &mut [T], c_strides: (usize, usize), accumulate: bool) {
        let k = a.cols;
        for j in 0..b.cols {
            let col = &b.data[j * b.cs..j * b.cs + k];
            for i in 0..a.rows {
                let d = crate::simd::dot_strided(&a.data[i * a.rs..i * a.rs + k], col, 1);
                let o = &mut c[i * c_strides.0 + j * c_strides.1];
                *o = if accumulate { *o + d } else { d };
            }
        }
    }
}

/// Rows up to which [`aliasing_columns`] products go through a column-major output.
const ALIASING_ROWS: usize = 64;

/// A few rows times a right factor stored column by column with its columns a multiple of
/// 4 KiB apart (x W^T where W has 1024 or 4096 inputs: the VAE's first dense layer, and its
/// generator's 1x1 -> 4x4 layer). Written row-major, the library packs that factor across
/// the columns, and reads at a 4 KiB stride all fall in the same cache sets: 32 x 1024 x 500
/// ran at 91 GFLOP/s on 2 cores, 178 through a column-major output and a transpose (k 4096:
/// 55 against 117). Strides that are not such multiples showed no gain (k 500, 800).
fn aliasing_columns<T>(m: usize, n: usize, b: MatRef<T>) -> bool {
    (2..=ALIASING_ROWS).contains(&m) && n > 1 && b.rs == 1 && (b.cs * std::mem::size_of::<T>()).is_multiple_of(4096)
}

/// `c (+)= a b`, `c` row-major with row stride `c_rs`, computed column-major into a buffer
/// and transposed into `c` (see [`aliasing_columns`]).
fn through_column_major<T: Elem>(a: MatRef<T>, b: MatRef<T>, c: &mut [T], c_rs: usize, accumulate: bool, threads: usize) {
    let (m, n) = (a.rows, b.cols);
    let mut t = vec![T::zero(); m * n];
    // Column stride m >= 2, so this call cannot come back here.
    matmul_strided(a, b, &mut t, (1, m), false, threads);
    for (i, row) in c.chunks_mut(c_rs).take(m).enumerate() {
        for (j, o) in row[..n].iter_mut().enumerate() {
            let v = t[j * m + i];
            *o = if accumulate { *o + v } else { v };
        }
    }
}

/// Threads worth using for an m x k x n product: the whole pool for large products, one for
/// small ones where splitting costs more than it saves.
pub fn auto_threads(m: usize, k: usize, n: usize) -> usize {
    if (m as f64) * (k as f64) * (n as f64) >= 96.0 * 96.0 * 96.0 {
        rayon::current_num_threads()
    } else {
        1
    }
}

/// Has every thread of rayon's pool run one product, so the matrix library's per-thread
/// buffers (a slab the size of the L2 cache each, kept for the thread's life) exist before
/// memory is measured, rather than appearing inside the first measured pass of whichever
/// thread happened to sit out the passes before. The calling thread too: products that are
/// not split run on it (the first dense layer's backward pass, when no convolution before it
/// used the library on that thread).
pub fn warm_up_threads() {
    let one = || {
        const S: usize = 96;
        let a = vec![1.0f32; S * S];
        let mut c = vec![0.0f32; S * S];
        matmul(MatRef::rows(&a, S, S), MatRef::rows(&a, S, S), &mut c, S, false, 1);
    };
    rayon::broadcast(|_| one());
    one();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// x W^T for `x` of each row count in `ms` by `k` and `W` [n, k] row-major, on each thread
    /// count (inside a pool of two), into a row-major and a transposed output, written and
    /// accumulated, against the naive f64 product.
    fn check_transposed_products(k: usize, n: usize, ms: &[usize], threads: &[usize], tol: f64) {
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.13).sin()).collect();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for &m in ms {
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.29).cos()).collect();
            let want = |i: usize, j: usize| (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum::<f64>();
            for &t in threads {
                for (strides, acc) in [((n, 1), false), ((1, m), false), ((n, 1), true)] {
                    let mut c = vec![0.5f32; m * n];
                    pool.install(|| matmul_strided(MatRef::rows(&x, m, k), MatRef::rows(&w, n, k).t(), &mut c, strides, acc, t));
                    for i in 0..m {
                        for j in 0..n {
                            let got = c[i * strides.0 + j * strides.1] as f64;
                            let expected = want(i, j) + if acc { 0.5 } else { 0.0 };
                            assert!((got - expected).abs() < tol, "{m}x{k}x{n} threads {t} ({i},{j}) {strides:?} acc {acc}: {got} vs {expected}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn thin_products_match_naive_product() {
        // At most THIN_ROWS rows (and one more) times a small transposed row-major matrix: the
        // dot-product path.
        assert!(!skinny_pays(1, 37, 11));
        check_transposed_products(37, 11, &(1..=THIN_ROWS + 1).collect::<Vec<_>>(), &[2], 1e-4);
    }

    #[test]
    fn few_rows_against_large_transposed_matrices_match_naive_product() {
        // Up to SKINNY_ROWS contiguous rows by a transposed row-major matrix large enough for
        // `skinny_pays`: each of its rows read once, on one thread and split over two.
        assert!(skinny_pays(SKINNY_ROWS, 256, 1100));
        check_transposed_products(256, 1100, &[1, 3, 5, SKINNY_ROWS], &[1, 2], 1e-3);
    }

    #[test]
    fn panels_match_naive_product() {
        // One to sixteen rows (four at a time, and the rest) against weights laid out in panels
        // of 64 outputs (150 and 1,000 outputs: the last panel padded), in one task and split
        // over two threads, into a row-major and a transposed output, written and accumulated:
        // in f64 (the portable build) and f32 (AVX-512 where the CPU has it).
        fn check<T: Elem>(tol: f64) {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            let f = |v: f64| T::from(v).unwrap();
            for (k, n) in [(37, 150), (300, 1000)] {
                let w: Vec<T> = (0..n * k).map(|i| f((i as f64 * 0.13).sin())).collect();
                let panels = Panels::new(&w, n, k);
                for m in 1..=PANEL_ROWS {
                    let x: Vec<T> = (0..m * k).map(|i| f((i as f64 * 0.29).cos())).collect();
                    let want = |i: usize, j: usize| (0..k).map(|p| (x[i * k + p] * w[j * k + p]).to_f64().unwrap()).sum::<f64>();
                    for (strides, acc) in [((n, 1), false), ((1, m), false), ((n, 1), true)] {
                        let mut c = vec![f(0.5); m * n];
                        pool.install(|| panels_into(&x, m, &panels, &mut c, strides, acc));
                        for i in 0..m {
                            for j in 0..n {
                                let got = c[i * strides.0 + j * strides.1].to_f64().unwrap();
                                let expected = want(i, j) + if acc { 0.5 } else { 0.0 };
                                assert!((got - expected).abs() < tol, "m {m} k {k} n {n} ({i},{j}) {strides:?} acc {acc}: {got} vs {expected}");
                            }
                        }
                    }
                }
            }
        }
        check::<f64>(1e-9);
        check::<f32>(1e-3);
        assert!(panels_pay(4, 192, 1152) && panels_pay(16, 384, 1536) && !panels_pay(17, 384, 1536) && !panels_pay(4, 96, 576));
    }

    #[test]
    fn split_products_match_naive_product() {
        // Products large enough to split over threads: by columns (n >= m) and by rows, with
        // sides that are not multiples of the block alignment, b plain and transposed, into a
        // row-major and a transposed output, written and accumulated; and the short-sum case
        // (k <= 64) that keeps the library's own threading.
        for (m, k, n) in [(70, 150, 220), (230, 150, 70), (300, 40, 270)] {
            assert!(m * k * n >= 2 * MIN_PART, "({m}, {k}, {n}) is too small to split");
            let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
            let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.11).cos()).collect();
            for transposed_b in [false, true] {
                let bm = if transposed_b { MatRef::rows(&b, n, k).t() } else { MatRef::rows(&b, k, n) };
                let bv = |p: usize, j: usize| if transposed_b { b[j * k + p] } else { b[p * n + j] };
                for (strides, acc) in [((n, 1), false), ((1, m), false), ((n, 1), true)] {
                    let mut c = vec![0.5; m * n];
                    matmul_strided(MatRef::rows(&a, m, k), bm, &mut c, strides, acc, 2);
                    for i in 0..m {
                        for j in 0..n {
                            let want = (0..k).map(|p| a[i * k + p] * bv(p, j)).sum::<f64>() + if acc { 0.5 } else { 0.0 };
                            let got = c[i * strides.0 + j * strides.1];
                            assert!(
                                (got - want).abs() < 1e-9,
                                "({m}, {k}, {n}) b^T {transposed_b} ({i},{j}) strides {strides:?} acc {acc}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn aliasing_products_match_naive_product() {
        // A right factor stored column by column, its columns 4 or 8 KiB apart: through a
        // column-major buffer into a row-major output with padding between rows, written and
        // accumulated; one row, and more than ALIASING_ROWS, keep the direct path.
        for k in [512, 1024] {
            let n = 23;
            for m in [1, 2, 17, ALIASING_ROWS, ALIASING_ROWS + 1] {
                let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
                let b: Vec<f64> = (0..n * k).map(|i| (i as f64 * 0.11).cos()).collect();
                let bm = MatRef::rows(&b, n, k).t();
                assert_eq!(aliasing_columns(m, n, bm), (2..=ALIASING_ROWS).contains(&m), "m {m} k {k}");
                for acc in [false, true] {
                    let c_rs = n + 3;
                    let mut c = vec![0.5; m * c_rs];
                    matmul(MatRef::rows(&a, m, k), bm, &mut c, c_rs, acc, 2);
                    for i in 0..m {
                        for j in 0..n {
                            let want = (0..k).map(|p| a[i * k + p] * b[j * k + p]).sum::<f64>() + if acc { 0.5 } else { 0.0 };
                            let got = c[i * c_rs + j];
                            assert!((got - want).abs() < 1e-9, "m {m} k {k} ({i},{j}) acc {acc}: {got} vs {want}");
                        }
                        assert!(c[i * c_rs + n..(i + 1) * c_rs].iter().all(|&v| v == 0.5), "m {m}: row {i}'s padding written");
                    }
                }
            }
        }
    }

    #[test]
    fn new_products_match_naive_product_over_reused_memory() {
        // Every route: no inner dimension, one row or column, the dot-product path, the
        // aliasing path, split blocks, the library's threading (k <= 64), transposed views.
        // Each call first frees a NaN-filled block of the output's size, which the allocator
        // tends to hand back: a product that read its uninitialised output would spread NaN.
        let cases = [
            (3, 0, 5, false),
            (1, 9, 7, false),
            (4, 33, 6, true),
            (17, 512, 9, true),
            (70, 150, 220, false),
            (230, 150, 70, true),
            (300, 40, 270, false),
        ];
        for (m, k, n, bt) in cases {
            let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
            let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.11).cos()).collect();
            let bm = if bt { MatRef::rows(&b, n, k).t() } else { MatRef::rows(&b, k, n) };
            let bv = |p: usize, j: usize| if bt { b[j * k + p] } else { b[p * n + j] };
            drop(std::hint::black_box(vec![f64::NAN; m * n]));
            let c = matmul_new(MatRef::rows(&a, m, k), bm, 2);
            assert_eq!(c.len(), m * n);
            for i in 0..m {
                for j in 0..n {
                    let want = (0..k).map(|p| a[i * k + p] * bv(p, j)).sum::<f64>();
                    assert!((c[i * n + j] - want).abs() < 1e-9, "({m}, {k}, {n}) b^T {bt} ({i},{j}): {} vs {want}", c[i * n + j]);
                }
            }
        }
    }

    #[test]
    fn matches_naive_product_with_transposes() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..n * k).map(|i| (i as f64 * 0.11).cos()).collect();
        // b stored as n x k, used transposed.
        let mut c = vec![1.0; m * n];
        matmul(MatRef::rows(&a, m, k), MatRef::rows(&b, n, k).t(), &mut c, n, true, 2);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = 1.0 + (0..k).map(|p| a[i * k + p] * b[j * k + p]).sum::<f64>();
                assert!((c[i * n + j] - want).abs() < 1e-12, "({i},{j}) {} vs {want}", c[i * n + j]);
            }
        }
    }
}

/// Rows of activations at most this many take [`skinny_into`] against a large weight matrix.
pub const SKINNY_ROWS: usize = 16;

/// Whether [`skinny_into`] pays for an `m x k` by `k x n` product: few rows against weights
/// large enough that streaming them once is the product's cost (batch 1).
pub fn skinny_pays(m: usize, k: usize, n: usize) -> bool {
    m > 0 && m <= SKINNY_ROWS && k >= 16 && k * n >= 1 << 16 && (m <= 4 || k * n >= SKINNY_WEIGHTS)
}

/// Weights from which more than four rows take [`skinny_into`]: about 1 MB of f32, the
/// second-level cache. Smaller weights stay in cache, where the library's product of up to 16
/// rows beat the dot products (16 x 112 by 112 x 672, EfficientNet-B0's 4x4 expansion layers
/// at batch 1: 19 against 36-50 us); larger ones come from memory, which the library reads
/// and writes again to pack them (ConvNeXt-tiny's 384 x 1536 dense layers on 16 positions).
const SKINNY_WEIGHTS: usize = 1 << 18;

/// `out[i * rs + j * cs] (+)= a_i · w_j` for the `m` rows `a_i` of `a` ([m, k]) and the rows
/// `w_j` of `w` ([n, k], a layer's weights as stored): a few rows of activations (one image)
/// against a large weight matrix. The matrix library packs the weights into its own layout on
/// every call, reading and writing all of them before the product reads them again; here each
/// row of weights is read once, from memory, and multiplied into every activation row while it
/// is in the first-level cache (ConvNeXt-tiny's last stage at batch 1: 4 rows against 768 x
/// 3072 weights). Rows of weights are split over the pool.
pub fn skinny_into<T: Elem>(a: &[T], m: usize, w: &[T], out: &mut [T], strides: (usize, usize), accumulate: bool) {
    let k = a.len() / m.max(1);
    // One task for a product too small to repay waking the pool (as `auto_threads` decides
    // for the matrix library's products).
    skinny_split(a, m, w, out, strides, accumulate, auto_threads(m, k, w.len() / k.max(1)))
}

/// [`skinny_into`] over at most `threads` threads.
fn skinny_split<T: Elem>(a: &[T], m: usize, w: &[T], out: &mut [T], (rs, cs): (usize, usize), accumulate: bool, threads: usize) {
    let k = a.len() / m.max(1);
    let n = w.len() / k.max(1);
    assert!(m > 0 && a.len() == m * k && w.len() == n * k, "skinny_into: shapes");
    assert!(n == 0 || (m - 1) * rs + (n - 1) * cs < out.len(), "skinny_into: output out of bounds");
    // Each task's dots as [its rows of w][m], then placed.
    let per = if threads > 1 { n.div_ceil(threads * 2).max(16) } else { n.max(1) };
    let parts: Vec<Vec<T>> = w
        .par_chunks(per * k)
        .map(|wc| {
            let mut o = vec![T::zero(); wc.len() / k * m];
            skinny_rows(a, k, wc, &mut o);
            o
        })
        .collect();
    place(&parts, m, n, out, (rs, cs), accumulate);
}

/// `out[i * rs + j * cs] (+)=` the `m` values of output j, for the first `n` outputs of `parts`
/// (the tasks' results in order, each [its outputs][m]; a padded panel's extra ones dropped).
fn place<T: Elem>(parts: &[Vec<T>], m: usize, n: usize, out: &mut [T], (rs, cs): (usize, usize), accumulate: bool) {
    for (j, row) in parts.iter().flat_map(|part| part.chunks_exact(m)).take(n).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            let o = &mut out[i * rs + j * cs];
            *o = if accumulate { *o + v } else { v };
        }
    }
}

/// Outputs in a panel of [`Panels`]: four vectors of sixteen lanes.
const PANEL: usize = 64;

/// Rows of activations that [`panels_into`] takes at most (four at a time through a panel).
pub const PANEL_ROWS: usize = 16;

/// A layer's weights [n, k] laid out once for a few rows of activations (one image of a small
/// map): panels of 64 outputs, `[n/64][k][64]`, the last padded with zeros. The product then runs
/// along the outputs, four vectors at a time for every input, reading the weights once from
/// memory and in order (each panel again from cache for every four rows), where
/// [`skinny_into`]'s dot products end in a sum across lanes for every output and re-read the
/// rows from the second-level cache for every row of weights.
#[derive(Clone, Debug)]
pub struct Panels<T> {
    data: Vec<T>,
    n: usize,
    k: usize,
}

impl<T: Elem> Panels<T> {
    /// Panics unless `w` holds `n x k` values, both at least 1: a bug in the caller.
    pub fn new(w: &[T], n: usize, k: usize) -> Self {
        assert!(n > 0 && k > 0 && w.len() == n * k, "Panels: {} weights for {n} x {k}", w.len());
        let mut data = vec![T::zero(); n.div_ceil(PANEL) * k * PANEL];
        for (j, row) in w.chunks_exact(k).enumerate() {
            let panel = &mut data[j / PANEL * k * PANEL..][..k * PANEL];
            for (v, &x) in panel[j % PANEL..].iter_mut().step_by(PANEL).zip(row) {
                *v = x;
            }
        }
        Panels { data, n, k }
    }
}

/// Whether a plan lays out `n x k` weights as [`Panels`] for `m` rows: at most 16 (one image
/// on a 4x4 map) against weights larger than the second-level cache's share (EfficientNet-B0's
/// 2x2 layers at batch 1, 192 x 1152 and back; ConvNeXt-tiny's dense layers). Smaller ones stay
/// in cache, where `skinny_into` (four rows) and the matrix library (more) measured as fast.
pub fn panels_pay(m: usize, k: usize, n: usize) -> bool {
    m > 0 && m <= PANEL_ROWS && k * n >= PANEL_WEIGHTS
}

/// Weights (in values) from which [`panels_pay`]: 512 KB of f32.
const PANEL_WEIGHTS: usize = 1 << 17;

/// `out[i * rs + j * cs] (+)= a_i · w_j` for the `m` (at most 16) rows `a_i` of `a` ([m, k])
/// and the weights `w_j` laid out in `p`, runs of panels split over the pool.
pub fn panels_into<T: Elem>(a: &[T], m: usize, p: &Panels<T>, out: &mut [T], (rs, cs): (usize, usize), accumulate: bool) {
    let (k, n) = (p.k, p.n);
    assert!(m > 0 && m <= PANEL_ROWS && a.len() == m * k, "panels_into: {} activations for {m} rows of {k}", a.len());
    assert!((m - 1) * rs + (n - 1) * cs < out.len(), "panels_into: output out of bounds");
    let panels = n.div_ceil(PANEL);
    let per = panels.div_ceil(crate::tasks_for(auto_threads(m, k, n))).max(1);
    // Each task's outputs as [its panels' outputs][m], then placed.
    let parts: Vec<Vec<T>> = p
        .data
        .par_chunks(per * k * PANEL)
        .map(|run| {
            let mut o = vec![T::zero(); run.len() / k * m];
            for (panel, o) in run.chunks_exact(k * PANEL).zip(o.chunks_exact_mut(PANEL * m)) {
                for first in (0..m).step_by(4) {
                    let rows = (m - first).min(4);
                    panel_rows(&a[first * k..(first + rows) * k], panel, &mut o[first..], m);
                }
            }
            o
        })
        .collect();
    place(&parts, m, n, out, (rs, cs), accumulate);
}

/// `out[x * m + i] = a_i · w_x` for a panel's 64 outputs x and the rows of `a` (one to four,
/// of the panel's depth each).
fn panel_rows<T: Elem>(a: &[T], panel: &[T], out: &mut [T], m: usize) {
    let k = panel.len() / PANEL;
    let rows = a.len() / k;
    assert!((1..=4).contains(&rows) && a.len() == rows * k && out.len() > (PANEL - 1) * m + rows - 1, "panel_rows: shapes");
    #[cfg(target_arch = "x86_64")]
    if let (Some(af), Some(pf), Some(of)) = (crate::simd::as_f32(a), crate::simd::as_f32(panel), crate::simd::as_f32_mut(out)) {
        if crate::simd::has_avx512() {
            // SAFETY: the CPU has AVX-512F (checked just above); the shapes were asserted.
            unsafe {
                match rows {
                    1 => avx512_panel::panel::<1>(af, pf, of, m),
                    2 => avx512_panel::panel::<2>(af, pf, of, m),
                    3 => avx512_panel::panel::<3>(af, pf, of, m),
                    _ => avx512_panel::panel::<4>(af, pf, of, m),
                }
            }
            return;
        }
    }
    match rows {
        1 => panel_products::<T, 1>(a, panel, out, m),
        2 => panel_products::<T, 2>(a, panel, out, m),
        3 => panel_products::<T, 3>(a, panel, out, m),
        _ => panel_products::<T, 4>(a, panel, out, m),
    }
}

/// [`panel_rows`] in portable code: sixty-four sums per row, kept in arrays the compiler
/// turns into vectors.
fn panel_products<T: Elem, const R: usize>(a: &[T], panel: &[T], out: &mut [T], m: usize) {
    let k = a.len() / R;
    let mut acc = [[T::zero(); PANEL]; R];
    for (c, wv) in panel.chunks_exact(PANEL).enumerate() {
        let wv: &[T; PANEL] = wv.try_into().expect("a panel's row");
        for (i, acc) in acc.iter_mut().enumerate() {
            let av = a[i * k + c];
            for x in 0..PANEL {
                acc[x] += av * wv[x];
            }
        }
    }
    for x in 0..PANEL {
        for (i, acc) in acc.iter().enumerate() {
            out[x * m + i] = acc[x];
        }
    }
}

/// [`panel_rows`] in f32 with AVX-512: `R` rows by four vectors of outputs, sixteen fused
/// multiply-adds per input (the portable build multiplies and adds apart, twice the work where
/// the product is bound by arithmetic: 16 rows from cache).
#[cfg(target_arch = "x86_64")]
mod avx512_panel {
    use std::arch::x86_64::*;

    use super::PANEL;

    /// # Safety
    /// The CPU must have AVX-512F; `a` holds `R` rows of the panel's depth, `out` room for
    /// `out[(PANEL - 1) * m + R - 1]` (asserted by the caller).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn panel<const R: usize>(a: &[f32], panel: &[f32], out: &mut [f32], m: usize) {
        let k = a.len() / R;
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for (c, wv) in panel.chunks_exact(PANEL).enumerate() {
            // SAFETY: `wv` holds 64 values: four unaligned loads of sixteen.
            let w = unsafe {
                [
                    _mm512_loadu_ps(wv.as_ptr()),
                    _mm512_loadu_ps(wv.as_ptr().add(16)),
                    _mm512_loadu_ps(wv.as_ptr().add(32)),
                    _mm512_loadu_ps(wv.as_ptr().add(48)),
                ]
            };
            for (i, acc) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(a[i * k + c]);
                for (acc, &w) in acc.iter_mut().zip(&w) {
                    *acc = _mm512_fmadd_ps(av, w, *acc);
                }
            }
        }
        let mut sums = [[0f32; PANEL]; R];
        for (row, acc) in sums.iter_mut().zip(&acc) {
            for (v, &acc) in acc.iter().enumerate() {
                // SAFETY: `row` holds 64 values: sixteen stored at each of four offsets.
                unsafe { _mm512_storeu_ps(row.as_mut_ptr().add(16 * v), acc) };
            }
        }
        for x in 0..PANEL {
            for (i, row) in sums.iter().enumerate() {
                out[x * m + i] = row[x];
            }
        }
    }
}

crate::multiversion_wide! {
    /// out[j * m + i] = a_i · w_j for the rows of `w` (k values each) and the m rows of `a`.
    fn skinny_rows<T: Elem>(a: &[T], k: usize, w: &[T], out: &mut [T]) {
        let m = a.len() / k;
        for (wr, o) in w.chunks_exact(k).zip(out.chunks_exact_mut(m)) {
            let mut i = 0;
            while i < m {
                let rows = (m - i).min(4);
                let (ai, oi) = (&a[i * k..(i + rows) * k], &mut o[i..i + rows]);
                match rows {
                    4 => dots::<T, 4>(ai, wr, oi),
                    3 => dots::<T, 3>(ai, wr, oi),
                    2 => dots::<T, 2>(ai, wr, oi),
                    _ => dots::<T, 1>(ai, wr, oi),
                }
                i += rows;
            }
        }
    }
}

/// `R` dot products of the rows of `a` with `w`, sixteen lanes each.
#[inline(always)]
fn dots<T: Elem, const R: usize>(a: &[T], w: &[T], out: &mut [T]) {
    const L: usize = 16;
    let k = w.len();
    let whole = k / L * L;
    let mut acc = [[T::zero(); L]; R];
    for l in (0..whole).step_by(L) {
        let wv: &[T; L] = w[l..l + L].try_into().expect("sixteen lanes");
        for (r, acc) in acc.iter_mut().enumerate() {
            let av: &[T; L] = a[r * k + l..r * k + l + L].try_into().expect("sixteen lanes");
            for x in 0..L {
                acc[x] += av[x] * wv[x];
            }
        }
    }
    for (r, (acc, o)) in acc.iter().zip(out.iter_mut()).enumerate() {
        let tail = (whole..k).fold(T::zero(), |s, l| s + a[r * k + l] * w[l]);
        *o = acc.iter().fold(T::zero(), |s, &v| s + v) + tail;
    }
}
