fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(
            &[
                "proto/shoal/peer.proto",
                "proto/shoal/admin.proto",
                "proto/csi/v1/csi.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
