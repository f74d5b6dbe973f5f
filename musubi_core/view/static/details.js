/* musubi view: a call's details (previews, kept value, what flowed into it, its node and the
   node's calls, the replay decision) and what-if (what invalidating its node recomputes). */
"use strict";
(function () {
  var h = M.h;
  var UPSTREAM_VALUES = 12; // nearest upstream calls whose previews and values are shown

  function section(title, testid, body) {
    return h("section", { class: "panel-section", "data-testid": testid },
      h("h3", null, title), body);
  }

  function field(name, value) {
    if (value === null || value === undefined || value === "") return null;
    return [h("dt", null, name), h("dd", null, value)];
  }

  function pre(text, testid) {
    return h("pre", { class: "preview", "data-testid": testid }, text || "-");
  }

  function keptView(kept, testid) {
    if (!kept || !kept.value) return h("p", { class: "muted", "data-testid": testid }, "(not kept)");
    var v = kept.value;
    if (v.documents) {
      return h("ol", { class: "documents", "data-testid": testid }, v.documents.map(function (d) {
        return h("li", { "data-testid": "document" },
          d.score ? h("span", { class: "score" }, "score " + d.score) : null,
          h("span", { class: "doc-text" }, d.text),
          d.metadata ? h("span", { class: "muted" }, " " + d.metadata) : null);
      }));
    }
    var raw = h("details", { class: "raw" }, h("summary", null, "the stored value"),
      h("pre", { class: "preview" }, v.text));
    if (v.answer !== undefined) {
      return h("div", { "data-testid": testid },
        h("pre", { class: "preview answer", "data-testid": "kept-answer" }, v.answer), raw);
    }
    return h("pre", { class: "preview", "data-testid": testid }, v.text);
  }

  function decisionView(d) {
    var now = d.now;
    return h("div", { class: "decision" },
      h("p", { "data-testid": "decision" },
        h("strong", null, d.decision), " (", h("code", null, d.reason), "): ", d.detail),
      now ? h("p", { class: "muted", "data-testid": "decision-now" },
        "A call reaching this node now would ", h("strong", null, now.replay ? "replay" : "execute"),
        " (", h("code", null, now.reason), ")", now.detail ? ": " + now.detail : "") : null);
  }

  function upstreamView(call, ctx) {
    if (!call.upstream.length) return h("p", { class: "muted" }, "Nothing flowed into this call.");
    var list = h("ol", { class: "upstream" });
    call.upstream.forEach(function (u, i) {
      var item = h("li", { "data-testid": "upstream-call", "data-call-id": u.id },
        h("a", { href: "#", class: "call-link", onclick: function (ev) {
          ev.preventDefault();
          ctx.select(u.id);
        } }, u.op), " ", h("span", { class: "chip fam-" + M.family(u.kind) }, u.kind),
        u.direct ? h("span", { class: "chip" }, "direct input") : null);
      list.appendChild(item);
      if (i < UPSTREAM_VALUES || u.kind === "retriever" || u.kind === "tool") {
        var slot = h("div", { class: "upstream-value" });
        item.appendChild(slot);
        M.ask("kept/" + u.id).then(function (k) {
          M.append(slot, [
            k.output_preview ? h("div", { class: "muted" }, "output: " + k.output_preview) : null,
            k.value && k.value.documents ? keptView(k, "upstream-documents") : null,
          ]);
        }, function () {});
      }
    });
    var more = call.upstream_total - call.upstream.length;
    return h("div", null, list,
      more > 0 ? h("p", { class: "muted" }, more + " more upstream call(s) not listed") : null,
      call.upstream_cut ? h("p", { class: "muted" }, "(the walk stopped at its limit)") : null);
  }

  function historyView(call, ctx) {
    if (!call.history.length) return h("p", { class: "muted" }, "(no node: nothing to replay)");
    return h("table", { class: "small", "data-testid": "history-table" },
      h("thead", null, h("tr", null, ["started", "run", "replayed", "took", "status"].map(
        function (t) { return h("th", null, t); }))),
      h("tbody", null, call.history.map(function (c) {
        return h("tr", { class: c.id === call.call_id ? "current" : null,
                         "data-testid": "history-row", "data-call-id": c.id },
          h("td", null, M.when(c.started)),
          h("td", null, h("a", { href: "#run/" + c.run_id }, M.short(c.run_id))),
          h("td", null, c.replayed ? "yes" : "-"), h("td", null, M.duration(c.duration)),
          h("td", null, c.status));
      })));
  }

  /* Fill `host` with call `id`'s details; ctx: {model, select(id), whatif(nodeId)}. */
  function show(host, id, ctx) {
    M.clear(host).appendChild(h("p", { class: "loading" }, "Loading…"));
    return Promise.all([M.ask("call/" + id), M.ask("kept/" + id).catch(function () { return null; })])
      .then(function (got) {
        var call = got[0], kept = got[1], node = call.node;
        var tokens = call.tokens_in || call.tokens_out
          ? M.int(call.tokens_in || 0) + " in, " + M.int(call.tokens_out || 0) + " out" : null;
        M.clear(host);
        M.append(host, [
          h("div", { class: "panel-head", "data-testid": "details", "data-call-id": call.call_id },
            h("h2", null, call.op_name),
            h("span", { class: "chip fam-" + M.family(call.kind) }, call.kind),
            call.replayed ? h("span", { class: "chip replayed" }, "↺ replayed") : null,
            node && node.status === "stale" ? h("span", { class: "chip stale" }, "stale") : null,
            call.status === "failed" ? h("span", { class: "chip failed" }, "failed") : null),
          h("dl", { class: "fields" },
            field("call", call.call_id), field("model", call.model), field("started", M.when(call.started_at)),
            field("took", M.duration(call.duration_s)), field("tokens", tokens),
            field("saved", call.saved_s ? M.duration(call.saved_s) : null),
            field("node", node ? M.short(node.node_id) + " (" + node.status +
              (node.stale_cause ? ", " + node.stale_cause : "") + "; executed " +
              node.exec_count + "×, replayed " + node.replay_count + "×)" : null),
            field("error", call.error)),
          section("Replay decision", "decision-section", decisionView(call.decision)),
          section("Input", "input-section", pre(call.input_preview, "call-input")),
          section("Output", "output-section", pre(call.output_preview, "call-output")),
          section("Kept value", "kept-section", keptView(kept, "call-kept")),
          section("What flowed in (upstream)", "upstream", upstreamView(call, ctx)),
          section("The node's calls", "history", historyView(call, ctx)),
          node ? section("What if", "whatif-section", h("div", null,
            h("button", { "data-testid": "whatif-button", onclick: function () {
              ctx.whatif(node.node_id);
            } }, "What would invalidating this node recompute?"),
            h("div", { id: "whatif-result" }))) : null,
        ]);
      }, function (err) {
        M.clear(host).appendChild(M.error("call " + id, err));
      });
  }

  /* The what-if answer into `host`, and the run's calls it would recompute. */
  function whatif(host, answer, model, ctx) {
    var nodes = {};
    answer.nodes.forEach(function (n) { nodes[n.node_id] = n; });
    var here = model.calls.filter(function (c) { return c.node && nodes[c.node]; });
    var inRun = {};
    here.forEach(function (c) { inRun[c.node] = true; });
    var elsewhere = answer.nodes.filter(function (n) { return !inRun[n.node_id]; }).length;
    M.clear(host);
    M.append(host, [
      h("div", { class: "whatif", "data-testid": "whatif", "data-nodes": answer.nodes.length,
                 "data-tokens": answer.tokens },
        h("p", null, "Invalidating node ", h("code", null, M.short(answer.node_id)), " marks ",
          h("strong", { "data-testid": "whatif-count" }, answer.nodes.length + " node(s)"),
          " stale; recomputing them costs about ",
          h("strong", { "data-testid": "whatif-tokens" }, M.int(answer.tokens) + " tokens"), ", ",
          h("strong", null, M.duration(answer.seconds)),
          answer.money !== null ? [", ", h("strong", null, M.money(answer.money))] : null,
          " (what they cost when they last ran)."),
        h("p", null, h("code", null, answer.command)),
        h("h4", null, here.length + " call(s) of this run would recompute" +
          (elsewhere ? "; " + elsewhere + " node(s) are reached by other runs only" : "")),
        h("ul", { class: "whatif-calls" }, here.map(function (c) {
          return h("li", { "data-testid": "whatif-call", "data-call-id": c.id },
            h("a", { href: "#", onclick: function (ev) { ev.preventDefault(); ctx.select(c.id); } },
              c.op), " ", h("span", { class: "chip fam-" + M.family(c.kind) }, c.kind), " ",
            M.int((c.tokens_in || 0) + (c.tokens_out || 0)) + " tok, " + M.duration(c.saved || c.duration));
        })),
        h("table", { class: "small" },
          h("thead", null, h("tr", null, ["node", "kind", "operation", "status", "tokens", "took"]
            .map(function (t) { return h("th", null, t); }))),
          h("tbody", null, answer.nodes.map(function (n) {
            return h("tr", { "data-testid": "whatif-node", "data-node-id": n.node_id },
              h("td", null, h("code", null, M.short(n.node_id))), h("td", null, n.kind),
              h("td", null, M.clip(n.op_name, 40)), h("td", null, n.status),
              h("td", null, M.int(n.tokens)), h("td", null, M.duration(n.duration_s)));
          }))),
        h("button", { onclick: function () { ctx.whatif(null); } }, "Clear what-if")),
    ]);
    return nodes;
  }

  M.details = { show: show, whatif: whatif };
})();
