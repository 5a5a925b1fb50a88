#![allow(clippy::disallowed_methods)] // build scripts read cargo's environment; that is their job.
//! Compiles every contract under `proto/` in pure Rust (protox), so no protoc is needed on the
//! machine, and writes the encoded descriptor set that server reflection serves.

use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = Path::new("proto");
    let mut files = Vec::new();
    collect_protos(proto_root, &mut files)?;
    files.sort();
    println!("cargo:rerun-if-changed={}", proto_root.display());
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let descriptors = protox::compile(&files, [proto_root])?;

    // compile_fds ignores file_descriptor_set_path, so the set reflection needs is written here.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let encoded = prost::Message::encode_to_vec(&descriptors);
    std::fs::write(out_dir.join("sagad_descriptor.bin"), encoded)?;

    tonic_prost_build::configure()
        // Maps are ordered so that a request encodes to the same bytes every time: the
        // idempotency fingerprint of a request is computed over its encoding.
        .btree_map(".")
        .compile_fds(descriptors)?;
    Ok(())
}

fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            out.push(path);
        }
    }
    Ok(())
}
