fn main() {
    // Lets `#[cfg(bpf_target_arch = ...)]` inside aya-ebpf resolve.
    aya_build::emit_bpf_target_arch_cfg().expect("emitting bpf_target_arch cfg");
}
