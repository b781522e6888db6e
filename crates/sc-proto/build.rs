//! Compiles proto/ with protox (pure Rust, no protoc) and generates tonic services into OUT_DIR.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        root.join("sc/master/v1/master.proto"),
        root.join("sc/broker/v1/broker.proto"),
        root.join("sc/metrics/v1/metrics.proto"),
    ];
    println!("cargo:rerun-if-changed={}", root.display());
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let fds = protox::compile(&files, [&root])?;
    tonic_prost_build::configure()
        // Payloads are shared between many deliveries: Bytes clones are a refcount bump.
        .bytes(".sc.broker.v1")
        .compile_fds(fds)?;
    Ok(())
}
