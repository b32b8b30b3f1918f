# nix-deploy: the operator interface. Each recipe is a thin call of the CLI,
# and every argument you give reaches it as one argument, whatever spaces,
# quotes or `$(...)` it holds: recipes read positional arguments ("$1",
# "$@"), never paste them into the shell.
#
# Which nix-deploy: inside this checkout, the one built here
# (target/release/nix-deploy, `just build`); copied into your fleet's
# repository, `nix-deploy` from PATH. NIX_DEPLOY_BIN overrides both.
# `./just RECIPE` installs `just` itself on a fresh machine.
#
# The CLI works in-process, or through the daemon when NIX_DEPLOY_SERVER (and
# NIX_DEPLOY_TOKEN_FILE) are set. NIX_DEPLOY_FLAKE picks the flake (default .).

set shell := ["bash", "-euo", "pipefail", "-c"]
set positional-arguments

checkout := path_exists(justfile_directory() / "crates/testkit/src/nixos.rs")
export NIX_DEPLOY_BIN := env_var_or_default("NIX_DEPLOY_BIN", if checkout == "true" { justfile_directory() / "target/release/nix-deploy" } else { "nix-deploy" })

# List the recipes.
default:
    @just --justfile "{{justfile()}}" --list

# Make this machine ready for the demo and tests: Debian packages (nix-bin,
# openssh, sudo), /nix. Idempotent; says what it changed. (This checkout only.)
setup:
    sh scripts/setup.sh

# Build the release binary. (This checkout only.)
build:
    cargo build --release --bin nix-deploy

# Run the demo: a local fleet (p620, p510, razer, samsung) on loopback test hosts,
# deployed, changed, and deployed again. (This checkout only.)
demo: setup
    cargo build --release --bin nix-deploy --example demo
    target/release/examples/demo "$NIX_DEPLOY_BIN"

# Run every test: unit tests and integration tests against real local test
# hosts. (This checkout only.)
test: setup
    cargo build --workspace --examples --benches
    cargo test --workspace --lib --bins --tests -- --test-threads 4

# Formatting and lints, as CI wants them. (This checkout only.)
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings

# The randomized fault campaign for DURATION (default 30m, e.g. `just chaos 10m`):
# campaigns of NIX_DEPLOY_CHAOS_STEPS operations (default 40) with new seeds
# until the time is spent; prints steps, invariants checked, seeds and every
# violation with the operations that led to it. NIX_DEPLOY_CHAOS_SEED=N
# replays one campaign. (This checkout only.)
[positional-arguments]
chaos DURATION="30m": setup
    NIX_DEPLOY_CHAOS_DURATION="$1" NIX_DEPLOY_CHAOS_STEPS="${NIX_DEPLOY_CHAOS_STEPS:-40}" \
        cargo test --test chaos -- --nocapture --test-threads 1

# Benchmarks against real local test hosts (see BENCHMARKS.md). (This checkout only.)
bench: setup
    cargo build --release --bin nix-deploy
    cargo bench --bench fleet

# Check this machine, the flake and every host (reachable, sudo, copies),
# each problem with its fix.
doctor *ARGS:
    "$NIX_DEPLOY_BIN" doctor "$@"

# colmena's apply: `just apply boot --on @web`, `just apply push -p 8`.
apply *ARGS:
    "$NIX_DEPLOY_BIN" apply "$@"

# Intelligent multi-host deployment: every changed host, smart strategy.
deploy-all *ARGS:
    "$NIX_DEPLOY_BIN" deploy --all "$@"

# Every changed host at once (up to the parallel limit).
deploy-all-parallel *ARGS:
    "$NIX_DEPLOY_BIN" deploy --all --strategy parallel "$@"

# One host, only if it changed.
quick-deploy HOST *ARGS:
    "$NIX_DEPLOY_BIN" deploy "$@"

# Plan (with change summaries), then deploy every changed host.
quick-all *ARGS:
    "$NIX_DEPLOY_BIN" plan --all
    "$NIX_DEPLOY_BIN" deploy --all "$@"

# Emergency: deploy one host skipping pre-flight and health checks (it must
# still run the new system afterwards).
emergency-deploy HOST *ARGS:
    "$NIX_DEPLOY_BIN" deploy "$1" --force --skip-validation "${@:2}"

# Run one command on many hosts at once, one summary table; exit 1 when a
# host failed or did not answer. SELECTOR as for --on: a host, a glob
# ('web-*'; '*' is every host), @tag, @tag-glob, or a comma list of them.
# The command's words pass through unchanged (no shell unless you ask):
#   just fleet-exec 'web-*' systemctl is-active nginx
#   just fleet-exec '@db,mon' sh -c 'df -h / | tail -n 1'
fleet-exec SELECTOR +COMMAND:
    "$NIX_DEPLOY_BIN" exec --on "$1" -- "${@:2}"

# Upload the selected hosts' deployment.keys again, without deploying.
upload-keys *ARGS:
    "$NIX_DEPLOY_BIN" upload-keys "$@"

# What a deployment would do; changes nothing.
plan *ARGS:
    "$NIX_DEPLOY_BIN" plan "$@"

# Per host: running system, generation, last result.
deployment-status:
    "$NIX_DEPLOY_BIN" status

# Past deployments.
deployment-history LIMIT="20":
    "$NIX_DEPLOY_BIN" history --limit "$1"

# Stop the running deployment (running hosts finish or roll back).
deployment-cancel *ID:
    "$NIX_DEPLOY_BIN" cancel "$@"

# Continue a cancelled, failed or interrupted deployment.
deployment-resume *ID:
    "$NIX_DEPLOY_BIN" resume "$@"

# One deployment in detail (default: the latest).
deployment-report *ID:
    "$NIX_DEPLOY_BIN" show "$@"

# Probe one host and run its health checks now.
health-check HOST:
    "$NIX_DEPLOY_BIN" health "$1"

# Roll a host back to its previous generation (or --to-generation N), verify
# it, and record it in history. This changes the host.
rollback HOST *ARGS:
    "$NIX_DEPLOY_BIN" rollback "$@"

# Run the daemon with a config file.
serve CONFIG="/etc/nix-deploy/config.toml":
    "$NIX_DEPLOY_BIN" serve --config "$1"
