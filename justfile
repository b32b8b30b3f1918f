# nix-deploy: the operator interface. Each recipe is a thin call of the CLI.
# `./just RECIPE` installs `just` itself on a fresh machine.

set shell := ["bash", "-euo", "pipefail", "-c"]

bin := "target/release/nix-deploy"

# List the recipes.
default:
    @just --list

# Install the system packages the demo and tests need (nix-bin, openssh-server).
setup:
    sh scripts/setup.sh

# Build the release binary.
build:
    cargo build --release --bin nix-deploy

# Run the demo: a local fleet (p620, p510, razer, samsung) on loopback test hosts,
# deployed, changed, and deployed again.
demo: setup
    cargo build --release --bin nix-deploy --example demo
    target/release/examples/demo {{bin}}

# Run every test: unit tests and integration tests against real local test hosts.
test: setup
    cargo test --all-targets -- --test-threads 4

# Formatting and lints, as CI wants them.
lint:
    cargo fmt --check
    cargo clippy --all-targets -- -D warnings

# Deploy every changed host (smart strategy).
deploy-all *ARGS:
    {{bin}} deploy --all {{ARGS}}

# What a deployment would do; changes nothing.
plan *ARGS:
    {{bin}} plan {{ARGS}}

# Per host: running system, generation, last result.
deployment-status:
    {{bin}} status

# Past deployments.
deployment-history LIMIT="20":
    {{bin}} history --limit {{LIMIT}}

# One deployment in detail (default: the latest).
deployment-show *ID:
    {{bin}} show {{ID}}

# Benchmarks against real local test hosts (see BENCHMARKS.md).
bench: setup
    cargo build --release --bin nix-deploy
    cargo bench --bench fleet
