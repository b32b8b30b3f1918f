//! Unit tests of [`super`].

use super::*;

fn glob(text: &str) -> Glob {
    Glob::new(text).unwrap()
}

#[test]
fn globs_match_whole_names() {
    assert!(glob("web-*").matches("web-1"));
    assert!(glob("web-*").matches("web-"));
    assert!(!glob("web-*").matches("xweb-1"));
    assert!(glob("*").matches(""));
    assert!(glob("*-db").matches("eu-west-db"));
    assert!(!glob("*-db").matches("eu-west-db2"));
    assert!(glob("w?b").matches("web"));
    assert!(!glob("w?b").matches("wb"));
    assert!(glob("edge-[ab]").matches("edge-b"));
    assert!(!glob("edge-[ab]").matches("edge-c"));
    assert!(glob("n[0-9]").matches("n7"));
    assert!(glob("n[!0-9]").matches("nx"));
    assert!(!glob("n[!0-9]").matches("n7"));
    assert!(glob("a*b*c").matches("aXXbYYc"));
    assert!(glob("a*b*c").matches("abc"));
    assert!(!glob("a*b*c").matches("aXXbYY"));
    assert!(glob("*a*a*a*").matches("banana-a"));
    assert!(glob("web1").is_literal());
    assert!(!glob("web*").is_literal());
    assert!(glob("[-a]").matches("-"));
}

#[test]
fn globs_refuse_what_no_name_has() {
    for bad in [
        "", "a b", "a;b", "$(x)", "a/b", "[ab", "[z-a]", "a\u{e9}", "[a;]",
    ] {
        assert!(Glob::new(bad).is_err(), "{bad:?}");
    }
    assert!(Selector::parse("-oProxyCommand=x").is_err());
    assert!(Selector::parse("@").is_err());
    let e = Selector::parse_all(&["a,,b".into()]).unwrap_err();
    assert!(e.to_string().contains("empty selector"), "{e}");
    assert_eq!(
        Selector::parse_all(&["web-*, @db".into(), "x".into()])
            .unwrap()
            .iter()
            .map(Selector::text)
            .collect::<Vec<_>>(),
        ["web-*", "@db", "x"]
    );
}

fn fleet() -> Inventory {
    let p = "/nix/store/q4zfsrsm5n0vhqjrgz2c1lc78slrrsmw-nixos-system";
    let d = "/nix/store/c7syrkx06plw1dwvs86ny93v9ivpjlw3-nixos-system.drv";
    let host = |tags: &[&str]| serde_json::json!({ "toplevel": p, "drvPath": d, "deployment": { "tags": tags } });
    let json = serde_json::json!({
        "web-1": host(&["web", "edge-eu"]),
        "web-2": host(&["web", "edge-us"]),
        "db-1": host(&["db"]),
        "mon": host(&["monitoring"]),
    });
    Inventory::from_eval_json(crate::source::FleetSource::Nixos, &json.to_string()).unwrap()
}

fn select(names: &[&str], on: &[&str], exclude: &[&str], all: bool) -> Result<Vec<String>, String> {
    let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect();
    let selection = Selection {
        names: words(names),
        tags: words(on),
        exclude: words(exclude),
        all,
    };
    resolve(&fleet(), &selection).map_err(|e| e.to_string())
}

#[test]
fn every_form_of_selection() {
    assert_eq!(select(&[], &[], &[], false).unwrap().len(), 4);
    assert_eq!(select(&["mon"], &[], &[], true).unwrap().len(), 4);
    assert_eq!(
        select(&[], &["web-*"], &[], false).unwrap(),
        ["web-1", "web-2"]
    );
    assert_eq!(
        select(&[], &["@edge-*"], &[], false).unwrap(),
        ["web-1", "web-2"]
    );
    assert_eq!(select(&[], &["@edge-eu"], &[], false).unwrap(), ["web-1"]);
    // Several --on, and lists: the union.
    assert_eq!(
        select(&[], &["@db", "mon"], &[], false).unwrap(),
        ["db-1", "mon"]
    );
    assert_eq!(
        select(&["web-1,@db"], &["mon"], &[], false).unwrap(),
        ["db-1", "mon", "web-1"]
    );
    // Exclusions, from the selection or from everything.
    assert_eq!(
        select(&[], &["@web"], &["web-2"], false).unwrap(),
        ["web-1"]
    );
    assert_eq!(select(&[], &[], &["web-*", "@db"], false).unwrap(), ["mon"]);
}

#[test]
fn a_selector_that_matches_nothing_is_an_error() {
    let e = select(&[], &["api-*"], &[], false).unwrap_err();
    assert!(e.contains("`api-*` matches no host"), "{e}");
    let e = select(&[], &["@edge-ap*"], &[], false).unwrap_err();
    assert!(e.contains("`@edge-ap*` matches no host"), "{e}");
    let e = select(&["web3"], &[], &[], false).unwrap_err();
    assert!(e.contains("unknown host `web3`"), "{e}");
    // A bare word that is a tag says how to select the tag.
    let e = select(&[], &["web"], &[], false).unwrap_err();
    assert!(e.contains("`@web` selects the hosts with that tag"), "{e}");
    let e = select(&[], &["@nope"], &[], false).unwrap_err();
    assert!(e.contains("no host has tag `nope`"), "{e}");
    // An exclusion that matches nothing is a typo too.
    let e = select(&[], &[], &["wbe-*"], false).unwrap_err();
    assert!(e.contains("`wbe-*` matches no host"), "{e}");
    // Excluding everything selected leaves nothing to do.
    let e = select(&[], &["@db"], &["db-*"], false).unwrap_err();
    assert!(e.contains("no host is left"), "{e}");
    // A goal where a host was expected.
    let e = select(&["boot"], &[], &[], false).unwrap_err();
    assert!(
        e.contains("`boot` is a goal, not a host: use `--goal boot` (or `nix-deploy apply boot`)"),
        "{e}"
    );
    // Did you mean: close host names and tags.
    let e = select(&["wbe-2"], &[], &[], false).unwrap_err();
    assert!(e.contains("did you mean `web-2`"), "{e}");
    let e = select(&[], &["@monitorng"], &[], false).unwrap_err();
    assert_eq!(
        e,
        "no host has tag `monitorng`; did you mean `@monitoring`?"
    );
    let e = select(&["a b"], &[], &[], false).unwrap_err();
    assert!(e.contains("`a b`"), "{e}");
}

fn selection(names: &[&str], on: &[&str], exclude: &[&str]) -> Selection {
    let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect();
    Selection {
        names: words(names),
        tags: words(on),
        exclude: words(exclude),
        all: false,
    }
}

#[test]
fn hosts_that_failed_to_evaluate_are_selected_apart() {
    let inventory = fleet();
    let failed: BTreeSet<String> = ["web-3".to_string()].into();
    let resolve = |s: Selection| resolve_partial(&inventory, &failed, &s);
    // Naming only a failed host selects no other.
    assert_eq!(
        resolve(selection(&["web-3"], &[], &[])).unwrap(),
        (vec![], vec!["web-3".to_string()])
    );
    let (chosen, unevaluated) = resolve(selection(&["web-*"], &[], &["web-1"])).unwrap();
    assert_eq!(
        (chosen, unevaluated),
        (vec!["web-2".into()], vec!["web-3".into()])
    );
    let (chosen, unevaluated) = resolve(Selection::default()).unwrap();
    assert_eq!(chosen.len(), 4);
    assert_eq!(unevaluated, ["web-3"]);
    // A tag selector knows only evaluated hosts' tags.
    let (chosen, unevaluated) = resolve(selection(&["@web"], &[], &[])).unwrap();
    assert_eq!(chosen, ["web-1", "web-2"]);
    assert!(unevaluated.is_empty());
    let e = resolve(selection(&["nope"], &[], &[])).unwrap_err();
    assert!(
        e.to_string().contains("web-3"),
        "the known hosts include it: {e}"
    );
}

#[test]
fn a_host_is_picked_early_only_if_its_own_metadata_selects_it() {
    let inventory = fleet();
    let web = inventory.get("web-1").unwrap();
    assert!(may_select(&Selection::default(), web));
    assert!(may_select(&selection(&["web-1"], &[], &[]), web));
    assert!(may_select(&selection(&["w*"], &[], &[]), web));
    assert!(may_select(&selection(&["@edge-*"], &[], &[]), web));
    assert!(may_select(&selection(&[], &["db-1,@web"], &[]), web));
    assert!(!may_select(&selection(&["db-1"], &[], &[]), web));
    assert!(!may_select(&selection(&[], &[], &["@edge-eu"]), web));
    assert!(!may_select(&selection(&["a b"], &[], &[]), web));
}

#[test]
fn a_large_fleet_is_counted_not_listed() {
    let names: Vec<String> = (0..500).map(|i| format!("node-{i:03}")).collect();
    let e = check_names(&selection(&["node-5000"], &[], &[]), &names).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("the fleet has 500 hosts"), "{text}");
    assert!(text.len() < 300, "{text}");
}

#[test]
fn names_are_checked_before_anything_is_evaluated() {
    let names: Vec<String> = ["web-1".into(), "db-1".into()].into();
    assert!(check_names(&selection(&["web-*", "@anything"], &[], &[]), &names).is_ok());
    let e = check_names(&selection(&["wbe-1"], &[], &[]), &names).unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown host `wbe-1`; did you mean `web-1`?; `@wbe-1` selects the hosts with that \
         tag, if it is one (the fleet has: web-1, db-1)"
    );
    let e = check_names(&selection(&[], &[], &["api-*"]), &names).unwrap_err();
    assert!(e.to_string().contains("`api-*` matches no host"), "{e}");
    assert!(uses_tags(&selection(&["web-1"], &[], &["@db"])));
    assert!(!uses_tags(&selection(&["web-1"], &["db-*"], &[])));
}
