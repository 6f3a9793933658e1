//! Compiles every kernel source with NVRTC for the given architectures
//! (default sm_80 and sm_90) without needing a GPU: only libnvrtc and
//! `cuda_fp16.h` (pip's nvidia-cuda-nvrtc and nvidia-cuda-runtime wheels
//! will do; point LD_LIBRARY_PATH and LMQ_CUDA_INCLUDE at them). Catches
//! compile errors before a GPU session is spent on them.
//!
//! `cargo run --release -p lmq-kernels --example compile_kernels -- sm_90`

use lmq_kernels::nvrtc::{compile_parallel, cuda_include_dirs, Module};

fn main() {
    let mut archs: Vec<String> = std::env::args().skip(1).collect();
    if archs.is_empty() {
        archs = vec!["sm_80".into(), "sm_90".into()];
    }
    let includes = cuda_include_dirs();
    let mut failed = false;
    for arch in &archs {
        // As `GpuDevice::compile_all` does: every module on its own thread.
        let start = std::time::Instant::now();
        for (m, result) in compile_parallel(&Module::ALL, arch, &includes) {
            match result {
                Ok(cubin) => println!("{arch} {}: ok ({} bytes)", m.name(), cubin.len()),
                Err(e) => {
                    failed = true;
                    println!("{arch} {}: {e}", m.name());
                }
            }
        }
        println!("{arch}: {:.1} s", start.elapsed().as_secs_f64());
    }
    if failed {
        std::process::exit(1);
    }
}
