/* musubi view: the pages (runs, one run, savings) and the address bar's #route. */
"use strict";
(function () {
  var h = M.h, main = document.getElementById("main");
  var state = { kind: "", since: "", current: null };
  var SINCE = [["", "any time"], ["3600", "last hour"], ["86400", "last 24 hours"],
               ["604800", "last 7 days"], ["2592000", "last 30 days"]];

  function tab(name) {
    document.querySelectorAll("nav a").forEach(function (a) {
      a.classList.toggle("active", a.getAttribute("data-tab") === name);
    });
  }

  /* -- runs ----------------------------------------------------------------------- */

  function runsQuestion() {
    if (M.boot.mode === "file") return "runs";
    var q = [];
    if (state.kind) q.push("kind=" + encodeURIComponent(state.kind));
    if (state.since) q.push("since=" + (Date.now() / 1000 - Number(state.since)).toFixed(0));
    return "runs" + (q.length ? "?" + q.join("&") : "");
  }

  function runsPage() {
    tab("runs");
    var started = performance.now();
    M.clear(main).appendChild(h("p", { class: "loading" }, "Loading runs…"));
    Promise.all([M.ask("summary"), M.ask(runsQuestion()), M.ask("savings").catch(function () {
      return null;
    })]).then(function (got) {
      var summary = got[0], answer = got[1], savings = got[2];
      var cutoff = state.since ? Date.now() / 1000 - Number(state.since) : null;
      var runs = answer.runs.filter(function (r) {
        return (!state.kind || r.kind === state.kind) && (!cutoff || r.started_at >= cutoff);
      });
      var kinds = Object.keys(summary.runs_by_kind).sort();
      var saved = savings ? savings.totals.saved : null;
      M.clear(main);
      M.append(main, [
        M.cards([
          { id: "card-runs", label: "runs", value: M.int(summary.runs) },
          { id: "card-calls", label: "calls recorded", value: M.int(summary.calls) },
          { id: "card-replays", label: "calls replayed", value: M.int(summary.call_replays) },
          { id: "card-tokens-saved", label: "tokens saved", value: M.int(summary.tokens_saved) },
          { id: "card-seconds-saved", label: "time saved", value: M.duration(summary.seconds_saved) },
          { id: "card-money-saved", label: "money saved", value: saved ? M.money(saved.money) : "-" },
        ]),
        h("div", { class: "filters" },
          h("label", null, "kind ", h("select", { "data-testid": "filter-kind", onchange: function (ev) {
            state.kind = ev.target.value;
            runsPage();
          } }, h("option", { value: "" }, "all kinds"), kinds.map(function (k) {
            return h("option", { value: k, selected: k === state.kind }, k);
          }))),
          h("label", null, "started ", h("select", { "data-testid": "filter-since", onchange: function (ev) {
            state.since = ev.target.value;
            runsPage();
          } }, SINCE.map(function (s) {
            return h("option", { value: s[0], selected: s[0] === state.since }, s[1]);
          }))),
          h("span", { class: "muted", "data-testid": "runs-shown" }, runs.length + " run(s)" +
            (answer.more ? " (the newest " + answer.limit + ")" : ""))),
        runs.length ? runsTable(runs) : h("p", { class: "muted" }, "No runs match."),
      ]);
      main.setAttribute("data-render-ms", Math.round(performance.now() - started));
      main.setAttribute("data-ready-at", Math.round(performance.now()));
      main.setAttribute("data-ready", "runs");
    }, function (err) {
      M.clear(main).appendChild(M.error("runs", err));
    });
  }

  function runsTable(runs) {
    var cols = ["started", "kind", "name", "status", "calls", "replayed", "tokens",
                "tokens saved", "time saved", "money saved", "took"];
    return h("table", { class: "runs", "data-testid": "runs-table" },
      h("thead", null, h("tr", null, cols.map(function (c) { return h("th", null, c); }))),
      h("tbody", null, runs.map(function (r) {
        return h("tr", { "data-testid": "run-row", "data-run-id": r.run_id, "data-kind": r.kind,
                         "data-calls": r.calls, "data-replays": r.replays,
                         onclick: function () { location.hash = "#run/" + r.run_id; } },
          h("td", null, M.when(r.started_at)), h("td", null, h("span", { class: "chip" }, r.kind)),
          h("td", { title: r.run_id }, M.clip(r.name || r.run_id, 48)),
          h("td", { class: "status-" + r.status }, r.status), h("td", { class: "num" }, M.int(r.calls)),
          h("td", { class: "num" }, M.int(r.replays)), h("td", { class: "num" }, M.int(r.tokens)),
          h("td", { class: "num" }, r.tokens_saved ? M.int(r.tokens_saved) : "-"),
          h("td", { class: "num" }, r.seconds_saved ? M.duration(r.seconds_saved) : "-"),
          h("td", { class: "num" }, r.money_saved ? M.money(r.money_saved) : "-"),
          h("td", { class: "num" }, M.duration(r.duration_s)));
      })));
  }

  /* -- one run -------------------------------------------------------------------- */

  function runPage(runId, callId) {
    tab("runs");
    if (state.current && state.current.runId === runId) {
      if (callId) select(callId, false);
      return;
    }
    M.clear(main).appendChild(h("p", { class: "loading" }, "Loading run…"));
    var started = performance.now();
    M.ask("run/" + runId).then(function (answer) {
      var model = new M.graph.Model(answer), r = answer.run;
      model.openDefault();
      var graphHost = h("div", { class: "graph-host", "data-testid": "graph-host" });
      var panel = h("aside", { class: "panel", "data-testid": "panel" },
        h("p", { class: "muted" }, "Click a call to see its details."));
      M.clear(main);
      M.append(main, [
        h("div", { class: "run-head", "data-testid": "run-head", "data-run-id": r.run_id },
          h("a", { href: "#runs" }, "← runs"), " ",
          h("h2", null, r.name || r.run_id), h("span", { class: "chip" }, r.kind),
          h("span", { class: "status-" + r.status }, r.status),
          h("span", { class: "muted" }, M.when(r.started_at) + " · took " + M.duration(r.duration_s) +
            " · " + M.int(r.calls) + " calls, " + M.int(r.replays) + " replayed · " +
            M.int(r.tokens) + " tokens" + (r.tokens_saved ? " · saved " + M.int(r.tokens_saved) +
            " tokens, " + M.duration(r.seconds_saved) + ", " + M.money(r.money_saved) : ""))),
        h("div", { class: "toolbar" },
          h("button", { onclick: function () { state.current.graph.fit(); } }, "Fit"),
          h("button", { "data-testid": "collapse", onclick: function () {
            model.expanded = {};
            model.clusters = {};
            model.openDefault();
            state.current.graph.render();
          } }, "Collapse"),
          model.calls.length <= 2000 ? h("button", { "data-testid": "expand-all", onclick: function () {
            model.expandAll();
            state.current.graph.render();
          } }, "Expand all") : null,
          legend()),
        h("div", { class: "run-body" }, graphHost, panel),
      ]);
      var graph = new M.graph.Graph(graphHost, model, function (c) { select(c.id, true); });
      state.current = { runId: runId, model: model, graph: graph, panel: panel };
      graph.render();
      main.setAttribute("data-render-ms", Math.round(performance.now() - started));
      main.setAttribute("data-ready-at", Math.round(performance.now()));
      main.setAttribute("data-ready", "run");
      if (callId) select(callId, false);
    }, function (err) {
      M.clear(main).appendChild(M.error("run " + runId, err));
    });
  }

  function legend() {
    var fams = [["model", "model call"], ["embedding", "embedding"], ["retriever", "retriever"],
                ["tool", "tool"], ["step", "step"], ["chain", "chain / span"]];
    return h("span", { class: "legend" },
      fams.map(function (f) { return h("span", { class: "chip fam-" + f[0] }, f[1]); }),
      h("span", { class: "key key-data" }, "data flow"),
      h("span", { class: "key key-contains" }, "contains"),
      h("span", { class: "chip replayed" }, "↺ replayed"), h("span", { class: "chip stale" }, "stale"),
      h("span", { class: "chip whatif" }, "would recompute"));
  }

  function select(callId, push) {
    var cur = state.current;
    if (!cur) return;
    cur.model.selected = callId;
    if (push) history.replaceState(null, "", "#run/" + cur.runId + "/call/" + callId);
    if (!cur.model.byId[callId] || cur.graph.view.rep[callId] !== callId) cur.graph.reveal(callId);
    else cur.graph.render(true);
    M.details.show(cur.panel, callId, {
      select: function (id) { select(id, true); },
      whatif: function (nodeId) { whatif(nodeId); },
    });
  }

  function whatif(nodeId) {
    var cur = state.current;
    if (!nodeId) {
      cur.model.whatif = null;
      cur.graph.render(true);
      var old = document.getElementById("whatif-result");
      if (old) M.clear(old);
      return;
    }
    M.ask("whatif/" + nodeId).then(function (answer) {
      var host = document.getElementById("whatif-result");
      var nodes = M.details.whatif(host, answer, cur.model, {
        select: function (id) { select(id, true); },
        whatif: whatif,
      });
      cur.model.whatif = { nodes: nodes };
      cur.graph.render(true);
      host.scrollIntoView({ block: "start" });
    }, function (err) {
      var host = document.getElementById("whatif-result");
      if (host) M.clear(host).appendChild(M.error("what-if", err));
    });
  }

  /* -- savings -------------------------------------------------------------------- */

  function savingsPage() {
    tab("savings");
    state.current = null;
    M.clear(main).appendChild(h("p", { class: "loading" }, "Loading savings…"));
    M.ask("savings").then(function (s) {
      var saved = s.totals.saved, spent = s.totals.spent;
      M.clear(main);
      M.append(main, [
        h("h2", null, "What replay saved"),
        M.cards([
          { id: "saved-calls", label: "calls replayed", value: M.int(saved.calls) },
          { id: "saved-tokens", label: "tokens saved", value: M.int(saved.tokens) },
          { id: "saved-seconds", label: "time saved", value: M.duration(saved.seconds) },
          { id: "saved-money", label: "money saved", value: M.money(saved.money) },
          { id: "spent-tokens", label: "tokens spent", value: M.int(spent.tokens) },
          { id: "spent-money", label: "money spent", value: M.money(spent.money) },
        ]),
        h("p", { class: "muted", "data-testid": "prices" }, "Prices: " + s.prices.describe + "." +
          (s.unpriced_models.length ? " No price for: " + s.unpriced_models.join(", ") +
            " (their tokens count, their money does not)." : "")),
        h("h3", null, "Per model"),
        usageTable(s.by_model.map(function (m) {
          return { key: m.model || "(" + m.kind + ")", part: m, priced: m.priced };
        }), "savings-model-row"),
        h("h3", null, "Per day"),
        dayChart(s.by_day),
        usageTable(s.by_day.slice().reverse().map(function (d) {
          return { key: d.day, part: d, priced: true };
        }), "savings-day-row"),
      ]);
      main.setAttribute("data-ready", "savings");
    }, function (err) {
      M.clear(main).appendChild(M.error("savings", err));
    });
  }

  function usageTable(rows, testid) {
    var cols = ["", "replayed", "tokens saved", "time saved", "money saved", "executed",
                "tokens spent", "time spent", "money spent"];
    function money(part, priced) {
      if (!part.tokens) return "-";
      return priced || !part.unpriced_tokens ? M.money(part.money) : "no price";
    }
    return h("table", { class: "usage" },
      h("thead", null, h("tr", null, cols.map(function (c) { return h("th", null, c); }))),
      h("tbody", null, rows.map(function (r) {
        var sv = r.part.saved, sp = r.part.spent;
        return h("tr", { "data-testid": testid, "data-key": r.key, "data-tokens-saved": sv.tokens },
          h("td", null, r.key), h("td", { class: "num" }, M.int(sv.calls)),
          h("td", { class: "num" }, M.int(sv.tokens)), h("td", { class: "num" }, M.duration(sv.seconds)),
          h("td", { class: "num" }, money(sv, r.priced)), h("td", { class: "num" }, M.int(sp.calls)),
          h("td", { class: "num" }, M.int(sp.tokens)), h("td", { class: "num" }, M.duration(sp.seconds)),
          h("td", { class: "num" }, money(sp, r.priced)));
      })));
  }

  function dayChart(days) {
    if (!days.length) return h("p", { class: "muted" }, "Nothing recorded yet.");
    var shown = days.slice(-60), W = 22, H = 120, max = 1;
    shown.forEach(function (d) { max = Math.max(max, d.saved.tokens, d.spent.tokens); });
    var svg = M.s("svg", { class: "chart", width: shown.length * W + 40, height: H + 30 });
    shown.forEach(function (d, i) {
      var x = 30 + i * W, hs = (d.saved.tokens / max) * H, hp = (d.spent.tokens / max) * H;
      svg.appendChild(M.s("rect", { class: "bar-spent", x: x, y: H - hp, width: 8, height: hp },
        M.s("title", null, d.day + ": " + M.int(d.spent.tokens) + " tokens spent")));
      svg.appendChild(M.s("rect", { class: "bar-saved", x: x + 9, y: H - hs, width: 8, height: hs },
        M.s("title", null, d.day + ": " + M.int(d.saved.tokens) + " tokens saved")));
      if (i % Math.ceil(shown.length / 8) === 0) {
        svg.appendChild(M.s("text", { x: x, y: H + 16, class: "axis" }, d.day.slice(5)));
      }
    });
    return h("div", { class: "chart-box" }, svg,
      h("span", { class: "key bar-saved-key" }, "tokens saved"),
      h("span", { class: "key bar-spent-key" }, "tokens spent"));
  }

  /* -- routing -------------------------------------------------------------------- */

  function route() {
    var hash = location.hash.replace(/^#/, "");
    var parts = hash.split("/");
    if (parts[0] === "run" && parts[1]) return runPage(parts[1], parts[3] || null);
    state.current = null;
    if (parts[0] === "savings") return savingsPage();
    return runsPage();
  }

  M.ask("summary").then(function (s) {
    document.getElementById("store").textContent = s.store + (M.boot.mode === "file"
      ? " · written " + M.when(s.generated_at) : " · live, read only");
  }, function () {});
  if (!location.hash && M.boot.focus) location.hash = "#run/" + M.boot.focus;
  window.addEventListener("hashchange", route);
  route();
})();
