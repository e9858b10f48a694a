//! Small vector loops shared by the direct kernels, written so the compiler vectorises them,
//! and [`multiversion!`](crate::multiversion), which compiles a kernel twice: for AVX2 (chosen
//! at run time when the CPU has it) and portably.

use std::mem::MaybeUninit;

use stride_tensor::Elem;

/// Whether this CPU runs the AVX2 builds of the kernels (cached by std after the first call).
#[inline(always)]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU has AVX2 and FMA, which the hand-written AVX2 kernels (the depthwise tiles,
/// the grouped kernel's AVX2 tile) use.
#[inline(always)]
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `fn name<T: Elem>(args) -> ret { body }` compiled twice: once with AVX2 enabled,
/// called when the CPU has it, and once for the baseline instruction set. The body and every
/// `#[inline(always)]` helper it calls are vectorised with 256-bit registers in the first.
#[macro_export]
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident<T: Elem>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name<T: Elem>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body<T: Elem>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                fn avx2<T: Elem>($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                if $crate::simd::has_avx2() {
                    // SAFETY: `avx2` only needs the AVX2 instructions, which the CPU has
                    // (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

/// [`multiversion!`] with a third build, AVX-512, tried first: for loops that compute more than
/// they move (the element-wise functions built on `vmath`'s exp and erf, the small depthwise
/// products and `gemm::skinny_into`'s dot products), where sixteen lanes did twice the work of
/// eight (GELU 0.63 -> 0.30 ns a value on 2 threads; a 4x4 5x5 depthwise layer 1.85 -> 1.65
/// ms). Memory-bound loops gain nothing from it, so the other kernels keep two builds.
#[macro_export]
macro_rules! multiversion_wide {
    ($(#[$m:meta])* $vis:vis fn $name:ident<T: Elem>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name<T: Elem>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn wide_body<T: Elem>($($arg: $ty),*) $(-> $ret)? $body
            // The AVX2 and baseline builds, as every other kernel has them (item names are not
            // hygienic: `multiversion!` defines its own `body`).
            $crate::multiversion! {
                fn narrow<T: Elem>($($arg: $ty),*) $(-> $ret)? { wide_body($($arg),*) }
            }
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512<T: Elem>($($arg: $ty),*) $(-> $ret)? { wide_body($($arg),*) }
                if $crate::simd::has_avx512() {
                    // SAFETY: `avx512` only needs the AVX-512 foundation instructions, which the
                    // CPU has (checked just above).
                    return unsafe { avx512($($arg),*) };
                }
            }
            narrow($($arg),*)
        }
    };
}

/// Whether this CPU runs the AVX-512 builds of [`multiversion_wide!`] and of the convolution
/// kernels written for it (direct, grouped, stem, stride-2 depthwise), worked out once.
/// The environment variable `STRIDE_NO_AVX512` (any value) turns them off, so that what a CPU
/// without AVX-512 runs can be tested and timed on a machine that has it (CI runs the slice
/// and convolution tests so).
#[inline(always)]
pub fn has_avx512() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::env::var_os("STRIDE_NO_AVX512").is_none() && std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// `x` seen as f32 values, when `T` is f32 (for the hand-written x86 kernels, which are written for it).
pub(crate) fn as_f32<T: Elem>(x: &[T]) -> Option<&[f32]> {
    // SAFETY: `T` is f32 (same type id), so the cast changes nothing.
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()).then(|| unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len()) })
}

/// [`as_f32`] for a mutable slice.
pub(crate) fn as_f32_mut<T: Elem>(x: &mut [T]) -> Option<&mut [f32]> {
    // SAFETY: as in `as_f32`; the borrow of `x` moves into the result.
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<f32>(), x.len()) })
}

/// `n` values cut into chunks of `chunk`, each zeroed and then written by `fill(index, chunk)`
/// on the thread pool: the zeroing happens on the thread that fills the chunk, just before,
/// instead of in one serial pass over the whole buffer first (`vec![0; n]` of ResNet-18's
/// transformed 512 x 512 filters is a 37 MB memset on one thread while the other waits).
pub fn par_filled<T: Elem>(n: usize, chunk: usize, fill: impl Fn(usize, &mut [T]) + Sync) -> Vec<T> {
    par_filled_init(n, chunk, || (), |_, i, part| fill(i, part))
}

/// [`par_filled`] with per-task state made by `init` (rayon's `for_each_init`), for fills
/// that reuse a scratch buffer from chunk to chunk.
pub fn par_filled_init<T: Elem, S>(
    n: usize,
    chunk: usize,
    init: impl Fn() -> S + Sync + Send,
    fill: impl Fn(&mut S, usize, &mut [T]) + Sync,
) -> Vec<T> {
    // SAFETY: each chunk is zeroed (`filled`) before `fill` sees it, so every element is written.
    unsafe { par_uninit(n, chunk, init, |state, i, part| fill(state, i, filled(part, T::zero()))) }
}

/// `n` values cut into chunks of `chunk`, each handed uninitialised to `fill(index, chunk)` on
/// the thread pool, for fills that write every value anyway and would only pay for a zeroing
/// pass first (a convolution's output filled with its bias, then added into).
///
/// # Safety
/// `fill` must write every element of its chunk before it returns.
pub unsafe fn par_written<T: Elem>(n: usize, chunk: usize, fill: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync) -> Vec<T> {
    // SAFETY: forwarded from the caller.
    unsafe { par_uninit(n, chunk, || (), |_, i, part| fill(i, part)) }
}

/// `part` with every element set to `value`, as initialised values.
pub fn filled<T: Copy>(part: &mut [MaybeUninit<T>], value: T) -> &mut [T] {
    part.fill(MaybeUninit::new(value));
    // SAFETY: every element was initialised just above, and `MaybeUninit<T>` has the layout
    // of `T`.
    unsafe { &mut *(part as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// The machinery of [`par_filled_init`] and [`par_written`].
///
/// # Safety
/// `fill` must write every element of its chunk before it returns.
unsafe fn par_uninit<T: Elem, S>(
    n: usize,
    chunk: usize,
    init: impl Fn() -> S + Sync + Send,
    fill: impl Fn(&mut S, usize, &mut [MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    use rayon::prelude::*;
    let mut v: Vec<T> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n].par_chunks_mut(chunk.max(1)).enumerate().for_each_init(init, |state, (i, part)| fill(state, i, part));
    // SAFETY: the chunks cover the first `n` elements, and the caller's `fill` wrote each.
    unsafe { v.set_len(n) };
    v
}

/// `dst = src` for short rows without a call to `memcpy`, whose fixed cost dominates copies of
/// a few dozen elements (im2col copies rows of 8 to 32 on LeNet-sized maps): two fixed-size
/// copies from both ends, overlapping in the middle.
#[inline(always)]
pub fn copy_short<T: Copy>(dst: &mut [T], src: &[T]) {
    #[inline(always)]
    fn ends<T: Copy, const B: usize>(dst: &mut [T], src: &[T]) {
        let n = dst.len();
        dst[..B].copy_from_slice(&src[..B]);
        dst[n - B..].copy_from_slice(&src[n - B..]);
    }
    let n = dst.len();
    assert_eq!(n, src.len(), "copy_short: lengths differ");
    match n {
        0 => {}
        1..=3 => {
            dst[0] = src[0];
            dst[n / 2] = src[n / 2];
            dst[n - 1] = src[n - 1];
        }
        4..=7 => ends::<T, 4>(dst, src),
        8..=15 => ends::<T, 8>(dst, src),
        16..=31 => ends::<T, 16>(dst, src),
        32..=63 => ends::<T, 32>(dst, src),
        _ => dst.copy_from_slice(src),
    }
}

/// y += a * x
#[inline(always)]
pub fn axpy<T: Elem>(a: T, x: &[T], y: &mut [T]) {
    for (d, &v) in y.iter_mut().zip(x) {
        *d += a * v;
    }
}

/// dst += src, element by element, in parallel over large buffers (a gradient that several
/// steps of a plan add to).
pub fn par_add_assign<T: Elem>(dst: &mut [T], src: &[T]) {
    use rayon::prelude::*;
    assert_eq!(dst.len(), src.len(), "par_add_assign: lengths");
    const CHUNK: usize = 1 << 15;
    let add = |d: &mut [T], s: &[T]| d.iter_mut().zip(s).for_each(|(d, &s)| *d += s);
    if dst.len() < 2 * CHUNK {
        add(dst, src);
    } else {
        dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| add(d, s));
    }
}

/// `y[i * stride] += a * x[i]`
#[inline(always)]
pub fn scatter_axpy<T: Elem>(a: T, x: &[T], stride: usize, y: &mut [T]) {
    if stride == 1 {
        return axpy(a, x, &mut y[..x.len()]);
    }
    for (i, &v) in x.iter().enumerate() {
        y[i * stride] += a * v;
    }
}

/// `sum a[i] * b[i * stride]`, with eight independent partial sums so it vectorises.
#[inline(always)]
pub fn dot_strided<T: Elem>(a: &[T], b: &[T], stride: usize) -> T {
    if stride != 1 {
        return a.iter().enumerate().map(|(i, &v)| v * b[i * stride]).fold(T::zero(), |s, v| s + v);
    }
    let b = &b[..a.len()];
    let mut acc = [T::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = acc.iter().fold(T::zero(), |s, &v| s + v);
    for (&x, &y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `sum x[i]`, with eight independent partial sums so it vectorises.
#[inline(always)]
pub fn sum<T: Elem>(x: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l];
        }
    }
    rest.iter().fold(acc.iter().fold(T::zero(), |s, &v| s + v), |s, &v| s + v)
}

#[cfg(test)]
mod tests {
    use super::copy_short;

    #[test]
    fn par_filled_hands_every_chunk_zeroed_once() {
        for (n, chunk) in [(0, 4), (1, 4), (10, 3), (12, 4), (7, 100)] {
            let v: Vec<f64> = super::par_filled(n, chunk, |i, part| {
                assert!(part.iter().all(|&x| x == 0.0), "chunk {i} not zeroed");
                assert!(part.len() == chunk || (i + 1) * chunk >= n, "chunk {i} of {} values", part.len());
                for (j, x) in part.iter_mut().enumerate() {
                    *x = (i * chunk + j) as f64;
                }
            });
            assert_eq!(v, (0..n).map(|i| i as f64).collect::<Vec<_>>());
        }
    }

    #[test]
    fn copy_short_copies_every_length_exactly() {
        let src: Vec<u32> = (1..=100).collect();
        for n in 0..=100 {
            // The destination is wider than the copy: nothing past n may be touched.
            let mut dst = vec![0u32; n + 3];
            copy_short(&mut dst[..n], &src[..n]);
            assert_eq!(&dst[..n], &src[..n], "n = {n}");
            assert_eq!(&dst[n..], &[0, 0, 0], "n = {n}");
        }
    }
}
