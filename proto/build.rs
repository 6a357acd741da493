fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Block contents travel as `Bytes`: decoded from a received buffer
        // without a copy, and sent from the caller's buffer without one.
        .bytes(".shoal.peer.v1.PutBlocks.blocks")
        .bytes(".shoal.peer.v1.BlockResult.data")
        .compile_protos(
            &[
                "proto/shoal/peer.proto",
                "proto/shoal/admin.proto",
                "proto/csi/v1/csi.proto",
                "proto/kubelet/pluginregistration.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
