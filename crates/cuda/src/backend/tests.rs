//! Checks of the backend's launches that need no GPU.

use super::{FUNCTIONS, KERNELS};

/// The backend's files that launch kernels.
const SOURCES: [&str; 5] =
    [include_str!("mod.rs"), include_str!("conv.rs"), include_str!("layout.rs"), include_str!("norm.rs"), include_str!("update.rs")];

/// Every kernel the backend launches is loaded at start-up and defined in kernels.cu: a
/// name missing from `FUNCTIONS` would only fail on a GPU, at its first launch.
#[test]
fn every_launched_kernel_is_loaded_and_defined() {
    let launched: std::collections::BTreeSet<&str> = SOURCES
        .iter()
        .flat_map(|src| src.split("launch!(").skip(1))
        .filter_map(|call| call.split('"').nth(1))
        .filter(|name| !name.contains(' '))
        .collect();
    assert!(launched.len() >= 40, "found only {launched:?}");
    for name in &launched {
        assert!(FUNCTIONS.contains(name), "{name} is launched but not in FUNCTIONS");
    }
    for f in FUNCTIONS {
        assert!(KERNELS.contains(&format!("__global__ void {f}(")), "{f} is not a kernel of kernels.cu");
        assert!(launched.contains(f), "{f} is loaded but never launched");
    }
}

/// The arguments up to the bracket that closes the one before `text`, split at the commas
/// outside any inner brackets.
fn top_level_args(text: &str) -> Vec<String> {
    let (mut depth, mut parts, mut cur) = (0i32, Vec::new(), String::new());
    for ch in text.chars() {
        match ch {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' if depth == 0 => break,
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(ch);
    }
    parts.push(cur);
    parts.into_iter().map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect()
}

/// Each launch passes as many arguments as its kernel takes, of the same types where the
/// argument's text says its type (cudarc cannot check: a missing or narrower argument reads
/// garbage on the GPU).
#[test]
fn every_launch_passes_as_many_arguments_as_its_kernel_takes() {
    let (mut checked, mut typed) = (0, 0);
    for call in SOURCES.iter().flat_map(|src| src.split("launch!(").skip(1)) {
        let args = top_level_args(call);
        // self, "name", the launch configuration, then the kernel's arguments.
        let Some(name) = args.get(1).and_then(|n| n.strip_prefix('"')).and_then(|n| n.strip_suffix('"')) else {
            continue;
        };
        let sig = KERNELS.split(&format!("__global__ void {name}(")).nth(1).unwrap_or_else(|| panic!("no kernel {name}"));
        let params = top_level_args(sig);
        assert_eq!(args.len() - 3, params.len(), "{name}: {} arguments for {} parameters: {:?}", args.len() - 3, params.len(), &args[3..]);
        for (arg, param) in args[3..].iter().zip(&params) {
            if let (Some(have), Some(want)) = (rust_type(arg), c_type(param)) {
                assert_eq!(have, want, "{name}: argument `{arg}` for parameter `{param}`");
                typed += 1;
            }
        }
        checked += 1;
    }
    assert!(checked >= 40 && typed >= 60, "checked only {checked} launches and {typed} argument types");
}

/// What a launch argument passes, where its text says: "ptr" (a buffer), or a scalar type.
fn rust_type(arg: &str) -> Option<&'static str> {
    let a = arg.strip_prefix('&')?;
    if a.starts_with("mut ") {
        return Some("ptr");
    }
    let a = a.trim_start_matches('(').trim_end_matches(')');
    let tail = |t: &str| a.ends_with(&format!("as {t}")) || a.ends_with(&format!("{t}::MAX")) || a.ends_with(t);
    if a.starts_with("int(") || a.starts_with("i32::from(") || tail("i32") {
        Some("i32")
    } else if tail("i64") {
        Some("i64")
    } else if tail("f32") {
        Some("f32")
    } else if tail("f64") {
        Some("f64")
    } else {
        None
    }
}

/// What a kernel parameter takes: "ptr", a scalar type, or `None` for a struct.
fn c_type(param: &str) -> Option<&'static str> {
    if param.contains('*') {
        return Some("ptr");
    }
    match param.split_whitespace().next()? {
        "int" => Some("i32"),
        "i64" => Some("i64"),
        "float" => Some("f32"),
        "double" => Some("f64"),
        _ => None,
    }
}
