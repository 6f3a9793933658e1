//! The crate's error type. Every fallible call returns [`KernelError`];
//! nothing in this crate panics on bad input or a missing GPU.

use cudarc::driver::DriverError;

/// Errors from device discovery, kernel compilation and launches.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The CUDA driver or NVRTC library could not be loaded, or no GPU is
    /// visible. Callers treat this as "run on the CPU instead".
    #[error("no CUDA driver/GPU found: {0}")]
    NoDevice(String),

    /// A CUDA driver call failed.
    #[error("CUDA driver call failed during {context}: {source}")]
    Driver {
        context: &'static str,
        #[source]
        source: DriverError,
    },

    /// NVRTC rejected a kernel source. `log` is the compiler's own output.
    #[error("NVRTC could not compile {module}.cu for {arch} ({message}); options {options:?}; log:\n{log}")]
    Compile {
        module: &'static str,
        arch: String,
        message: String,
        options: Vec<String>,
        log: String,
    },

    /// A cuBLAS call failed (or the library could not be loaded).
    #[error("cuBLAS failed during {context}: {message}")]
    Blas {
        context: &'static str,
        message: String,
    },

    /// Operand shapes do not fit the operation.
    #[error("{op}: {detail}")]
    Shape { op: &'static str, detail: String },

    /// An argument is out of the range the operation supports.
    #[error("{op}: {detail}")]
    Invalid { op: &'static str, detail: String },
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, KernelError>;

impl KernelError {
    pub(crate) fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        Self::Shape {
            op,
            detail: detail.into(),
        }
    }

    pub(crate) fn invalid(op: &'static str, detail: impl Into<String>) -> Self {
        Self::Invalid {
            op,
            detail: detail.into(),
        }
    }
}

/// Attaches what was being done to a driver error.
pub(crate) trait DriverContext<T> {
    fn during(self, context: &'static str) -> Result<T>;
}

impl<T> DriverContext<T> for std::result::Result<T, DriverError> {
    fn during(self, context: &'static str) -> Result<T> {
        self.map_err(|source| KernelError::Driver { context, source })
    }
}
