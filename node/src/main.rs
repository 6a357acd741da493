//! `shoal`: the storage peer, the local cluster and the admin CLI.

fn main() -> std::process::ExitCode {
    shoal_node::cli::main()
}
