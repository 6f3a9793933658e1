//! [`GpuDevice`]: one CUDA context, one stream, and the kernels compiled for
//! that GPU. Creating one never panics: a missing driver, NVRTC or GPU is a
//! [`KernelError::NoDevice`].

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use crate::error::{DriverContext, KernelError, Result};
use crate::nvrtc::{self, Module};

/// One GPU: its context, the single stream every op of this object runs on,
/// and the modules compiled for its architecture (each at most once).
///
/// Buffers belong to the device object (its stream) that made them; every
/// op checks this, so two `GpuDevice`s on one GPU never share a buffer.
/// Creating one turns off cudarc's cross-stream event tracking in the
/// context (see the SAFETY note in [`GpuDevice::new`]).
///
/// Ops are stream-ordered: results are ready for the host after
/// [`GpuDevice::synchronize`] or any download.
pub struct GpuDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    compute_capability: (i32, i32),
    num_sms: u32,
    l2_bytes: usize,
    include_dirs: Vec<PathBuf>,
    modules: Mutex<HashMap<Module, Arc<CudaModule>>>,
    /// Set while the stream is recorded into a graph (see `graph.rs`).
    pub(crate) recording: AtomicBool,
    /// Programmatic edges spliced into recordings so far (`graph_pdl.rs`).
    pub(crate) pdl_splices: AtomicUsize,
}

impl std::fmt::Debug for GpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuDevice")
            .field("name", &self.name)
            .field("arch", &self.arch())
            .field("num_sms", &self.num_sms)
            .finish()
    }
}

/// Checks that libcuda and libnvrtc can be loaded, without letting cudarc
/// panic (it panics from its lazy loaders when a library is absent).
fn probe_libraries() -> std::result::Result<(), String> {
    let found = catch_unwind(|| {
        // SAFETY: these only try `dlopen` on cudarc's candidate names and
        // drop the handles again; no symbol is called.
        unsafe {
            (
                cudarc::driver::sys::is_culib_present(),
                cudarc::nvrtc::sys::is_culib_present(),
            )
        }
    });
    match found {
        Ok((true, true)) => Ok(()),
        Ok((false, _)) => Err("libcuda.so (the NVIDIA driver) could not be loaded".into()),
        Ok((true, false)) => Err(
            "libnvrtc.so could not be loaded; install the CUDA toolkit or pip's nvidia-cuda-nvrtc \
             and add its lib folder to LD_LIBRARY_PATH"
                .into(),
        ),
        Err(_) => Err("probing the CUDA libraries panicked".into()),
    }
}

/// Runs a cudarc call that may panic inside its dynamic loader (a missing
/// symbol in an old driver), turning the panic into `NoDevice`.
pub(crate) fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        KernelError::NoDevice(format!("{what}: {msg}"))
    })
}

/// Buffers come from the driver's stream-ordered pool (`cuMemAllocAsync`).
/// By default the pool hands freed memory back to the OS at every
/// synchronization, so a decode loop would pay for fresh allocations each
/// step; keeping it makes per-step buffers a pool hit. Best effort: on
/// failure the pool keeps its default.
fn keep_pool_memory(ctx: &CudaContext) {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold: u64 = u64::MAX;
    // SAFETY: `pool` is a valid out-pointer for the device's default pool;
    // the attribute value is a u64 as CU_MEMPOOL_ATTR_RELEASE_THRESHOLD
    // requires, and lives across the call.
    unsafe {
        if sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) == sys::CUresult::CUDA_SUCCESS
            && !pool.is_null()
        {
            let _ = sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            );
        }
    }
}

/// The largest fetch from DRAM into L2, in bytes, unless `LMQ_L2_FETCH`
/// names another. On an H100 (docs/BENCHMARKS.md, session 15) 128 bytes
/// instead of the driver's 64 took the Llama-2-7B decode layer from
/// 45.14–45.20 to 44.84–44.95 µs (79.9% of copy) and the 7B-shaped engine
/// from 352.4–353.3 to 354.3–355.0 decode and 32.6k to 33.3–33.6k prefill
/// tok/s: the 4-bit kernels read long runs of bytes, which larger fetches
/// serve in fewer DRAM requests.
const L2_FETCH_BYTES: usize = 128;

/// `LMQ_L2_FETCH` (32, 64 or 128 bytes; `driver` keeps the driver's
/// setting), else [`L2_FETCH_BYTES`], set on the context, which must be
/// current. The limit is a hint: a driver that refuses it keeps its own,
/// and nothing else changes.
fn set_l2_fetch_granularity() -> Result<()> {
    use cudarc::driver::sys;
    let bytes = match std::env::var("LMQ_L2_FETCH").as_deref().map(str::trim) {
        Err(_) => L2_FETCH_BYTES,
        Ok("driver") => return Ok(()),
        Ok(v) => match v.parse::<usize>() {
            Ok(b @ (32 | 64 | 128)) => b,
            _ => {
                return Err(KernelError::invalid(
                    "opening the GPU",
                    format!("LMQ_L2_FETCH must be 32, 64, 128 or driver, got {v:?}"),
                ))
            }
        },
    };
    // SAFETY: the caller made the context current on this thread; the
    // limit takes a byte count the driver documents (0 to 128).
    let _ = unsafe { sys::cuCtxSetLimit(sys::CUlimit::CU_LIMIT_MAX_L2_FETCH_GRANULARITY, bytes) };
    Ok(())
}

impl GpuDevice {
    /// Whether a CUDA GPU can be opened at all. Cheap after the first call.
    pub fn is_available() -> bool {
        Self::device_count().map(|n| n > 0).unwrap_or(false)
    }

    /// The number of CUDA devices, or `NoDevice` when the driver is absent.
    pub fn device_count() -> Result<usize> {
        probe_libraries().map_err(KernelError::NoDevice)?;
        let n = no_panic("cuDeviceGetCount", CudaContext::device_count)?
            .map_err(|e| KernelError::NoDevice(format!("the driver reports {e}")))?;
        Ok(n.max(0) as usize)
    }

    /// Opens GPU `ordinal` (its primary context) and a stream on it.
    /// Kernels are compiled lazily, on first use; see [`GpuDevice::compile_all`].
    pub fn new(ordinal: usize) -> Result<Self> {
        let count = Self::device_count()?;
        if ordinal >= count {
            return Err(KernelError::NoDevice(format!(
                "GPU {ordinal} was asked for but the driver sees {count} device(s)"
            )));
        }
        let ctx = no_panic("cuCtx", || CudaContext::new(ordinal))?.map_err(|e| {
            KernelError::NoDevice(format!("creating a context on GPU {ordinal}: {e}"))
        })?;
        let name = no_panic("cuDeviceGetName", || ctx.name())?.during("reading the device name")?;
        let compute_capability = no_panic("cuDeviceGetAttribute", || ctx.compute_capability())?
            .during("reading the compute capability")?;
        let num_sms = no_panic("cuDeviceGetAttribute", || {
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        })?
        .during("reading the multiprocessor count")?;
        let l2_bytes = no_panic("cuDeviceGetAttribute", || {
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
        })?
        .during("reading the L2 cache size")?;
        // SAFETY: this turns off cudarc's cross-stream event tracking for
        // buffers created from now on in this (primary) context. That is
        // sound here because every op of this crate checks that all of its
        // buffers were allocated on the stream it launches on, so no buffer
        // is shared between streams through this crate. Without it each
        // launch would record an event per argument.
        unsafe { ctx.disable_event_tracking() };
        // An explicit stream rather than the legacy default one, so that the
        // work on it can be captured into a CUDA graph.
        let stream = ctx.new_stream().during("creating a stream")?;
        keep_pool_memory(&ctx);
        ctx.bind_to_thread().during("binding the context")?;
        set_l2_fetch_granularity()?;
        Ok(Self {
            ctx,
            stream,
            name,
            compute_capability,
            num_sms: num_sms.max(1) as u32,
            l2_bytes: l2_bytes.max(0) as usize,
            include_dirs: nvrtc::cuda_include_dirs(),
            modules: Mutex::new(HashMap::new()),
            recording: AtomicBool::new(false),
            pdl_splices: AtomicUsize::new(0),
        })
    }

    /// The device's name as the driver reports it, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> &str {
        &self.name
    }

    /// (major, minor) compute capability.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// The NVRTC target, `sm_XY`, that kernels are compiled for.
    pub fn arch(&self) -> String {
        let (major, minor) = self.compute_capability;
        format!("sm_{major}{minor}")
    }

    /// Streaming multiprocessors on the device.
    pub fn num_sms(&self) -> u32 {
        self.num_sms
    }

    /// Bytes of L2 cache on the device.
    pub fn l2_bytes(&self) -> usize {
        self.l2_bytes
    }

    /// The folders holding `cuda_fp16.h` that NVRTC is given.
    pub fn include_dirs(&self) -> &[PathBuf] {
        &self.include_dirs
    }

    /// The stream every op of this device runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// (free, total) device memory in bytes, as the driver reports it.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.ctx.bind_to_thread().during("binding the context")?;
        cudarc::driver::result::mem_get_info().during("reading free memory")
    }

    /// Waits for all work queued on this device's stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().during("synchronizing the stream")
    }

    /// Compiles and loads every kernel module now (otherwise each is built on
    /// first use). Useful to surface NVRTC errors early.
    /// The W4A16 kernel needs sm_80+ and is skipped below that.
    pub fn compile_all(&self) -> Result<()> {
        let arch = self.arch();
        let wanted: Vec<Module> = {
            let cache = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            Module::ALL
                .into_iter()
                .filter(|&m| m != Module::W4A16 || self.supports_w4a16())
                // The wgmma GEMM only runs on sm_90 (elsewhere it is a
                // trap), and is built on first use even there.
                .filter(|&m| m != Module::W4Gemm)
                .filter(|m| !cache.contains_key(m))
                .collect()
        };
        // Compiled in parallel; loaded on this thread.
        for (m, cubin) in nvrtc::compile_parallel(&wanted, &arch, &self.include_dirs) {
            self.install(m, cubin?)?;
        }
        Ok(())
    }

    /// Whether the W4A16 kernel can run here (tensor-core mma.m16n8k16 and
    /// cp.async need compute capability 8.0 or newer).
    pub fn supports_w4a16(&self) -> bool {
        self.compute_capability >= (8, 0)
    }

    fn module(&self, m: Module) -> Result<Arc<CudaModule>> {
        // A poisoned lock only means another thread panicked while holding
        // it; the map itself is always in a consistent state.
        if let Some(module) = self
            .modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&m)
        {
            return Ok(module.clone());
        }
        let cubin = nvrtc::compile(m, &self.arch(), &self.include_dirs)?;
        self.install(m, cubin)
    }

    /// Loads `cubin` (module `m`, compiled or read from the disk cache) into
    /// the context and keeps it; a cubin the driver rejects (a stale or
    /// corrupt cache entry) is dropped from the cache and built afresh.
    fn install(&self, m: Module, cubin: Vec<u8>) -> Result<Arc<CudaModule>> {
        let mut cache = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(module) = cache.get(&m) {
            return Ok(module.clone());
        }
        let arch = self.arch();
        let module = match self.ctx.load_module(Ptx::from_binary(cubin)) {
            Ok(module) => module,
            Err(_) => {
                // A stale or corrupt cache entry: drop it and build afresh.
                nvrtc::evict(m, &arch, &self.include_dirs);
                let cubin = nvrtc::compile(m, &arch, &self.include_dirs)?;
                self.ctx
                    .load_module(Ptx::from_binary(cubin))
                    .during("loading a compiled kernel module")?
            }
        };
        cache.insert(m, module.clone());
        Ok(module)
    }

    /// The kernel `name` of module `m`.
    pub(crate) fn function(&self, m: Module, name: &str) -> Result<CudaFunction> {
        self.module(m)?
            .load_function(name)
            .during("looking up a kernel function")
    }
}
