//! bfloat16 autocast on the CPU for the SAM stage (`sam.bf16`).
//!
//! libtorch's autocast runs matrix products and convolutions in bfloat16 and keeps the rest in
//! float32, the parameters and their gradients included: PyTorch's
//! `torch.autocast("cpu", dtype=torch.bfloat16)`. tch 0.26 wraps it for CUDA only
//! (`tch::autocast`), so the CPU switch is bound here by its C++ symbols, from libtorch_cpu,
//! which this crate links (libtorch 2.13, pinned by build.rs). On a CPU with AVX512-BF16 the
//! LiteMedSAM encoder's forward and backward ran about 2.1× faster under it
//! (`scripts/probe_bf16_encoder.py`).
use tch::Device;

mod ffi {
    // c10::DeviceType and c10::ScalarType are `enum class : int8_t`; none of these throws.
    // libtorch's own functions: not part of sfr.h (cbindgen reads this annotation from the
    // doc comment, which rustdoc has no use for on an extern block).
    #[allow(unused_doc_comments)]
    /// cbindgen:ignore
    extern "C" {
        #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
        pub fn set_autocast_enabled(device_type: i8, enabled: bool);
        #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
        pub fn is_autocast_enabled(device_type: i8) -> bool;
        #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
        pub fn set_autocast_dtype(device_type: i8, dtype: i8);
        #[link_name = "_ZN2at8autocast17increment_nestingEv"]
        pub fn increment_nesting() -> i32;
        #[link_name = "_ZN2at8autocast17decrement_nestingEv"]
        pub fn decrement_nesting() -> i32;
        #[link_name = "_ZN2at8autocast11clear_cacheEv"]
        pub fn clear_cache();
    }
}

const CPU: i8 = 0; // c10::DeviceType::CPU
const BFLOAT16: i8 = 15; // c10::ScalarType::BFloat16

/// Whether this CPU computes bfloat16 products in hardware (AVX512-BF16). Without it
/// libtorch's bf16 kernels emulate and are no faster than float32, so `sfr demo` only picks
/// `sam.bf16` where this is true; a config that asks for it is obeyed anyway.
pub fn cpu_has_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Runs `f` with bfloat16 autocast on the CPU when `enabled` and `device` is the CPU (on
/// other devices `f` runs as is). The state is per thread and restored when `f` returns or
/// unwinds; leaving the outermost region clears autocast's cache of bf16 weight copies, which
/// would otherwise outlive an optimiser step. Tensors computed inside may be bfloat16: cast
/// what leaves the region (`to_kind(Kind::Float)`). Backward may run outside, as in PyTorch.
pub fn cpu_bf16<T>(enabled: bool, device: Device, f: impl FnOnce() -> T) -> T {
    if !enabled || device != Device::Cpu {
        return f();
    }
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            unsafe {
                ffi::set_autocast_enabled(CPU, self.0);
                if ffi::decrement_nesting() == 0 {
                    ffi::clear_cache();
                }
            }
        }
    }
    let _restore = unsafe {
        let was = ffi::is_autocast_enabled(CPU);
        ffi::increment_nesting();
        ffi::set_autocast_dtype(CPU, BFLOAT16);
        ffi::set_autocast_enabled(CPU, true);
        Restore(was)
    };
    f()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn matrix_products_run_in_bf16_inside_only() {
        let a = Tensor::randn([8, 16], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([16, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let exact = a.matmul(&w);
        let low = cpu_bf16(true, Device::Cpu, || {
            // Nested regions keep it on; leaving the inner one must not switch it off.
            cpu_bf16(true, Device::Cpu, || ());
            a.matmul(&w)
        });
        assert_eq!(low.kind(), Kind::BFloat16, "autocast is on inside");
        let rel = f64::try_from((low.to_kind(Kind::Float) - &exact).norm() / exact.norm()).unwrap();
        assert!(rel > 0.0 && rel < 0.02, "bf16 rounding, not another result: {rel}");
        assert_eq!(a.matmul(&w).kind(), Kind::Float, "and off again outside");
        assert_eq!(cpu_bf16(false, Device::Cpu, || a.matmul(&w)).kind(), Kind::Float, "disabled: float32");
        // Gradients reach the float32 parameter through the bf16 product.
        low.to_kind(Kind::Float).sum(Kind::Float).backward();
        assert_eq!(w.grad().kind(), Kind::Float);
        let want = a.sum_dim_intlist([0i64].as_slice(), false, Kind::Float).unsqueeze(1).expand([16, 4], false);
        assert!(f64::try_from((w.grad() - want).abs().max()).unwrap() < 0.1);
    }

    #[test]
    fn the_state_is_restored_when_the_region_unwinds() {
        let r = std::panic::catch_unwind(|| cpu_bf16(true, Device::Cpu, || panic!("inside")));
        assert!(r.is_err());
        let a = Tensor::ones([2, 2], (Kind::Float, Device::Cpu));
        assert_eq!(a.matmul(&a).kind(), Kind::Float);
    }
}
