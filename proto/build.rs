//! Generates the twopc.v1 messages and services with prost/tonic (the protocol in
//! `twopc.proto`, the operator's `Admin` service in `admin.proto`: one package, one
//! descriptor set), plus the file descriptor set gRPC reflection serves; and, separately (its own descriptor set, so
//! the twopc.v1 one stays exactly the protocol), the `twopc.example.v1` example
//! application service. Uses the vendored `protoc` unless `PROTOC` is set, so a fresh
//! machine needs no system package to build.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("twopc_v1_descriptor.bin"))
        .compile_protos(&["twopc/v1/twopc.proto", "twopc/v1/admin.proto"], &["."])?;
    println!("cargo:rerun-if-changed=twopc/v1/twopc.proto");
    println!("cargo:rerun-if-changed=twopc/v1/admin.proto");
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("twopc_example_v1_descriptor.bin"))
        .compile_protos(&["twopc/example/v1/inventory.proto"], &["."])?;
    println!("cargo:rerun-if-changed=twopc/example/v1/inventory.proto");
    Ok(())
}
