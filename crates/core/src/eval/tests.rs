//! Unit tests of [`super`].

use super::*;

fn argv(cmd: &Cmd) -> Vec<String> {
    std::iter::once(cmd.program().to_string())
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect()
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn shard_commands_name_their_hosts_quoted_and_need_nothing_newer_than_2_8() {
    let cmd = shard_command(
        "path:/srv/f?narHash=x",
        FleetSource::Nixos,
        &[("web1".into(), true), ("we\"b${x}".into(), false)],
        true,
    );
    let args = argv(&cmd);
    assert_eq!(
        args[..6],
        [
            "nix",
            "--extra-experimental-features",
            "nix-command flakes",
            "eval",
            "--json",
            "path:/srv/f?narHash=x#nixosConfigurations"
        ]
    );
    assert_eq!(args[6], "--apply");
    let expr = &args[7];
    assert!(
        expr.contains(r#"wanted = { "web1" = true; "we\"b\${x}" = false; };"#),
        "{expr}"
    );
    assert!(!args.iter().any(|a| a == "--print-out-paths"));
    let colmena = shard_command(".", FleetSource::Colmena, &[], false);
    assert_eq!(argv(&colmena)[5], ".#colmenaHive");
    assert_eq!(
        argv(&shard_command(".", FleetSource::DeployRs, &[], false))[5],
        ".#deploy"
    );
    // The fleet's index reads the flake pinned, or impurely when it cannot be.
    let pinned = argv(&fleet_command("path:/nix/store/x-source?narHash=y", true));
    assert_eq!(pinned[3..6], ["eval", "--json", "--expr"]);
    assert!(
        pinned[6].ends_with(r#"(builtins.getFlake "path:/nix/store/x-source?narHash=y").outputs"#),
        "{}",
        pinned[6]
    );
    assert!(argv(&fleet_command(".", false)).contains(&"--impure".to_string()));
}

#[test]
fn shard_output_separates_results_thrown_and_missing_hosts() {
    let json = r#"{"a":{"toplevel":"/nix/store/x"},"b":null}"#;
    let out = parse_shard_output(json, &names(&["a", "b", "c"])).unwrap();
    assert_eq!(out.hosts.len(), 1);
    assert_eq!(out.hosts["a"]["toplevel"], "/nix/store/x");
    assert_eq!(out.caught, ["b"]);
    assert_eq!(out.missing, ["c"]);
    assert!(parse_shard_output("[]", &[]).is_err());
    assert_eq!(
        parse_version("nix (Nix) 2.8.0\n").unwrap(),
        "nix (Nix) 2.8.0"
    );
}

const NO_INPUTS: &str = r#"{"nodes":{"root":{}},"root":"root","version":7}"#;

fn path_metadata(hash: &str, locks: &str) -> String {
    format!(
        r#"{{"lastModified":1700000000,
            "locked":{{"lastModified":1700000000,"narHash":"{hash}","path":"/srv/fleet","type":"path"}},
            "locks":{locks},
            "path":"/nix/store/1yb1v5ahxjfk3yzw72jwl23mw8kkms3c-source",
            "url":"path:/srv/fleet?lastModified=1700000000&narHash={hash}"}}"#
    )
}

#[test]
fn a_path_flake_is_pinned_by_its_locked_url() {
    let id = FlakeIdentity::from_metadata(&path_metadata("sha256-A", NO_INPUTS), None).unwrap();
    assert_eq!(
        id.pinned_ref,
        "path:/srv/fleet?lastModified=1700000000&narHash=sha256-A"
    );
    assert_eq!(id.revision, None);
}

#[test]
fn a_clean_git_flake_is_pinned_by_its_revision() {
    let meta = r#"{"locked":{"lastModified":1,"narHash":"sha256-B","ref":"main","rev":"2fecf06f","revCount":1,"type":"git","url":"file:///repo"},
        "locks":{"nodes":{"root":{}},"root":"root","version":7},
        "path":"/nix/store/wjsv7s3lwirfvaw35mrxkrzvsm2avqc0-source",
        "revision":"2fecf06f",
        "url":"git+file:///repo?ref=main&rev=2fecf06f"}"#;
    let id = FlakeIdentity::from_metadata(meta, None).unwrap();
    assert_eq!(id.pinned_ref, "git+file:///repo?ref=main&rev=2fecf06f");
    assert_eq!(id.revision.as_deref(), Some("2fecf06f"));
    assert_eq!(metadata_revision(meta).as_deref(), Some("2fecf06f"));
}

#[test]
fn a_dirty_git_tree_is_pinned_by_its_store_copy_and_hash() {
    let meta = r#"{"locked":{"lastModified":1795658196,"narHash":"sha256-y5x+Y/L=","type":"git","url":"file:///repo"},
        "locks":{"nodes":{"root":{}},"root":"root","version":7},
        "path":"/nix/store/hdyzxyi9yprqj9fjwlnbiz5gsgqfqhvb-source",
        "url":"git+file:///repo"}"#;
    let id = FlakeIdentity::from_metadata(meta, None).unwrap();
    assert_eq!(
        id.pinned_ref,
        "path:/nix/store/hdyzxyi9yprqj9fjwlnbiz5gsgqfqhvb-source?lastModified=1795658196&narHash=sha256-y5x%2BY%2FL%3D"
    );
    assert_eq!(id.revision, None);
    assert_eq!(
        lock_file_path(meta).as_deref(),
        Some("/nix/store/hdyzxyi9yprqj9fjwlnbiz5gsgqfqhvb-source/flake.lock")
    );
    // In a subdirectory: Nix 2.8 cannot read a store path with `dir`.
    let sub = meta.replace(r#""type":"git""#, r#""dir":"sub","type":"git""#);
    assert!(FlakeIdentity::from_metadata(&sub, None).is_err());
    assert_eq!(
        lock_file_path(&sub).as_deref(),
        Some("/nix/store/hdyzxyi9yprqj9fjwlnbiz5gsgqfqhvb-source/sub/flake.lock")
    );
}

#[test]
fn flakes_without_identity_or_with_unpinned_inputs_are_not_cached() {
    let meta =
        r#"{"locked":{"type":"git","url":"file:///repo"},"locks":{},"url":"git+file:///repo"}"#;
    assert!(
        FlakeIdentity::from_metadata(meta, None)
            .unwrap_err()
            .contains("no locked identity")
    );

    let locks = r#"{"nodes":{"nixpkgs":{"locked":{"narHash":"sha256-L","path":"/lib","type":"path"},"original":{"path":"/lib","type":"path"}},"root":{"inputs":{"nixpkgs":"nixpkgs"}}},"root":"root","version":7}"#;
    let meta = path_metadata("sha256-A", locks);
    // The lock file in the source is the lock graph: pinned.
    assert!(FlakeIdentity::from_metadata(&meta, Some(locks)).is_ok());
    // No lock file, or an outdated one: every evaluation would lock afresh.
    let err = FlakeIdentity::from_metadata(&meta, None).unwrap_err();
    assert!(err.contains("flake.lock"), "{err}");
    assert!(FlakeIdentity::from_metadata(&meta, Some(NO_INPUTS)).is_err());
    assert!(FlakeIdentity::from_metadata("nope", None).is_err());
}

#[test]
fn keys_change_with_everything_that_determines_a_result_and_nothing_else() {
    let id = |hash: &str, locks: &str| {
        let lock_file = (locks != NO_INPUTS).then_some(locks);
        FlakeIdentity::from_metadata(&path_metadata(hash, locks), lock_file).unwrap()
    };
    let base = id("sha256-A", NO_INPUTS);
    let key = host_key(&base, "nix (Nix) 2.8.0", FleetSource::Nixos, "web1", true);
    assert_eq!(key.len(), 64);
    // Deterministic.
    assert_eq!(
        key,
        host_key(
            &id("sha256-A", NO_INPUTS),
            "nix (Nix) 2.8.0",
            FleetSource::Nixos,
            "web1",
            true
        )
    );
    // The flake's content, another host, another Nix, the lock graph.
    let locks = r#"{"nodes":{"i":{"locked":{"narHash":"sha256-I","type":"path","path":"/i"}},"root":{"inputs":{"i":"i"}}},"root":"root","version":7}"#;
    let others = [
        host_key(
            &id("sha256-B", NO_INPUTS),
            "nix (Nix) 2.8.0",
            FleetSource::Nixos,
            "web1",
            true,
        ),
        host_key(&base, "nix (Nix) 2.8.0", FleetSource::Nixos, "web2", true),
        host_key(&base, "nix (Nix) 2.18.1", FleetSource::Nixos, "web1", true),
        host_key(
            &id("sha256-A", locks),
            "nix (Nix) 2.8.0",
            FleetSource::Nixos,
            "web1",
            true,
        ),
        host_key(&base, "nix (Nix) 2.8.0", FleetSource::Nixos, "web1", false),
        host_key(&base, "nix (Nix) 2.8.0", FleetSource::Colmena, "web1", true),
        fleet_key(&base, "nix (Nix) 2.8.0"),
    ];
    let distinct: BTreeSet<&String> = others.iter().chain([&key]).collect();
    assert_eq!(distinct.len(), others.len() + 1);
}

#[test]
fn workers_follow_cores_and_memory() {
    // Memory for plenty: one per core.
    assert_eq!(default_workers(2, 22_000, 1024), 2);
    assert_eq!(default_workers(16, 64_000, 512), 16);
    // 4 GiB and 1.5 GiB hosts: two fit.
    assert_eq!(default_workers(8, 4096, 1536), 2);
    // Never none.
    assert_eq!(default_workers(4, 100, 1024), 1);
    assert_eq!(default_workers(0, 100_000, 1), 1);
}

#[test]
fn shards_are_bounded_by_memory_and_balanced_over_workers() {
    // 48 hosts, 2 workers, memory for plenty: 4 shards of 12.
    assert_eq!(hosts_per_shard(48, 2, 22_000, 50), 12);
    // 1 GiB hosts: a worker's share (8.8 GB) holds 8.
    assert_eq!(hosts_per_shard(48, 2, 22_000, 1024), 8);
    // Never zero, never more than the cap.
    assert_eq!(hosts_per_shard(48, 2, 100, 1024), 1);
    assert_eq!(hosts_per_shard(100_000, 1, 1_000_000, 1), MAX_SHARD_HOSTS);
    assert_eq!(hosts_per_shard(0, 0, 0, 0), 1);

    let hosts: Vec<String> = (0..10).map(|i| format!("h{i}")).collect();
    let shards = split_into_shards(&hosts, 4);
    assert_eq!(shards.iter().map(Vec::len).collect::<Vec<_>>(), [4, 3, 3]);
    assert_eq!(shards.concat(), hosts);
    assert_eq!(split_into_shards(&hosts, 100).len(), 1);
    assert_eq!(split_into_shards(&hosts, 1).len(), 10);
    assert!(split_into_shards(&[], 3).is_empty());
}

#[test]
fn shards_start_with_the_heap_they_were_measured_to_need() {
    // 12 hosts of 40 MiB: 480 MiB, more than Nix's default.
    assert_eq!(
        gc_initial_heap_bytes(12, Some(40 * 1024), 8000),
        Some(480 * 1024 * 1024)
    );
    // Never more than a worker's share; nothing when Nix's default is as large.
    assert_eq!(
        gc_initial_heap_bytes(12, Some(40 * 1024), 400),
        Some(400 * 1024 * 1024)
    );
    assert_eq!(gc_initial_heap_bytes(4, Some(40 * 1024), 8000), None);
    assert_eq!(gc_initial_heap_bytes(12, None, 8000), None);
    assert_eq!(worker_share_mib(10_000, 2), 4000);
    assert_eq!(worker_share_mib(10_000, 0), 8000);
}

#[test]
fn a_measured_peak_becomes_a_budget_with_margin() {
    // 12 hosts peaking at 480 MiB: 40 MiB a host, 50 with the margin.
    assert_eq!(host_budget_from_peak(480 * 1024, 12), 50);
    assert_eq!(host_budget_from_peak(0, 0), 1);
}

#[test]
fn the_report_describes_itself() {
    let report = EvaluationReport {
        hosts: 48,
        cached: 40,
        evaluated: 8,
        shards: 2,
        workers: 2,
        seconds: 1.23,
        cache: "used".into(),
        ..EvaluationReport::default()
    };
    assert_eq!(
        report.describe(),
        "48 host(s), 40 from the cache, 8 evaluated (0 with their system) in 2 shard(s) by up to 2 worker(s) in 1.2s"
    );
}
