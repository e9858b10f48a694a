//! exp, exp - 1, ln, tanh and erf of f32 values without calls or branches, so that a loop over a
//! slice vectorises (libm's scalar calls cost 5-20 ns a value: the VAE's tanh, ELU, sigmoid
//! and log-likelihood spent more time in them than in their memory traffic). Each is a range
//! reduction to a small interval, a short polynomial there, and selects for the edges.
//! Accuracy: exp, exp - 1, ln and tanh within 3 ulp of the exact value over the normal range,
//! sigmoid within 4 (tested against f64's functions below); results under 2e-38 flush to zero.

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 in two parts: the first has few enough bits that n * LN2_HI is exact for |n| < 2^15.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 * 2^23: adding and subtracting it rounds an f32 of magnitude < 2^22 to an integer.
const ROUND: f32 = 12_582_912.0;
/// Inputs above this overflow to infinity (ln of f32::MAX).
#[cfg(test)]
const EXP_HI: f32 = 88.722_84;
/// Inputs below this give results under 2e-38, which may flush to zero.
#[cfg(test)]
const EXP_LO: f32 = -86.9;
/// exp's clamp, a little past both ends, where the arithmetic gives the edges by itself:
/// 89 scales by 2^128 and overflows to infinity, -87.5 scales by 2^-126 made of a zero
/// exponent field, which is zero (no comparisons and selects a value; NaN passes the clamp).
const CLAMP_HI: f32 = 89.0;
const CLAMP_LO: f32 = -87.5;
/// Inside this, e^x - 1 comes from the series without its 1 (outside, e^x - 1 cancels little).
const NEAR: f32 = 0.5;

/// e^r - 1 - r for |r| <= 1/2, the Taylor series to r^8 (truncation below 1e-8 relative).
#[inline(always)]
fn series_past_linear(r: f32) -> f32 {
    let p = 1.0 / 40320.0;
    let p = p * r + 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    p * r * r
}

/// e^r - 1 - r for |r| <= ln 2 / 2 (exp's reduced argument), the Taylor series to r^7
/// (truncation below 6e-9 relative), in Estrin's form: three independent pairs, so that a
/// vector's steps do not wait on one another as Horner's chain of 14 does.
#[inline(always)]
fn exp_series(r: f32) -> f32 {
    let r2 = r * r;
    let a = 0.5 + r * (1.0 / 6.0);
    let b = 1.0 / 24.0 + r * (1.0 / 120.0);
    let c = 1.0 / 720.0 + r * (1.0 / 5040.0);
    (r2 * r2 * c + r2 * b + a) * r2
}

/// e^x.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(CLAMP_LO, CLAMP_HI);
    // x = n ln 2 + r, |r| <= ln 2 / 2, -126 <= n <= 128
    let shifted = xc * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let er = 1.0 + r + exp_series(r);
    // n as an integer from the low bits of `shifted` (ROUND's binade has a unit step): `n as
    // i32` saturates, which compiled to a lane-by-lane conversion with checks.
    let ni = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    // 2^n as 2^(n-1) * 2, so that n = 128 (x near EXP_HI) is finite where e^x is and infinite
    // past it; n = -126 gives a zero scale, so inputs under about -87 give zero.
    let scale = f32::from_bits((ni.wrapping_add(126) as u32) << 23);
    er * scale * 2.0
}

/// e^x - 1, accurate near 0.
#[inline(always)]
pub fn exp_m1(x: f32) -> f32 {
    let near = x + series_past_linear(x.clamp(-NEAR, NEAR));
    let far = exp(x) - 1.0;
    if x.abs() < NEAR {
        near
    } else {
        far
    }
}

/// ln x (NaN below 0, -inf at 0).
#[inline(always)]
pub fn ln(x: f32) -> f32 {
    // Subnormal inputs are scaled into the normal range first.
    let tiny = x < f32::MIN_POSITIVE;
    let xs = if tiny { x * 8_388_608.0 } else { x };
    let bits = xs.to_bits();
    // x = 2^e m with m in [sqrt(1/2), sqrt(2))
    let mut e = ((bits >> 23) & 0xff) as i32 - 127;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    let halve = m > std::f32::consts::SQRT_2;
    m = if halve { m * 0.5 } else { m };
    e += i32::from(halve) - if tiny { 23 } else { 0 };
    // ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716: the odd series to s^9.
    let f = m - 1.0;
    let s = f / (2.0 + f);
    let s2 = s * s;
    let p = s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0))));
    let ln_m = 2.0 * s + 2.0 * s * p;
    let e = e as f32;
    let y = e * LN2_HI + (ln_m + e * LN2_LO);
    if x.is_nan() || x < 0.0 {
        f32::NAN
    } else if x == 0.0 {
        f32::NEG_INFINITY
    } else if x == f32::INFINITY {
        f32::INFINITY
    } else {
        y
    }
}

/// tanh x = (e^2x - 1) / (e^2x + 1), odd, from e^2|x| - 1; 1 in f32 beyond |x| = 9.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let a = x.abs();
    // A comparison, not `min`, so that NaN stays NaN.
    let t = exp_m1(2.0 * if a > 9.0 { 9.0 } else { a });
    (t / (t + 2.0)).copysign(x)
}

/// 1 / (1 + e^-x).
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// The error function: inside |x| < 1 its Taylor series to x^19 (truncation under 2e-8),
/// outside Abramowitz and Stegun's 7.1.26 (1 - t P(t) e^(-x^2), t = 1 / (1 + p|x|), absolute
/// error under 1.5e-7), odd; within 4 ulp of the exact value (3.2 at worst, tested below). Both branches are
/// computed and one selected, so a loop over a slice vectorises.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    // (2 / sqrt(pi)) sum_n (-1)^n x^(2n+1) / (n! (2n + 1)), Horner in x^2.
    let z = a * a;
    let mut p = -1.0 / (362_880.0 * 19.0);
    p = p * z + 1.0 / (40_320.0 * 17.0);
    p = p * z - 1.0 / (5_040.0 * 15.0);
    p = p * z + 1.0 / (720.0 * 13.0);
    p = p * z - 1.0 / (120.0 * 11.0);
    p = p * z + 1.0 / (24.0 * 9.0);
    p = p * z - 1.0 / (6.0 * 7.0);
    p = p * z + 1.0 / (2.0 * 5.0);
    p = p * z - 1.0 / 3.0;
    p = p * z + 1.0;
    let near = std::f32::consts::FRAC_2_SQRT_PI * a * p;
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let q = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_7) * t - 0.284_496_74) * t + 0.254_829_6) * t;
    let far = 1.0 - q * exp(-z);
    // A comparison that a NaN fails: NaN in, NaN out through `far`.
    (if a < 1.0 { near } else { far }).copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between an f32 and the exact (f64) value.
    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        if got == w || (got.is_nan() && want.is_nan()) {
            return 0.0;
        }
        let ulp = (f32::from_bits(w.abs().to_bits() + 1) - w.abs()) as f64;
        (got as f64 - want).abs() / ulp
    }

    /// Every 97th f32 bit pattern in [lo, hi] (every 997th in a debug build).
    fn sweep(lo: f32, hi: f32, mut f: impl FnMut(f32)) {
        let step = if cfg!(debug_assertions) { 997 } else { 97 };
        for bits in (0..u32::MAX).step_by(step) {
            let x = f32::from_bits(bits);
            if x >= lo && x <= hi {
                f(x);
            }
        }
    }

    fn worst(lo: f32, hi: f32, fast: fn(f32) -> f32, exact: fn(f64) -> f64) -> (f64, f32) {
        let mut worst = (0.0, 0.0);
        sweep(lo, hi, |x| {
            let e = ulps(fast(x), exact(x as f64));
            if e > worst.0 {
                worst = (e, x);
            }
        });
        worst
    }

    #[test]
    fn exp_is_within_3_ulp_over_the_normal_range() {
        let (e, at) = worst(EXP_LO, EXP_HI, exp, f64::exp);
        assert!(e <= 3.0, "exp: {e} ulp at {at}");
        let (e, at) = worst(-80.0, 80.0, exp_m1, f64::exp_m1);
        assert!(e <= 3.0, "exp_m1: {e} ulp at {at}");
    }

    /// The clamp's ends stand in for the comparisons that made the edges: past ln(f32::MAX)
    /// exp overflows to infinity exactly where the exact value does not fit an f32, and under
    /// -86.9 it is within 3 ulp of the exact value or zero (zero from -87.7 down).
    #[test]
    fn exp_edges_come_from_the_arithmetic() {
        sweep(88.0, 1e6, |x| {
            let want = (x as f64).exp();
            let got = exp(x);
            assert_eq!(got.is_infinite(), want > f32::MAX as f64, "exp({x}) = {got}, exactly {want:e}");
            assert!(got.is_infinite() || ulps(got, want) <= 3.0, "exp({x}) = {got}, exactly {want:e}");
        });
        sweep(-1e6, EXP_LO, |x| {
            let got = exp(x);
            assert!(got == 0.0 || ulps(got, (x as f64).exp()) <= 3.0, "exp({x}) = {got:e}");
            assert!(x > -87.7 || got == 0.0, "exp({x}) = {got:e}, not flushed");
        });
    }

    #[test]
    fn ln_is_within_3_ulp_down_to_subnormals() {
        let (e, at) = worst(1e-44, f32::MAX, ln, f64::ln);
        assert!(e <= 3.0, "ln: {e} ulp at {at}");
    }

    #[test]
    fn tanh_within_3_ulp_and_sigmoid_within_4() {
        let (e, at) = worst(-20.0, 20.0, tanh, f64::tanh);
        assert!(e <= 3.0, "tanh: {e} ulp at {at}");
        let (e, at) = worst(-80.0, 80.0, sigmoid, |x| 1.0 / (1.0 + (-x).exp()));
        assert!(e <= 4.0, "sigmoid: {e} ulp at {at}");
    }

    #[test]
    fn erf_is_within_4_ulp() {
        let (e, at) = worst(-10.0, 10.0, erf, libm::erf);
        assert!(e <= 4.0, "erf: {e} ulp at {at}");
        assert_eq!(erf(f32::INFINITY), 1.0);
        assert_eq!(erf(f32::NEG_INFINITY), -1.0);
        assert_eq!(erf(0.0), 0.0);
        assert!(erf(f32::NAN).is_nan());
    }

    #[test]
    fn edges_are_the_limits() {
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(88.7).is_finite() && exp(f32::NAN).is_nan());
        assert_eq!(exp_m1(-100.0), -1.0);
        assert_eq!(exp_m1(0.0), 0.0);
        assert_eq!(ln(0.0), f32::NEG_INFINITY);
        assert!(ln(-1.0).is_nan() && ln(f32::NAN).is_nan());
        assert_eq!(ln(f32::INFINITY), f32::INFINITY);
        assert_eq!(ln(1.0), 0.0);
        assert_eq!(tanh(100.0), 1.0);
        assert_eq!(tanh(-100.0), -1.0);
        assert_eq!(tanh(0.0), 0.0);
        assert!(tanh(f32::NAN).is_nan());
        assert_eq!(sigmoid(-200.0), 0.0);
        assert_eq!(sigmoid(200.0), 1.0);
    }
}
