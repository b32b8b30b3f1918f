// nix-deploy's dashboard: the fleet's filters, and a deployment's live
// timeline over Server-Sent Events. Plain JavaScript, no dependencies. All
// text from the server goes into the page with textContent, never as HTML.
(function () {
  "use strict";

  // ---- Fleet: search by name, filter by tag and drift kind, in the page
  // (no requests).
  function fleetFilters() {
    var search = document.getElementById("fleet-search");
    var tag = document.getElementById("fleet-tag");
    var table = document.getElementById("fleet");
    if (!search || !tag || !table) return;
    var rows = Array.prototype.slice.call(table.tBodies[0].rows);
    var tags = rows.map(function (r) { return (r.dataset.tags || "").split(" "); });
    var names = rows.map(function (r) { return (r.dataset.name || "").toLowerCase(); });
    var drift = document.getElementById("fleet-drift");
    var kinds = rows.map(function (r) { return (r.dataset.drift || "").split(" "); });
    var count = document.getElementById("fleet-count");
    function apply() {
      var q = search.value.trim().toLowerCase();
      var t = tag.value;
      var k = drift ? drift.value : "";
      var shown = 0;
      for (var i = 0; i < rows.length; i++) {
        var ok = (!q || names[i].indexOf(q) !== -1) && (!t || tags[i].indexOf(t) !== -1) &&
          (!k || kinds[i].indexOf(k) !== -1);
        if (rows[i].hidden === ok) rows[i].hidden = !ok;
        if (ok) shown++;
      }
      count.textContent = shown + " of " + rows.length + " hosts";
    }
    search.addEventListener("input", apply);
    tag.addEventListener("change", apply);
    if (drift) drift.addEventListener("change", apply);
    if (search.value || tag.value || (drift && drift.value)) apply();
  }

  // ---- A deployment: apply each event to its host's row as it comes.
  var LOG_TAIL = 30;
  var KINDS = ["deployment-started", "host-probed", "planned", "host-planned",
    "step-started", "step-finished", "host-finished", "deployment-finished",
    "health-checked", "log"];
  var STATUS_CLASS = {
    deployed: "ok", succeeded: "ok", pending: "muted", skipped: "muted",
    cancelled: "muted", running: "running", "rolled-back": "warn"
  };

  function el(tag, className, text) {
    var e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function seconds(ms) {
    var s = ms / 1000;
    if (s < 60) return s.toFixed(1) + "s";
    var whole = Math.floor(s);
    return Math.floor(whole / 60) + "m " + String(whole % 60).padStart(2, "0") + "s";
  }

  function liveDeployment() {
    var url = document.body.dataset.liveEvents;
    var table = document.getElementById("hosts");
    if (!url || !table || !window.EventSource) return;
    var rows = {};
    Array.prototype.forEach.call(table.querySelectorAll("tr[data-host]"), function (tr) {
      var host = tr.dataset.host;
      rows[host] = rows[host] || {};
      if (tr.classList.contains("host-row")) rows[host].main = tr;
      else rows[host].detail = tr;
    });

    // What the page applied, for people who measure it (just bench).
    var stats = window.nixDeployLive = { applied: 0, lastId: 0, lagMs: [] };

    function hostRows(host) {
      if (rows[host] && rows[host].main) return rows[host];
      // A host the page did not know when it was drawn.
      var main = el("tr", "host-row");
      main.dataset.host = host;
      var name = el("td");
      var link = el("a", "host", host);
      link.href = "/hosts/" + encodeURIComponent(host);
      name.appendChild(link);
      main.appendChild(name);
      var status = el("td");
      status.appendChild(el("span", "badge muted status", "pending"));
      status.appendChild(document.createTextNode(" "));
      status.appendChild(el("span", "small doing", ""));
      main.appendChild(status);
      main.appendChild(el("td", "path", ""));
      var timeline = el("td");
      timeline.appendChild(el("ol", "timeline"));
      main.appendChild(timeline);
      main.appendChild(el("td", "took-host", ""));
      main.appendChild(el("td"));
      var detail = el("tr", "host-detail");
      detail.dataset.host = host;
      var cell = el("td");
      cell.colSpan = 6;
      var error = el("pre", "error host-error");
      error.hidden = true;
      cell.appendChild(error);
      var log = el("details", "log");
      log.appendChild(el("summary", "", "Log"));
      log.appendChild(el("pre", "log-tail", ""));
      cell.appendChild(log);
      detail.appendChild(cell);
      table.tBodies[0].appendChild(main);
      table.tBodies[0].appendChild(detail);
      rows[host] = { main: main, detail: detail };
      return rows[host];
    }

    function setStatus(r, status, doing) {
      var badge = r.main.querySelector(".status");
      badge.textContent = status;
      badge.className = "badge status " + (STATUS_CLASS[status] || "bad");
      if (doing !== undefined) r.main.querySelector(".doing").textContent = doing;
    }

    function log(r, line) {
      var pre = r.detail.querySelector(".log-tail");
      var lines = pre.textContent ? pre.textContent.replace(/\n$/, "").split("\n") : [];
      lines.push(line);
      pre.textContent = lines.slice(-LOG_TAIL).join("\n") + "\n";
    }

    // The plan's phases, when the plan is made while the page is open.
    function planned(ev) {
      var section = document.getElementById("phases");
      if (!section || !section.hidden) return;
      var list = section.querySelector("ol");
      ev.phases.forEach(function (hosts) {
        list.appendChild(el("li", "", hosts.join(", ")));
      });
      section.hidden = false;
    }

    function apply(ev) {
      stats.applied++;
      stats.lastId = ev.id;
      stats.lagMs.push(Date.now() - ev.at);
      if (ev.kind === "deployment-finished") {
        finished(ev);
        return;
      }
      if (ev.kind === "planned") planned(ev);
      if (!ev.host) return;
      var r = hostRows(ev.host);
      var timeline = r.main.querySelector(".timeline");
      if (ev.kind === "step-started") {
        var chip = el("li", "chip running", ev.step + " ");
        chip.dataset.step = ev.step;
        chip.appendChild(el("span", "took", ""));
        timeline.appendChild(chip);
        setStatus(r, "running", ev.step);
      } else if (ev.kind === "step-finished") {
        var chips = timeline.querySelectorAll("li.chip.running");
        for (var i = chips.length - 1; i >= 0; i--) {
          if (chips[i].dataset.step === ev.step) {
            chips[i].className = "chip " + (ev.ok ? "ok" : "bad");
            chips[i].querySelector(".took").textContent = seconds(ev.duration_ms);
            break;
          }
        }
        if (!ev.ok) log(r, ev.text);
      } else if (ev.kind === "host-finished") {
        setStatus(r, ev.status, "");
        r.main.querySelector(".took-host").textContent = seconds(ev.duration_ms);
        if (ev.error) {
          var error = r.detail.querySelector(".host-error");
          error.textContent = ev.error;
          error.hidden = false;
          r.detail.querySelector("details.log").open = true;
        }
        log(r, ev.text);
      } else {
        log(r, ev.text);
      }
    }

    var source = new EventSource(url);
    KINDS.forEach(function (kind) {
      source.addEventListener(kind, function (message) {
        try { apply(JSON.parse(message.data)); } catch (e) { console.error(e); }
      });
    });

    // At the end: the status now, then the whole page's main part again from
    // the server (summaries, Rollback buttons), without reloading the page.
    function finished(ev) {
      source.close();
      var badge = document.getElementById("deployment-status");
      if (badge) {
        badge.textContent = ev.status;
        badge.className = "badge " + (ev.status === "succeeded" ? "ok" : ev.status === "cancelled" ? "muted" : "bad");
      }
      var cancel = document.getElementById("cancel-form");
      if (cancel) cancel.remove();
      fetch(window.location.pathname, { credentials: "same-origin" })
        .then(function (response) { return response.ok ? response.text() : null; })
        .then(function (text) {
          if (!text) return;
          var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("deployment-main");
          var current = document.getElementById("deployment-main");
          if (fresh && current) current.replaceWith(document.adoptNode(fresh));
          document.body.dataset.refreshed = "true";
        })
        .catch(function (e) { console.error(e); });
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    fleetFilters();
    liveDeployment();
  });
})();
