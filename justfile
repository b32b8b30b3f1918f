# nix-deploy: the operator interface. Each recipe is a thin call of the CLI.
# `./just RECIPE` installs `just` itself on a fresh machine.
#
# The CLI works in-process, or through the daemon when NIX_DEPLOY_SERVER (and
# NIX_DEPLOY_TOKEN_FILE) are set. NIX_DEPLOY_FLAKE picks the flake (default .).

set shell := ["bash", "-euo", "pipefail", "-c"]

bin := env_var_or_default("NIX_DEPLOY_BIN", "target/release/nix-deploy")

# List the recipes.
default:
    @just --list

# Make this machine ready for the demo and tests: Debian packages (nix-bin,
# openssh, sudo), /nix. Idempotent; says what it changed.
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
    cargo build --workspace --examples --benches
    cargo test --workspace --lib --bins --tests -- --test-threads 4

# Formatting and lints, as CI wants them.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings

# The randomized fault campaign for DURATION (default 30m, e.g. `just chaos 10m`):
# campaigns of NIX_DEPLOY_CHAOS_STEPS operations (default 40) with new seeds
# until the time is spent; prints steps, invariants checked, seeds and every
# violation with the operations that led to it. NIX_DEPLOY_CHAOS_SEED=N
# replays one campaign.
chaos DURATION="30m": setup
    NIX_DEPLOY_CHAOS_DURATION={{DURATION}} NIX_DEPLOY_CHAOS_STEPS="${NIX_DEPLOY_CHAOS_STEPS:-40}" \
        cargo test --test chaos -- --nocapture --test-threads 1

# Benchmarks against real local test hosts (see BENCHMARKS.md).
bench: setup
    cargo build --release --bin nix-deploy
    cargo bench --bench fleet

# Intelligent multi-host deployment: every changed host, smart strategy.
deploy-all *ARGS:
    {{bin}} deploy --all {{ARGS}}

# Every changed host at once (up to the parallel limit).
deploy-all-parallel *ARGS:
    {{bin}} deploy --all --strategy parallel {{ARGS}}

# One host, only if it changed.
quick-deploy HOST *ARGS:
    {{bin}} deploy {{HOST}} {{ARGS}}

# Plan (with change summaries), then deploy every changed host.
quick-all *ARGS:
    {{bin}} plan --all
    {{bin}} deploy --all {{ARGS}}

# Emergency: deploy one host skipping pre-flight and health checks (it must
# still run the new system afterwards).
emergency-deploy HOST *ARGS:
    {{bin}} deploy {{HOST}} --force --skip-validation {{ARGS}}

# Run one command on many hosts at once, one summary table; exit 1 when a
# host failed or did not answer. SELECTOR as for --on: a host, a glob
# ('web-*'; '*' is every host), @tag, @tag-glob, or a comma list of them.
# The command's words pass through unchanged (no shell unless you ask):
#   just fleet-exec 'web-*' systemctl is-active nginx
#   just fleet-exec '@db,mon' sh -c 'df -h / | tail -n 1'
[positional-arguments]
fleet-exec SELECTOR +COMMAND:
    {{bin}} exec --on "$1" -- "${@:2}"

# Upload the selected hosts' deployment.keys again, without deploying.
[positional-arguments]
upload-keys *ARGS:
    {{bin}} upload-keys "$@"

# What a deployment would do; changes nothing.
plan *ARGS:
    {{bin}} plan {{ARGS}}

# Per host: running system, generation, last result.
deployment-status:
    {{bin}} status

# Past deployments.
deployment-history LIMIT="20":
    {{bin}} history --limit {{LIMIT}}

# Stop the running deployment (running hosts finish or roll back).
deployment-cancel *ID:
    {{bin}} cancel {{ID}}

# Continue a cancelled, failed or interrupted deployment.
deployment-resume *ID:
    {{bin}} resume {{ID}}

# One deployment in detail (default: the latest).
deployment-report *ID:
    {{bin}} show {{ID}}

# Probe one host and run its health checks now.
health-check HOST:
    {{bin}} health {{HOST}}

# Roll a host back to its previous generation (recorded in history).
test-rollback HOST *ARGS:
    {{bin}} rollback {{HOST}} {{ARGS}}

# Run the daemon with a config file.
serve CONFIG="/etc/nix-deploy/config.toml":
    {{bin}} serve --config {{CONFIG}}
