//! `Tensor`: an N-d array with contiguous row-major storage shared copy-on-write, on the CPU
//! or on a device.

use std::sync::{Arc, OnceLock};

use crate::device::{Device, DeviceBuffer};
use crate::shape::{self, numel};
use crate::{Elem, Error, Result};

/// Where the elements are: host memory, or a device buffer with a host copy made on first read.
#[derive(Clone)]
enum Storage<T: Elem> {
    Host(Arc<Vec<T>>),
    Device { buf: Arc<dyn DeviceBuffer<T>>, host: Arc<OnceLock<Vec<T>>> },
}

/// An N-d array of `T` in row-major (C) order. Cloning is cheap (the storage is shared);
/// mutation copies the storage first if it is shared.
///
/// A tensor on a device (see [`Tensor::device`]) is computed on by the backend of that device
/// through `stride-autograd`'s ops. The methods of this type are host arithmetic: on a device
/// tensor they read its elements back once (cached) and return a CPU tensor.
#[derive(Clone)]
pub struct Tensor<T: Elem = f32> {
    shape: Vec<usize>,
    data: Storage<T>,
}

impl<T: Elem> PartialEq for Tensor<T> {
    fn eq(&self, other: &Self) -> bool {
        self.shape == other.shape && self.device() == other.device() && self.data() == other.data()
    }
}

impl<T: Elem> std::fmt::Debug for Tensor<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor<{}>{:?}", T::NAME, self.shape)?;
        if !self.device().is_cpu() {
            write!(f, " on {}", self.device())?;
        } else if self.numel() <= 16 {
            write!(f, " {:?}", self.data())?;
        }
        Ok(())
    }
}

impl<T: Elem> Tensor<T> {
    /// A tensor from row-major `data`; `data.len()` must equal the product of `shape`.
    pub fn from_vec(data: Vec<T>, shape: &[usize]) -> Result<Self> {
        let n = numel("Tensor::from_vec", shape)?;
        if n != data.len() {
            crate::bail!(shape, "Tensor::from_vec", "shape {shape:?} needs {n} elements, got {}", data.len());
        }
        Ok(Tensor { shape: shape.to_vec(), data: Storage::Host(Arc::new(data)) })
    }

    /// A tensor whose elements a device backend holds; `buf.len()` must equal the product of
    /// `shape`.
    pub fn from_device(buf: Arc<dyn DeviceBuffer<T>>, shape: &[usize]) -> Result<Self> {
        let n = numel("Tensor::from_device", shape)?;
        if n != buf.len() {
            crate::bail!(shape, "Tensor::from_device", "shape {shape:?} needs {n} elements, the {} buffer holds {}", buf.device(), buf.len());
        }
        Ok(Tensor { shape: shape.to_vec(), data: Storage::Device { buf, host: Arc::new(OnceLock::new()) } })
    }

    /// Internal constructor for kernels that built `data` for `shape` themselves.
    pub(crate) fn from_parts(data: Vec<T>, shape: Vec<usize>) -> Self {
        debug_assert_eq!(data.len(), shape.iter().product::<usize>());
        Tensor { shape, data: Storage::Host(Arc::new(data)) }
    }

    pub fn full(shape: &[usize], value: T) -> Result<Self> {
        let n = numel("Tensor::full", shape)?;
        Ok(Self::from_parts(vec![value; n], shape.to_vec()))
    }
    pub fn zeros(shape: &[usize]) -> Result<Self> {
        Self::full(shape, T::zero())
    }
    pub fn ones(shape: &[usize]) -> Result<Self> {
        Self::full(shape, T::one())
    }
    /// A rank-0 tensor holding one value.
    pub fn scalar(value: T) -> Self {
        Self::from_parts(vec![value], vec![])
    }
    /// A tensor whose element at flat index `i` is `f(i)`.
    pub fn from_fn(shape: &[usize], f: impl FnMut(usize) -> T) -> Result<Self> {
        let n = numel("Tensor::from_fn", shape)?;
        Ok(Self::from_parts((0..n).map(f).collect(), shape.to_vec()))
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn numel(&self) -> usize {
        match &self.data {
            Storage::Host(v) => v.len(),
            Storage::Device { buf, .. } => buf.len(),
        }
    }
    /// Where the elements live.
    pub fn device(&self) -> Device {
        match &self.data {
            Storage::Host(_) => Device::Cpu,
            Storage::Device { buf, .. } => buf.device(),
        }
    }
    /// The device buffer of a tensor that is not on the CPU.
    pub fn device_buffer(&self) -> Option<&Arc<dyn DeviceBuffer<T>>> {
        match &self.data {
            Storage::Host(_) => None,
            Storage::Device { buf, .. } => Some(buf),
        }
    }
    /// The same elements in host memory (a copy read back from a device; a cheap clone on the
    /// CPU). Moving *to* a device goes through its backend (`stride_autograd::ToDevice`).
    pub fn to_host(&self) -> Result<Self> {
        match &self.data {
            Storage::Host(_) => Ok(self.clone()),
            Storage::Device { buf, host } => {
                let v = match host.get() {
                    Some(v) => v.clone(),
                    None => buf.read()?,
                };
                Tensor::from_vec(v, &self.shape)
            }
        }
    }
    /// The elements in row-major order. On a device, read back once and kept; a device that
    /// fails to answer panics here (use [`Tensor::to_host`] to get that as an error).
    pub fn data(&self) -> &[T] {
        match &self.data {
            Storage::Host(v) => v,
            Storage::Device { buf, host } => {
                host.get_or_init(|| buf.read().unwrap_or_else(|e| panic!("reading a tensor back from {}: {e}", buf.device())))
            }
        }
    }
    /// Mutable elements; copies the storage first if another tensor shares it. A device
    /// tensor is brought to the host first (it becomes a CPU tensor).
    pub fn data_mut(&mut self) -> &mut [T] {
        if let Storage::Device { .. } = &self.data {
            self.data = Storage::Host(Arc::new(self.data().to_vec()));
        }
        match &mut self.data {
            Storage::Host(v) => Arc::make_mut(v).as_mut_slice(),
            Storage::Device { .. } => unreachable!("moved to the host above"),
        }
    }
    pub fn into_vec(self) -> Vec<T> {
        match self.data {
            Storage::Host(v) => Arc::try_unwrap(v).unwrap_or_else(|shared| (*shared).clone()),
            Storage::Device { .. } => self.data().to_vec(),
        }
    }
    /// The single value of a one-element tensor.
    pub fn item(&self) -> Result<T> {
        if self.numel() != 1 {
            crate::bail!(shape, "Tensor::item", "needs exactly one element, shape is {:?}", self.shape);
        }
        Ok(self.to_host()?.data()[0])
    }
    /// Elements converted to another float type.
    pub fn cast<U: Elem>(&self) -> Tensor<U> {
        Tensor::from_parts(self.data().iter().map(|&x| U::c(x.as_f64())).collect(), self.shape.clone())
    }

    /// Same elements, new shape with the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Self> {
        let n = numel("reshape", shape)?;
        if n != self.numel() {
            crate::bail!(shape, "reshape", "cannot reshape {:?} ({} elements) to {shape:?} ({n} elements)", self.shape, self.numel());
        }
        Ok(Tensor { shape: shape.to_vec(), data: self.data.clone() })
    }

    /// Axes reordered: output axis `i` is input axis `perm[i]`.
    pub fn permute(&self, perm: &[usize]) -> Result<Self> {
        let r = self.rank();
        let mut seen = vec![false; r];
        if perm.len() != r || perm.iter().any(|&p| p >= r || std::mem::replace(&mut seen[p], true)) {
            crate::bail!(arg, "permute", "{perm:?} is not a permutation of the {r} axes of {:?}", self.shape);
        }
        let in_strides = shape::strides(&self.shape);
        let out_shape: Vec<usize> = perm.iter().map(|&p| self.shape[p]).collect();
        let read: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
        Ok(Self::from_parts(gather_strided(self.data(), &out_shape, &read, 0), out_shape))
    }

    /// `len` entries of `axis` starting at `start` (a view copied out).
    pub fn narrow(&self, axis: usize, start: usize, len: usize) -> Result<Self> {
        shape::check_axis("narrow", axis, &self.shape)?;
        let dim = self.shape[axis];
        if start.checked_add(len).is_none_or(|end| end > dim) {
            crate::bail!(arg, "narrow", "range {start}..{} is outside axis {axis} of size {dim} (shape {:?})", start.saturating_add(len), self.shape);
        }
        let outer: usize = self.shape[..axis].iter().product();
        let inner: usize = self.shape[axis + 1..].iter().product();
        let mut out = Vec::with_capacity(outer * len * inner);
        for o in 0..outer {
            let base = (o * dim + start) * inner;
            out.extend_from_slice(&self.data()[base..base + len * inner]);
        }
        let mut s = self.shape.clone();
        s[axis] = len;
        Ok(Self::from_parts(out, s))
    }

    /// Tensors joined along `axis`; all other axes must agree.
    pub fn concat(parts: &[&Tensor<T>], axis: usize) -> Result<Self> {
        let first = parts.first().ok_or_else(|| Error::arg("concat", "needs at least one tensor"))?;
        shape::check_axis("concat", axis, &first.shape)?;
        for (i, p) in parts.iter().enumerate() {
            let same = p.rank() == first.rank() && p.shape.iter().zip(&first.shape).enumerate().all(|(a, (x, y))| a == axis || x == y);
            if !same {
                crate::bail!(shape, "concat", "tensor {i} has shape {:?}, which does not match {:?} outside axis {axis}", p.shape, first.shape);
            }
        }
        let outer: usize = first.shape[..axis].iter().product();
        let inner: usize = first.shape[axis + 1..].iter().product();
        let total: usize = parts.iter().map(|p| p.shape[axis]).sum();
        let mut s = first.shape.clone();
        s[axis] = total;
        numel("concat", &s)?;
        let mut out = Vec::with_capacity(outer * total * inner);
        for o in 0..outer {
            for p in parts {
                let run = p.shape[axis] * inner;
                out.extend_from_slice(&p.data()[o * run..(o + 1) * run]);
            }
        }
        Ok(Self::from_parts(out, s))
    }

    /// Splits along `axis` into pieces of the given sizes (which must add up to the axis).
    pub fn split(&self, axis: usize, sizes: &[usize]) -> Result<Vec<Self>> {
        shape::check_axis("split", axis, &self.shape)?;
        if sizes.iter().sum::<usize>() != self.shape[axis] {
            crate::bail!(arg, "split", "sizes {sizes:?} do not add up to axis {axis} of size {}", self.shape[axis]);
        }
        let mut start = 0;
        sizes
            .iter()
            .map(|&len| {
                let t = self.narrow(axis, start, len);
                start += len;
                t
            })
            .collect()
    }

    /// Constant padding: `pads[i] = (before, after)` for axis `i`; fewer pairs than axes pad
    /// the last axes (PyTorch's `F.pad` pads from the last axis backwards; here pairs are in
    /// axis order and right-aligned).
    pub fn pad(&self, pads: &[(usize, usize)], value: T) -> Result<Self> {
        if pads.len() > self.rank() {
            crate::bail!(arg, "pad", "{} padding pairs for a rank-{} tensor {:?}", pads.len(), self.rank(), self.shape);
        }
        let off = self.rank() - pads.len();
        let full: Vec<(usize, usize)> = (0..self.rank()).map(|i| if i < off { (0, 0) } else { pads[i - off] }).collect();
        let mut out_shape = Vec::with_capacity(self.rank());
        for (d, &(b, a)) in self.shape.iter().zip(&full) {
            out_shape.push(d.checked_add(b).and_then(|x| x.checked_add(a)).ok_or_else(|| Error::arg("pad", "padding overflows"))?);
        }
        let n = numel("pad", &out_shape)?;
        let mut out = vec![value; n];
        let out_strides = shape::strides(&out_shape);
        let offset: usize = full.iter().zip(&out_strides).map(|(&(b, _), s)| b * s).sum();
        scatter_strided(self.data(), &self.shape, &out_strides, offset, &mut out);
        Ok(Self::from_parts(out, out_shape))
    }

    /// Inverse of [`Tensor::pad`]: removes `pads[i] = (before, after)` from each axis.
    pub fn unpad(&self, pads: &[(usize, usize)]) -> Result<Self> {
        if pads.len() > self.rank() {
            crate::bail!(arg, "unpad", "{} pairs for a rank-{} tensor", pads.len(), self.rank());
        }
        let off = self.rank() - pads.len();
        let full: Vec<(usize, usize)> = (0..self.rank()).map(|i| if i < off { (0, 0) } else { pads[i - off] }).collect();
        let mut out_shape = Vec::with_capacity(self.rank());
        for (axis, (&d, &(b, a))) in self.shape.iter().zip(&full).enumerate() {
            if b.checked_add(a).is_none_or(|r| r > d) {
                crate::bail!(arg, "unpad", "cannot remove {b}+{a} from axis {axis} of size {d}");
            }
            out_shape.push(d - b - a);
        }
        if self.rank() == 0 {
            return Ok(self.clone());
        }
        if out_shape.contains(&0) {
            return Ok(Self::from_parts(Vec::new(), out_shape));
        }
        // One pass: each row of the last axis is a contiguous run of the source (a narrow
        // per axis copied the tensor once per padded axis, the last one in runs of a few values).
        let strides = shape::strides(&self.shape);
        let last = self.rank() - 1;
        let row = out_shape[last];
        let rows: usize = out_shape[..last].iter().product();
        let mut out = Vec::with_capacity(rows * row);
        let mut idx = vec![0usize; last];
        for _ in 0..rows {
            let at: usize = idx.iter().zip(&full).zip(&strides).map(|((&i, &(b, _)), &st)| (i + b) * st).sum::<usize>() + full[last].0;
            out.extend_from_slice(&self.data()[at..at + row]);
            for a in (0..last).rev() {
                idx[a] += 1;
                if idx[a] < out_shape[a] {
                    break;
                }
                idx[a] = 0;
            }
        }
        Ok(Self::from_parts(out, out_shape))
    }

    /// This tensor repeated along broadcast axes to `shape`.
    pub fn broadcast_to(&self, shape: &[usize]) -> Result<Self> {
        let target = shape::broadcast_shape("broadcast_to", &self.shape, shape)?;
        if target != shape {
            crate::bail!(shape, "broadcast_to", "{:?} does not broadcast to {shape:?}", self.shape);
        }
        numel("broadcast_to", shape)?;
        let st = shape::broadcast_strides(&self.shape, shape);
        Ok(Self::from_parts(gather_strided(self.data(), shape, &st, 0), shape.to_vec()))
    }
}

/// Reads `src` with the given per-axis strides into a new contiguous buffer of `shape`.
pub(crate) fn gather_strided<T: Copy>(src: &[T], shape: &[usize], strides: &[usize], offset: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(shape.iter().product());
    walk_strided(shape, strides, offset, |pos, len, st| match st {
        // Innermost axis as a tight loop: a run copied whole, a broadcast value repeated (a
        // push per value cost ~1 ns, most of a bias add's or a broadcast's time).
        1 => out.extend_from_slice(&src[pos..pos + len]),
        0 => out.resize(out.len() + len, src[pos]),
        _ => out.extend((0..len).map(|i| src[pos + i * st])),
    });
    out
}

/// Reads `src` with the given per-axis strides from `offset` into `out`, which holds `shape`'s
/// elements in row-major order: for a caller that owns the memory (a plan's permutation, a
/// piece of one per thread).
pub fn gather_strided_into<T: Copy>(src: &[T], shape: &[usize], strides: &[usize], offset: usize, out: &mut [T]) {
    assert_eq!(out.len(), shape.iter().product::<usize>(), "gather_strided_into: output length");
    let mut at = 0;
    walk_strided(shape, strides, offset, |pos, len, st| {
        let o = &mut out[at..at + len];
        match st {
            1 => o.copy_from_slice(&src[pos..pos + len]),
            0 => o.fill(src[pos]),
            _ => o.iter_mut().enumerate().for_each(|(i, o)| *o = src[pos + i * st]),
        }
        at += len;
    });
}

/// Walks `shape` in row-major order with the given per-axis strides from `offset`, calling
/// `run(position, length, stride)` for each run of the innermost axis.
fn walk_strided(shape: &[usize], strides: &[usize], offset: usize, mut run: impl FnMut(usize, usize, usize)) {
    if shape.contains(&0) {
        return;
    }
    let r = shape.len();
    if r == 0 {
        run(offset, 1, 1);
        return;
    }
    let mut idx = vec![0usize; r];
    let mut pos = offset;
    let last = r - 1;
    loop {
        run(pos, shape[last], strides[last]);
        // Carry into the outer axes.
        let mut a = last;
        loop {
            if a == 0 {
                return;
            }
            a -= 1;
            idx[a] += 1;
            pos += strides[a];
            if idx[a] < shape[a] {
                break;
            }
            pos -= strides[a] * shape[a];
            idx[a] = 0;
        }
    }
}

/// Writes contiguous `src` of `shape` into `dst` at the given strides and offset.
fn scatter_strided<T: Copy>(src: &[T], shape: &[usize], dst_strides: &[usize], offset: usize, dst: &mut [T]) {
    if src.is_empty() {
        return;
    }
    let r = shape.len();
    if r == 0 {
        dst[offset] = src[0];
        return;
    }
    let last = r - 1;
    let mut idx = vec![0usize; r];
    let mut pos = offset;
    let mut k = 0;
    loop {
        let (len, st) = (shape[last], dst_strides[last]);
        if st == 1 {
            // A whole row at once (padding's rows): element by element was 1 ns a value.
            dst[pos..pos + len].copy_from_slice(&src[k..k + len]);
            k += len;
        } else {
            for i in 0..len {
                dst[pos + i * st] = src[k];
                k += 1;
            }
        }
        let mut a = last;
        loop {
            if a == 0 {
                return;
            }
            a -= 1;
            idx[a] += 1;
            pos += dst_strides[a];
            if idx[a] < shape[a] {
                break;
            }
            pos -= dst_strides[a] * shape[a];
            idx[a] = 0;
        }
    }
}
