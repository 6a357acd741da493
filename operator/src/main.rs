//! `shoal-operator`: runs the StorageCluster controller, prints the CRD,
//! or (as the peers' init container) writes a node's zone and rack.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "shoal-operator",
    version,
    about = "Shoal's Kubernetes operator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Reconcile StorageClusters until SIGTERM.
    Run,
    /// Print the StorageCluster CRD as YAML.
    Crd,
    /// Write this node's zone and rack (from its labels) to DIR/zone and
    /// DIR/rack, and the peer addresses of the other storage nodes to
    /// DIR/join; run by the storage peers' init container.
    NodeTopology {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Label selector of the storage nodes ("" for all).
        #[arg(long, default_value = "")]
        peers: String,
        /// The port peers listen on.
        #[arg(long)]
        port: u16,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", shoal_operator::crd_yaml());
            Ok(())
        }
        Command::Run => shoal_operator::reconcile::run(kube::Client::try_default().await?).await,
        Command::NodeTopology { out, peers, port } => {
            shoal_operator::reconcile::node_topology(
                kube::Client::try_default().await?,
                &out,
                &peers,
                port,
            )
            .await
        }
    }
}
