//! Compiles proto/baton/v1/*.proto with protox (pure Rust): no protoc, no download.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=baton/v1/worker.proto");
    let fds = protox::compile(["baton/v1/worker.proto"], ["."])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
