//! `nix-deploy eval`: colmena's `eval`. A Nix expression, given with `-E` or
//! in a file, called with `{ nodes, pkgs, lib }` (see
//! [`nix_deploy_core::introspect`]; `nodes` are the hosts of the fleet's
//! source, `--source` or detected), printed as JSON. Touches no host and
//! records nothing.

use std::path::PathBuf;

use clap::Args;

use super::{Cli, EXIT_OK};
use crate::engine::EngineError;

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// The expression, e.g. `{ nodes, ... }: nodes.web1.config.networking.hostName`.
    #[arg(
        short = 'E',
        long = "expr",
        value_name = "EXPR",
        conflicts_with = "file"
    )]
    pub expression: Option<String>,
    /// A file holding the expression (read as text: paths inside it need
    /// `--impure`, as the flake's evaluation is pure).
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
}

impl EvalArgs {
    /// The expression's text.
    fn expression(&self) -> Result<String, EngineError> {
        match (&self.expression, &self.file) {
            (Some(expression), None) => Ok(expression.clone()),
            (None, Some(file)) => std::fs::read_to_string(file).map_err(|e| {
                EngineError::BadOption(format!("eval: reading {}: {e}", file.display()))
            }),
            _ => Err(EngineError::BadOption(
                "eval needs an expression: `-E '{ nodes, ... }: builtins.attrNames nodes'` or a FILE"
                    .into(),
            )),
        }
    }
}

/// Evaluate and print the JSON (as one line from Nix; pretty with `--json`
/// is the same document).
pub async fn run(cli: &Cli, args: &EvalArgs) -> anyhow::Result<u8> {
    let expression = args.expression()?;
    let nix = super::nix(cli).await?;
    let flake = cli.flake();
    // `nodes` are the hosts of the fleet's source: detected, or --source.
    let source = nix
        .fleet_source(&flake, cli.source)
        .await
        .map_err(EngineError::Eval)?;
    let json = nix
        .eval_expression(&flake, source, &expression)
        .await
        .map_err(EngineError::Eval)?;
    println!("{json}");
    Ok(EXIT_OK)
}
