//! The example of README.md, kept compiling and checked to do what it says.

use stride_autograd::{conv2d, cross_entropy, linear, max_pool2d, Conv2dOptions, Padding, Pool2dOptions, Result, Rng, Var};

#[test]
fn readme_example_runs_and_fills_gradients() -> Result<()> {
    let mut rng = Rng::seed(0);
    let x: Var = Var::constant(rng.normal(&[8, 1, 28, 28], 0.0, 1.0)?); // NCHW
    let w: Var = Var::parameter(rng.normal(&[20, 1, 3, 3], 0.0, 0.1)?); // [K, C/groups, R, S]
    let b: Var = Var::parameter(rng.normal(&[20], 0.0, 0.1)?);
    let y = conv2d(&x, &w, Some(&b), &Conv2dOptions::default().padding(Padding::Same))?.relu()?;
    let y = max_pool2d(&y, &Pool2dOptions::new(2))?.flatten()?; // [8, 20*14*14]
    let fc: Var = Var::parameter(rng.normal(&[10, 20 * 14 * 14], 0.0, 0.01)?);
    let loss = cross_entropy(&linear(&y, &fc, None)?, &[3, 1, 4, 1, 5, 9, 2, 6], 0.0)?;
    loss.backward()?;
    assert_eq!(y.shape(), [8, 20 * 14 * 14]);
    for p in [&w, &b, &fc] {
        let g = p.grad().expect("gradient");
        assert_eq!(g.shape(), p.shape());
        assert!(g.data().iter().any(|&v| v != 0.0));
    }
    Ok(())
}
