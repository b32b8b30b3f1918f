//! The `nix-deploy` binary: everything lives in the library.

fn main() -> std::process::ExitCode {
    nix_deploy::cli::main()
}
