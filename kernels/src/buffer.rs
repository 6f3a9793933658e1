//! Typed device matrices. A [`DeviceMatrix<T>`] is a row-major
//! `rows × cols` array of `T` in GPU memory, owned by one [`GpuDevice`].
//! Its element count always equals `rows · cols`.

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use half::f16;

use crate::device::GpuDevice;
use crate::error::{DriverContext, KernelError, Result};

/// Element types the kernels read or write.
pub trait Element: DeviceRepr + ValidAsZeroBits + Copy + Default + Unpin + 'static {
    /// A value no correct kernel output equals: NaN for floats, the all-ones
    /// pattern for integers. Tests fill outputs with it before a launch.
    const POISON: Self;
    /// The dtype's name in error messages.
    const NAME: &'static str;
}

impl Element for f16 {
    const POISON: Self = f16::NAN;
    const NAME: &'static str = "f16";
}
impl Element for f32 {
    const POISON: Self = f32::NAN;
    const NAME: &'static str = "f32";
}
impl Element for u32 {
    const POISON: Self = u32::MAX;
    const NAME: &'static str = "u32";
}
impl Element for u8 {
    const POISON: Self = u8::MAX;
    const NAME: &'static str = "u8";
}
impl Element for i32 {
    const POISON: Self = -1;
    const NAME: &'static str = "i32";
}

/// A row-major `rows × cols` matrix in device memory.
pub struct DeviceMatrix<T> {
    pub(crate) data: CudaSlice<T>,
    rows: usize,
    cols: usize,
}

impl<T> std::fmt::Debug for DeviceMatrix<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceMatrix[{}×{}]", self.rows, self.cols)
    }
}

impl<T: Element> DeviceMatrix<T> {
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether this matrix was allocated on `dev`'s stream.
    pub fn is_on(&self, dev: &GpuDevice) -> bool {
        std::sync::Arc::ptr_eq(self.data.stream(), dev.stream())
    }
    /// The underlying cudarc slice (for interop and benchmarks).
    pub fn slice(&self) -> &CudaSlice<T> {
        &self.data
    }
}

fn checked_len(op: &'static str, rows: usize, cols: usize) -> Result<usize> {
    rows.checked_mul(cols)
        .ok_or_else(|| KernelError::shape(op, format!("{rows}×{cols} overflows usize")))
}

impl GpuDevice {
    /// Copies `host` (row-major, `rows × cols` elements) to the device.
    pub fn upload<T: Element>(
        &self,
        host: &[T],
        rows: usize,
        cols: usize,
    ) -> Result<DeviceMatrix<T>> {
        let n = checked_len("upload", rows, cols)?;
        self.check_not_recording("upload")?;
        if host.len() != n {
            return Err(KernelError::shape(
                "upload",
                format!(
                    "{rows}×{cols} {} needs {n} elements, got {}",
                    T::NAME,
                    host.len()
                ),
            ));
        }
        let data = if n == 0 {
            self.stream().alloc_zeros::<T>(0)
        } else {
            self.stream().clone_htod(host)
        }
        .during("uploading a matrix")?;
        Ok(DeviceMatrix { data, rows, cols })
    }

    /// A `rows × cols` matrix of zeros.
    pub fn zeros<T: Element>(&self, rows: usize, cols: usize) -> Result<DeviceMatrix<T>> {
        let n = checked_len("zeros", rows, cols)?;
        let data = self
            .stream()
            .alloc_zeros::<T>(n)
            .during("allocating a matrix")?;
        Ok(DeviceMatrix { data, rows, cols })
    }

    /// A `rows × cols` matrix whose contents are unspecified (whatever the
    /// stream-ordered allocator hands out): for outputs that a kernel
    /// overwrites in full, without the cost of a memset.
    pub fn uninit<T: Element>(&self, rows: usize, cols: usize) -> Result<DeviceMatrix<T>> {
        let n = checked_len("uninit", rows, cols)?;
        let data = if n == 0 {
            self.stream().alloc_zeros::<T>(0)
        } else {
            // SAFETY: the memory is device memory that Rust never reads
            // directly; every `Element` type is valid for any bit pattern,
            // so a download before a kernel writes it yields garbage values,
            // not undefined behaviour.
            unsafe { self.stream().alloc::<T>(n) }
        }
        .during("allocating a matrix")?;
        Ok(DeviceMatrix { data, rows, cols })
    }

    /// Overwrites every element of `m` with `value` (e.g. [`Element::POISON`]).
    pub fn fill<T: Element>(&self, m: &mut DeviceMatrix<T>, value: T) -> Result<()> {
        if m.is_empty() {
            return Ok(());
        }
        self.check_not_recording("fill")?;
        let host = vec![value; m.len()];
        self.stream()
            .memcpy_htod(&host, &mut m.data)
            .during("filling a matrix")
    }

    /// Copies `src` into `dst`; the shapes must match.
    pub fn write<T: Element>(&self, dst: &mut DeviceMatrix<T>, src: &[T]) -> Result<()> {
        if src.len() != dst.len() {
            return Err(KernelError::shape(
                "write",
                format!("{:?} needs {} elements, got {}", dst, dst.len(), src.len()),
            ));
        }
        if src.is_empty() {
            return Ok(());
        }
        self.check_not_recording("write")?;
        self.stream()
            .memcpy_htod(src, &mut dst.data)
            .during("writing a matrix")
    }

    /// Copies `src` into `dst` on the device (stream-ordered, recordable
    /// into a graph); the shapes must match.
    pub fn copy<T: Element>(&self, dst: &mut DeviceMatrix<T>, src: &DeviceMatrix<T>) -> Result<()> {
        if src.rows() != dst.rows() || src.cols() != dst.cols() {
            return Err(KernelError::shape("copy", format!("{src:?} into {dst:?}")));
        }
        if !src.is_on(self) || !dst.is_on(self) {
            return Err(KernelError::invalid(
                "copy",
                "operands belong to another GpuDevice",
            ));
        }
        if src.is_empty() {
            return Ok(());
        }
        self.stream()
            .memcpy_dtod(&src.data, &mut dst.data)
            .during("copying a matrix")
    }

    /// Copies `m` back to the host (waits for the stream).
    pub fn download<T: Element>(&self, m: &DeviceMatrix<T>) -> Result<Vec<T>> {
        if m.is_empty() {
            return Ok(Vec::new());
        }
        self.check_not_recording("download")?;
        self.stream()
            .clone_dtoh(&m.data)
            .during("downloading a matrix")
    }
}
