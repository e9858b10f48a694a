//! Small vector loops shared by the direct kernels, written so the compiler vectorises them,
//! and [`multiversion!`](crate::multiversion), which compiles a kernel twice: for AVX2 (chosen
//! at run time when the CPU has it) and portably.

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

/// y += a * x
#[inline(always)]
pub fn axpy<T: Elem>(a: T, x: &[T], y: &mut [T]) {
    for (d, &v) in y.iter_mut().zip(x) {
        *d += a * v;
    }
}

/// y[i * stride] += a * x[i]
#[inline(always)]
pub fn scatter_axpy<T: Elem>(a: T, x: &[T], stride: usize, y: &mut [T]) {
    if stride == 1 {
        return axpy(a, x, &mut y[..x.len()]);
    }
    for (i, &v) in x.iter().enumerate() {
        y[i * stride] += a * v;
    }
}

/// sum a[i] * b[i * stride], with eight independent partial sums so it vectorises.
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

/// sum x[i], with eight independent partial sums so it vectorises.
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
