//! The Grafana dashboard (`nix/grafana/nix-deploy.json`) reads only metrics
//! the daemon exports: every query is parsed as PromQL and each metric name
//! it selects must be in a real scrape of `/metrics` (called by the web
//! test, whose daemon has deployed, failed, rolled back and recovered). The
//! NixOS module provisions it into Grafana when asked, and only then.

use std::collections::BTreeSet;
use std::path::PathBuf;

use nix_deploy_testkit::{HostSpec, NixosFlake, NixosShape};
use serde_json::Value;

use crate::helpers::nix_eval;

#[test]
fn the_module_provisions_the_dashboard_only_when_asked() {
    let flake = NixosFlake::create(
        NixosShape::small().host_module(
            "grafana",
            r#"{ services.nix-deploy.grafanaDashboard = { enable = true; folder = "Fleet"; }; }"#,
        ),
        vec![HostSpec::new("grafana"), HostSpec::new("other")],
    )
    .expect("writing the NixOS-shaped flake");
    let evaluated = nix_eval(
        &flake.flake_ref(),
        "nixosConfigurations",
        r#"configurations: builtins.mapAttrs (name: c:
          let provision = c.config.services.grafana.provision; in
          if provision == { } then null else {
            inherit (provision) enable;
            providers = map (p: {
              inherit (p) name folder;
              files = builtins.attrNames (builtins.readDir p.options.path);
            }) provision.dashboards.settings.providers;
          }) configurations"#,
    );
    assert_eq!(evaluated["other"], Value::Null, "not asked: {evaluated}");
    assert_eq!(
        evaluated["grafana"],
        serde_json::json!({
            "enable": true,
            "providers": [{ "name": "nix-deploy", "folder": "Fleet", "files": ["nix-deploy.json"] }],
        })
    );
}

/// Every metric the Grafana dashboard's queries use is one `/metrics`
/// exports (for a histogram: its `_bucket`, `_sum` or `_count` series).
pub async fn dashboard_reads_only_exported_metrics(url: &str) {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let exported: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("nix/grafana/nix-deploy.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut used = BTreeSet::new();
    let mut queries = 0;
    for expr in expressions(&dashboard) {
        // Grafana's own variables, as Grafana would fill them in.
        let promql = expr
            .replace("$__rate_interval", "5m")
            .replace("$__range", "1h")
            .replace("$__interval", "1m");
        let parsed = promql_parser::parser::parse(&promql)
            .unwrap_or_else(|e| panic!("the dashboard's query `{expr}` is not PromQL: {e}"));
        metric_names(&parsed, &mut used);
        queries += 1;
    }
    assert!(queries >= 6, "the dashboard has its panels' queries");
    for name in &used {
        assert!(
            exported.contains(name),
            "the dashboard reads `{name}`, which /metrics does not export:\n{text}"
        );
    }
    for wanted in [
        "nix_deploy_deployments_total",
        "nix_deploy_mttr_seconds",
        "nix_deploy_hosts",
        "nix_deploy_deployment_duration_seconds_bucket",
    ] {
        assert!(used.contains(wanted), "the dashboard shows {wanted}");
    }
}

/// Every `expr` of every panel's targets (rows' panels included).
fn expressions(dashboard: &Value) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dashboard];
    while let Some(value) = stack.pop() {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(expr)) = map.get("expr") {
                    found.push(expr.clone());
                }
                stack.extend(map.values());
            }
            Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    found
}

fn metric_names(expr: &promql_parser::parser::Expr, names: &mut BTreeSet<String>) {
    use promql_parser::parser::Expr;
    match expr {
        Expr::VectorSelector(vs) => names.extend(vs.name.clone()),
        Expr::MatrixSelector(ms) => names.extend(ms.vs.name.clone()),
        Expr::Aggregate(a) => {
            metric_names(&a.expr, names);
            if let Some(p) = &a.param {
                metric_names(p, names);
            }
        }
        Expr::Unary(u) => metric_names(&u.expr, names),
        Expr::Binary(b) => {
            metric_names(&b.lhs, names);
            metric_names(&b.rhs, names);
        }
        Expr::Paren(p) => metric_names(&p.expr, names),
        Expr::Subquery(s) => metric_names(&s.expr, names),
        Expr::Call(call) => {
            for arg in &call.args.args {
                metric_names(arg, names);
            }
        }
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}
