//! Run-time compilation of the kernel sources with NVRTC, to a cubin for the
//! device's own architecture, plus the search for the CUDA headers and an
//! optional on-disk cubin cache.
//!
//! Each source is `cu/common.cuh` followed by one `.cu` file; the only header
//! they include is `<cuda_fp16.h>`, found by [`cuda_include_dirs`].

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::{result, sys};

use crate::error::{KernelError, Result};

const COMMON: &str = include_str!("cu/common.cuh");

/// One kernel source file and the functions it defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Module {
    W4A16,
    Norm,
    Elementwise,
    ActF32,
    /// The KV write, the float attention kernel and the split merge.
    PagedAttn,
    /// The integer tile attention kernel.
    AttnInt,
    /// The streaming integer attention kernel.
    AttnStream,
    /// The prefill attention kernel.
    AttnPrefill,
    W4Dequant,
    Sampling,
    /// The 4-bit prefill GEMM on Hopper's wgmma (`sm_90a` only).
    W4Gemm,
}

impl Module {
    pub const ALL: [Module; 11] = [
        Module::W4A16,
        Module::Norm,
        Module::Elementwise,
        Module::ActF32,
        Module::PagedAttn,
        Module::AttnInt,
        Module::AttnStream,
        Module::AttnPrefill,
        Module::W4Dequant,
        Module::Sampling,
        Module::W4Gemm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Module::W4A16 => "w4a16",
            Module::Norm => "norm",
            Module::Elementwise => "elementwise",
            Module::ActF32 => "act_f32",
            Module::PagedAttn => "paged_attn",
            Module::AttnInt => "attn_int",
            Module::AttnStream => "attn_stream",
            Module::AttnPrefill => "attn_prefill",
            Module::W4Dequant => "w4_dequant",
            Module::Sampling => "sampling",
            Module::W4Gemm => "w4_gemm_sm90",
        }
    }

    /// The architecture NVRTC compiles this module for on a device of
    /// architecture `arch`: the wgmma GEMM needs the architecture-specific
    /// `sm_90a` on sm_90 (elsewhere it compiles to a trap and is never
    /// launched); every other module takes the device's own.
    pub fn arch_for(self, arch: &str) -> String {
        match (self, arch) {
            (Module::W4Gemm, "sm_90") => "sm_90a".to_string(),
            _ => arch.to_string(),
        }
    }

    fn body(self) -> &'static str {
        match self {
            Module::W4A16 => concat!(
                include_str!("cu/w4a16.cu"),
                include_str!("cu/w4a16_stream.cu")
            ),
            Module::Norm => include_str!("cu/norm.cu"),
            Module::Elementwise => include_str!("cu/elementwise.cu"),
            Module::ActF32 => include_str!("cu/act_f32.cu"),
            // The attention kernels share their sources by concern (the
            // layout, KV write and float kernel; the integer tile kernel and
            // its MMA helpers; the streaming kernel; the prefill kernel) but
            // are four modules, each instantiating only its own entry
            // points, so that `GpuDevice::compile_all` builds them in
            // parallel (they were one module that took most of a cold
            // start's compile time).
            Module::PagedAttn => concat!(
                include_str!("cu/paged_attn.cu"),
                include_str!("cu/paged_attn_entry.cu")
            ),
            Module::AttnInt => concat!(
                include_str!("cu/paged_attn.cu"),
                include_str!("cu/paged_attn_int.cu"),
                include_str!("cu/attn_int_entry.cu")
            ),
            Module::AttnStream => concat!(
                include_str!("cu/paged_attn.cu"),
                include_str!("cu/paged_attn_int.cu"),
                include_str!("cu/paged_attn_int2.cu"),
                include_str!("cu/attn_stream_entry.cu")
            ),
            Module::AttnPrefill => concat!(
                include_str!("cu/paged_attn.cu"),
                include_str!("cu/paged_attn_int.cu"),
                include_str!("cu/paged_attn_int2.cu"),
                include_str!("cu/paged_attn_prefill.cu"),
                include_str!("cu/attn_prefill_entry.cu")
            ),
            Module::W4Dequant => include_str!("cu/w4_dequant.cu"),
            Module::Sampling => include_str!("cu/sampling.cu"),
            Module::W4Gemm => concat!(
                include_str!("cu/w4_gemm_sm90.cu"),
                include_str!("cu/w4_gemm_ws.cu")
            ),
        }
    }

    /// The full text handed to NVRTC.
    pub fn source(self) -> String {
        format!("{COMMON}\n#line 1 \"{}.cu\"\n{}", self.name(), self.body())
    }
}

/// Folders that may hold `cuda_fp16.h`, in the order they are tried:
/// `LMQ_CUDA_INCLUDE`, `$CUDA_HOME/include`, `$CUDA_PATH/include`,
/// `/usr/local/cuda/include`, then pip's `nvidia/cu13/include` (and the
/// older `nvidia/cuda_runtime/include`) under the usual site-packages roots.
/// Only folders that really contain `cuda_fp16.h` are returned.
pub fn cuda_include_dirs() -> Vec<PathBuf> {
    let mut cands: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("LMQ_CUDA_INCLUDE") {
        cands.push(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(p) = std::env::var_os(var) {
            cands.push(Path::new(&p).join("include"));
        }
    }
    cands.push(PathBuf::from("/usr/local/cuda/include"));
    cands.push(PathBuf::from("/opt/cuda/include"));
    for root in python_site_roots() {
        cands.push(root.join("nvidia/cu13/include"));
        cands.push(root.join("nvidia/cuda_runtime/include"));
    }
    let mut out: Vec<PathBuf> = Vec::new();
    for c in cands {
        if c.join("cuda_fp16.h").is_file() && !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

/// site-packages / dist-packages folders of the Python installs we know of.
fn python_site_roots() -> Vec<PathBuf> {
    let mut libs: Vec<PathBuf> = vec![
        PathBuf::from("/usr/lib"),
        PathBuf::from("/usr/local/lib"),
        PathBuf::from("/opt/torch/.venv/lib"),
    ];
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        libs.insert(0, Path::new(&v).join("lib"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        libs.push(Path::new(&h).join(".local/lib"));
    }
    let mut roots = Vec::new();
    for lib in libs {
        let Ok(rd) = std::fs::read_dir(&lib) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            if name.to_string_lossy().starts_with("python3") {
                roots.push(e.path().join("site-packages"));
                roots.push(e.path().join("dist-packages"));
            }
        }
    }
    roots
}

/// NVRTC's version as (major, minor).
pub fn nvrtc_version() -> Option<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library was found by `GpuDevice::new`'s probe before any
    // caller gets here; the two out-pointers are valid for the call.
    let r = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    (r == sys::nvrtcResult::NVRTC_SUCCESS).then_some((major, minor))
}

/// Compiles `module` for `arch` (e.g. `sm_90`) and returns the cubin,
/// reading and writing the disk cache where one is enabled.
pub fn compile(module: Module, arch: &str, include_dirs: &[PathBuf]) -> Result<Vec<u8>> {
    let arch = &module.arch_for(arch);
    let src = module.source();
    let options = compile_options(arch, include_dirs);
    let cache = cache_path(module, arch, &src, &options);
    if let Some(p) = &cache {
        if let Ok(bytes) = std::fs::read(p) {
            if !bytes.is_empty() {
                return Ok(bytes);
            }
        }
    }
    let cubin = compile_uncached(module, arch, &src, &options)?;
    if let Some(p) = &cache {
        store(p, &cubin);
    }
    Ok(cubin)
}

/// [`compile`] for each of `modules`, one thread each: NVRTC's API is
/// thread-safe, so a cold start takes about the longest module's time
/// rather than the sum. Results come back in the order of `modules`.
pub fn compile_parallel(
    modules: &[Module],
    arch: &str,
    include_dirs: &[PathBuf],
) -> Vec<(Module, Result<Vec<u8>>)> {
    std::thread::scope(|s| {
        let jobs: Vec<_> = modules
            .iter()
            .map(|&m| (m, s.spawn(move || compile(m, arch, include_dirs))))
            .collect();
        jobs.into_iter()
            .map(|(m, job)| {
                let cubin = job.join().unwrap_or_else(|_| {
                    Err(KernelError::invalid(
                        "compile",
                        format!("the NVRTC thread for {} panicked", m.name()),
                    ))
                });
                (m, cubin)
            })
            .collect()
    })
}

fn compile_options(arch: &str, include_dirs: &[PathBuf]) -> Vec<String> {
    let mut options = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--device-as-default-execution-space".to_string(),
    ];
    for d in include_dirs {
        options.push(format!("--include-path={}", d.display()));
    }
    options
}

fn compile_uncached(module: Module, arch: &str, src: &str, options: &[String]) -> Result<Vec<u8>> {
    let fail = |message: String, log: String| KernelError::Compile {
        module: module.name(),
        arch: arch.to_string(),
        message,
        options: options.to_vec(),
        log,
    };
    let c_src = CString::new(src).map_err(|e| fail(e.to_string(), String::new()))?;
    let c_name = CString::new(format!("{}.cu", module.name()))
        .map_err(|e| fail(e.to_string(), String::new()))?;
    let prog = result::create_program(&c_src, Some(&c_name))
        .map_err(|e| fail(e.to_string(), String::new()))?;
    // SAFETY: `prog` was just created and is destroyed exactly once below;
    // the option strings outlive the call.
    let compiled = unsafe { result::compile_program(prog, options) };
    // SAFETY: `prog` is a live program; the log buffer is NUL-terminated by NVRTC.
    let log = unsafe { result::get_program_log(prog) }
        .map(|raw| {
            // SAFETY: `raw` is a NUL-terminated C string written by NVRTC.
            unsafe { CStr::from_ptr(raw.as_ptr()) }
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    let out = match compiled {
        Err(e) => Err(fail(e.to_string(), log)),
        Ok(()) => cubin_of(prog).map_err(|m| fail(m, log)),
    };
    // SAFETY: `prog` is live and not used after this call.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

fn cubin_of(prog: sys::nvrtcProgram) -> std::result::Result<Vec<u8>, String> {
    let mut size = 0usize;
    // SAFETY: `prog` compiled successfully; `size` is a valid out-pointer.
    let r = unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
        return Err(format!("nvrtcGetCUBINSize failed: {r:?} (size {size})"));
    }
    let mut buf = vec![0u8; size];
    // SAFETY: `buf` holds exactly the `size` bytes NVRTC asked for.
    let r = unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast()) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcGetCUBIN failed: {r:?}"));
    }
    Ok(buf)
}

/// The cache file for this source, arch, option list and NVRTC version, or
/// `None` when caching is off. The cache lives in `LMQ_KERNEL_CACHE` (set it
/// to an empty string to disable) or `~/.cache/lmq/kernels`.
fn cache_path(module: Module, arch: &str, src: &str, options: &[String]) -> Option<PathBuf> {
    let dir = match std::env::var_os("LMQ_KERNEL_CACHE") {
        Some(d) if d.is_empty() => return None,
        Some(d) => PathBuf::from(d),
        None => Path::new(&std::env::var_os("HOME")?).join(".cache/lmq/kernels"),
    };
    let mut h = Fnv64::new();
    h.write(src.as_bytes());
    for o in options {
        h.write(o.as_bytes());
        h.write(&[0]);
    }
    let (major, minor) = nvrtc_version().unwrap_or((0, 0));
    h.write(format!("nvrtc {major}.{minor}").as_bytes());
    Some(dir.join(format!("{}-{arch}-{:016x}.cubin", module.name(), h.0)))
}

/// Writes through a temporary file and a rename, so readers never see half a
/// cubin. Failures only cost a recompile next time, so they are ignored.
fn store(path: &Path, bytes: &[u8]) {
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, bytes).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// Removes a cache entry that failed to load, so the next call recompiles.
pub(crate) fn evict(module: Module, arch: &str, include_dirs: &[PathBuf]) {
    let arch = &module.arch_for(arch);
    let src = module.source();
    let options = compile_options(arch, include_dirs);
    if let Some(p) = cache_path(module, arch, &src, &options) {
        let _ = std::fs::remove_file(p);
    }
}

/// FNV-1a, 64 bit: a stable hash for cache keys (not for security).
struct Fnv64(u64);

impl Fnv64 {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}
