//! `twopc-lab`: the demo, the order service, the benchmarks and the fault campaign
//! (see the `twopc-lab` crate). Built only with `--features lab`.

/// The same allocator as `twopc serve`, so the benchmarks measure what production runs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    twopc_lab::main()
}
