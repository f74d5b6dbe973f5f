/* musubi view: a run's graph. Calls are boxes coloured by kind; contains edges (the call
   tree) are dashed grey, data flows (one call's output fed another) solid blue arrows.
   A large run starts collapsed: a call whose subtree would not fit shows as a group box with
   its count, and a long row of like siblings (same kind and operation) as one cluster box;
   clicking a group's count or a cluster expands it. dagre lays the visible boxes out. */
"use strict";
(function () {
  var BOX_W = 200, BOX_H = 58;
  var BUDGET = 140; // boxes shown when a run opens
  var CLUSTER_MIN = 6; // like siblings in a row that make a cluster
  var CLUSTER_PAGE = 100; // members an open cluster shows at a time

  function Model(answer) {
    var cols = answer.columns, self = this;
    this.run = answer.run;
    this.calls = answer.calls.map(function (row) {
      var c = {};
      cols.forEach(function (name, i) { c[name] = row[i]; });
      c.children = [];
      return c;
    });
    this.byId = {};
    this.calls.forEach(function (c) { self.byId[c.id] = c; });
    this.roots = [];
    this.calls.forEach(function (c) {
      var p = c.parent && self.byId[c.parent];
      if (p) p.children.push(c); else self.roots.push(c);
    });
    // Descendant counts, children before parents (calls come in start order).
    for (var i = this.calls.length - 1; i >= 0; i--) {
      var c = this.calls[i];
      c.desc = c.children.reduce(function (n, k) { return n + 1 + k.desc; }, 0);
    }
    this.flows = answer.flows.filter(function (f) { return self.byId[f[0]] && self.byId[f[1]]; });
    this.expanded = {};
    this.clusters = {}; // cluster key -> members shown
    this.whatif = null; // {nodes: set of node ids}
    this.selected = null;
  }

  /* The items a call's children show as: calls, and clusters of like siblings. */
  Model.prototype.items = function (parentKey, children) {
    var out = [], i = 0;
    while (i < children.length) {
      var j = i + 1, a = children[i];
      while (j < children.length && children[j].kind === a.kind && children[j].op === a.op) j++;
      var run = children.slice(i, j);
      if (run.length >= CLUSTER_MIN) {
        var key = parentKey + "|" + a.id;
        var shown = this.clusters[key] || 0;
        run.slice(0, shown).forEach(function (c) { out.push({ call: c }); });
        if (shown < run.length) out.push({ cluster: key, members: run.slice(shown), all: run });
      } else {
        run.forEach(function (c) { out.push({ call: c }); });
      }
      i = j;
    }
    return out;
  };

  /* Expand breadth first while the boxes fit the budget. */
  Model.prototype.openDefault = function () {
    var self = this, shown = this.items("root", this.roots).length, queue = [];
    this.items("root", this.roots).forEach(function (it) { if (it.call) queue.push(it.call); });
    while (queue.length) {
      var c = queue.shift();
      if (!c.children.length) continue;
      var its = self.items(c.id, c.children);
      if (shown + its.length > BUDGET) continue;
      self.expanded[c.id] = true;
      shown += its.length;
      its.forEach(function (it) { if (it.call) queue.push(it.call); });
    }
  };

  Model.prototype.expandAll = function () {
    var self = this;
    this.calls.forEach(function (c) {
      if (c.children.length) self.expanded[c.id] = true;
    });
    // Every cluster shows all its members.
    this.clusters = new Proxy({}, { get: function () { return Infinity; } });
  };

  /* The visible boxes, the box standing for every call (itself, its group or cluster), and
     the edges between boxes. */
  Model.prototype.visible = function () {
    var self = this, boxes = [], rep = {}, contains = [];
    function hide(c, box) {
      rep[c.id] = box;
      c.children.forEach(function (k) { hide(k, box); });
    }
    function show(items, parentBox) {
      items.forEach(function (it) {
        if (it.cluster) {
          var box = { id: "cluster:" + it.cluster, cluster: it.cluster, members: it.members,
                      all: it.all };
          boxes.push(box);
          it.members.forEach(function (m) { hide(m, box.id); });
          if (parentBox) contains.push([parentBox, box.id]);
          return;
        }
        var c = it.call;
        var b = { id: c.id, call: c, open: !!self.expanded[c.id] };
        boxes.push(b);
        rep[c.id] = c.id;
        if (parentBox) contains.push([parentBox, c.id]);
        if (b.open) show(self.items(c.id, c.children), c.id);
        else c.children.forEach(function (k) { hide(k, c.id); });
      });
    }
    show(this.items("root", this.roots), null);
    var seen = {}, data = [];
    this.flows.forEach(function (f) {
      var a = rep[f[0]], b = rep[f[1]];
      if (!a || !b || a === b) return;
      var key = a + ">" + b;
      if (seen[key]) { seen[key].n++; return; }
      seen[key] = { from: a, to: b, n: 1 };
      data.push(seen[key]);
    });
    return { boxes: boxes, rep: rep, contains: contains, data: data };
  };

  function layout(view) {
    var g = new dagre.graphlib.Graph();
    g.setGraph({ rankdir: "TB", nodesep: 14, ranksep: 34, edgesep: 8, marginx: 24, marginy: 24 });
    g.setDefaultEdgeLabel(function () { return {}; });
    view.boxes.forEach(function (b) { g.setNode(b.id, { width: BOX_W, height: BOX_H }); });
    view.contains.forEach(function (e) { g.setEdge(e[0], e[1], { kind: "contains" }); });
    view.data.forEach(function (e) {
      var had = g.edge(e.from, e.to);
      g.setEdge(e.from, e.to, { kind: had ? "both" : "data", n: e.n });
    });
    dagre.layout(g);
    return g;
  }

  function path(points) {
    var d = "M" + points[0].x + "," + points[0].y;
    for (var i = 1; i < points.length; i++) d += " L" + points[i].x + "," + points[i].y;
    return d;
  }

  function label(b) {
    if (b.cluster) {
      var m = b.members, replayed = 0, tokens = 0;
      m.forEach(function (c) {
        replayed += c.replayed;
        tokens += (c.tokens_in || 0) + (c.tokens_out || 0);
      });
      var inside = m.reduce(function (n, c) { return n + 1 + c.desc; }, 0);
      return {
        title: m[0].op + " ×" + m.length,
        meta: m[0].kind + " · " + inside + " calls" + (replayed ? " · " + replayed + " replayed" : "") +
          (tokens ? " · " + M.int(tokens) + " tok" : ""),
        family: M.family(m[0].kind),
      };
    }
    var c = b.call, tok = (c.tokens_in || 0) + (c.tokens_out || 0);
    return {
      title: c.op,
      meta: c.kind + " · " + M.duration(c.duration) + (tok ? " · " + M.int(tok) + " tok" : ""),
      family: M.family(c.kind),
    };
  }

  /* Draw the model into `host` (an element); `onSelect(call)` on a click on a call box. */
  function Graph(host, model, onSelect) {
    this.host = host;
    this.model = model;
    this.onSelect = onSelect;
    this.view = null;
    this.vb = null;
  }

  Graph.prototype.render = function (keepView) {
    var self = this, model = this.model, started = performance.now();
    var view = (this.view = model.visible());
    var g = (this.g = layout(view));
    var info = g.graph();
    var svg = M.s("svg", { class: "graph", "data-testid": "graph",
                           "data-boxes": view.boxes.length });
    var defs = M.s("defs", null,
      M.s("marker", { id: "arrow-data", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7,
                      markerHeight: 7, orient: "auto-start-reverse" },
        M.s("path", { d: "M0,0 L10,5 L0,10 z", class: "arrow-data" })));
    var root = M.s("g", { class: "viewport" });
    svg.appendChild(defs);
    svg.appendChild(root);
    g.edges().forEach(function (e) {
      var edge = g.edge(e);
      var cls = "edge " + (edge.kind === "contains" ? "contains" : "data");
      var el = M.s("path", { class: cls, d: path(edge.points), "data-from": e.v, "data-to": e.w,
                             "marker-end": edge.kind === "contains" ? null : "url(#arrow-data)" });
      root.appendChild(el);
      if (edge.kind === "both") {
        root.appendChild(M.s("path", { class: "edge contains", d: path(edge.points) }));
      }
    });
    var whatif = model.whatif, inside = {};
    if (whatif) {
      Object.keys(view.rep).forEach(function (id) {
        var c = model.byId[id], box = view.rep[id];
        if (box !== id && c.node && whatif.nodes[c.node]) inside[box] = (inside[box] || 0) + 1;
      });
    }
    view.boxes.forEach(function (b) {
      var n = g.node(b.id), lab = label(b);
      var cls = ["box", "fam-" + lab.family];
      var attrs = { transform: "translate(" + (n.x - BOX_W / 2) + "," + (n.y - BOX_H / 2) + ")" };
      var hits = inside[b.id] || 0;
      if (b.cluster) {
        cls.push("cluster");
        attrs["data-testid"] = "cluster-box";
        attrs["data-cluster"] = b.cluster;
        attrs["data-count"] = b.members.length;
      } else {
        var c = b.call;
        attrs["data-testid"] = "call-box";
        attrs["data-call-id"] = c.id;
        attrs["data-kind"] = c.kind;
        if (c.replayed) cls.push("replayed");
        if (c.node_status === "stale") cls.push("stale");
        if (c.status === "failed") cls.push("failed");
        if (!b.open && c.desc) cls.push("group");
        if (model.selected === c.id) cls.push("selected");
        if (whatif && c.node && whatif.nodes[c.node]) cls.push("whatif");
      }
      if (hits) cls.push("whatif-inside");
      attrs.class = cls.join(" ");
      var box = M.s("g", attrs,
        M.s("rect", { width: BOX_W, height: BOX_H, rx: 7 }),
        M.s("text", { class: "title", x: 10, y: 19 }, M.clip(lab.title, 27)),
        M.s("text", { class: "meta", x: 10, y: 36 }, M.clip(lab.meta, 34)));
      var tags = [];
      if (b.call && b.call.replayed) tags.push(["replayed", "↺ replayed"]);
      if (b.call && b.call.node_status === "stale") tags.push(["stale", "stale"]);
      if (b.call && b.call.status === "failed") tags.push(["failed", "failed"]);
      if (hits) tags.push(["whatif", hits + " inside recompute"]);
      var x = 10;
      tags.forEach(function (t) {
        box.appendChild(M.s("text", { class: "tag tag-" + t[0], x: x, y: 51 }, t[1]));
        x += t[1].length * 6.2 + 8;
      });
      if (b.cluster || (!b.open && b.call.desc)) {
        var count = b.cluster ? "▸ " + b.members.length : "▸ " + b.call.desc + " calls";
        var ex = M.s("g", { class: "expander", "data-testid": "expand",
                            transform: "translate(" + (BOX_W - 74) + "," + (BOX_H - 19) + ")" },
          M.s("rect", { width: 68, height: 15, rx: 7 }),
          M.s("text", { x: 34, y: 11, "text-anchor": "middle" }, M.clip(count, 12)));
        ex.addEventListener("click", function (ev) {
          ev.stopPropagation();
          self.expand(b);
        });
        box.appendChild(ex);
      }
      box.addEventListener("click", function () {
        if (b.cluster) self.expand(b);
        else self.onSelect(b.call);
      });
      box.addEventListener("dblclick", function (ev) {
        ev.preventDefault();
        if (b.call && b.call.children.length) {
          model.expanded[b.call.id] = !b.open;
          self.render(true);
        }
      });
      root.appendChild(box);
    });
    M.clear(this.host).appendChild(svg);
    this.svg = svg;
    this.root = root;
    this.size = { w: info.width || 400, h: info.height || 200 };
    if (!keepView || !this.vb) this.fit(); else this.apply();
    if (model.selected && g.hasNode(model.selected)) this.center(g.node(model.selected));
    this.bindPanZoom(svg);
    this.host.setAttribute("data-render-ms", Math.round(performance.now() - started));
  };

  Graph.prototype.expand = function (b) {
    var focus;
    if (b.cluster) {
      var shown = (this.model.clusters[b.cluster] || 0) + CLUSTER_PAGE;
      this.model.clusters[b.cluster] = Math.min(shown, b.all.length);
      focus = b.members[0].id;
    } else {
      this.model.expanded[b.call.id] = true;
      focus = b.call.id;
    }
    this.render(true);
    // Bring what opened into view, its parent at the top.
    var n = this.g.hasNode(focus) ? this.g.node(focus) : null;
    if (n) {
      this.vb = { x: n.x - this.vb.w / 2, y: n.y - BOX_H, w: this.vb.w, h: this.vb.h };
      this.apply();
    }
  };

  Graph.prototype.fit = function () {
    var r = this.host.getBoundingClientRect();
    var rw = r.width || 800, rh = r.height || 500;
    var w = Math.max(this.size.w, 10), h = Math.max(this.size.h, 10);
    // The whole graph when it fits at a readable scale; else its start (left), readable.
    var least = this.view.boxes.length <= 60 ? 0.42 : 0.6;
    var fits = Math.min(rw / w, rh / h), scale = Math.min(1.1, Math.max(fits, least));
    var vw = rw / scale, vh = rh / scale;
    // A graph wider than the view opens on its first root, at the top.
    var root = this.view.boxes.length ? this.g.node(this.view.boxes[0].id) : null;
    var x = vw >= w ? (w - vw) / 2 : Math.max(0, Math.min(w - vw, (root ? root.x : 0) - vw / 2));
    this.vb = { x: x, y: vh >= h ? (h - vh) / 2 : 0, w: vw, h: vh };
    this.apply();
  };

  /* Pan so that a box (a dagre node) is in view, when it is not. */
  Graph.prototype.center = function (n) {
    var v = this.vb;
    if (n.x - BOX_W / 2 >= v.x && n.x + BOX_W / 2 <= v.x + v.w &&
        n.y - BOX_H / 2 >= v.y && n.y + BOX_H / 2 <= v.y + v.h) return;
    this.vb = { x: n.x - v.w / 2, y: n.y - v.h / 2, w: v.w, h: v.h };
    this.apply();
  };

  Graph.prototype.apply = function () {
    var v = this.vb;
    this.svg.setAttribute("viewBox", v.x + " " + v.y + " " + v.w + " " + v.h);
  };

  Graph.prototype.bindPanZoom = function (svg) {
    var self = this, drag = null;
    svg.addEventListener("wheel", function (ev) {
      ev.preventDefault();
      var r = svg.getBoundingClientRect(), v = self.vb;
      var k = ev.deltaY > 0 ? 1.15 : 1 / 1.15;
      var px = v.x + ((ev.clientX - r.left) / r.width) * v.w;
      var py = v.y + ((ev.clientY - r.top) / r.height) * v.h;
      self.vb = { x: px - (px - v.x) * k, y: py - (py - v.y) * k, w: v.w * k, h: v.h * k };
      self.apply();
    }, { passive: false });
    svg.addEventListener("mousedown", function (ev) {
      drag = { x: ev.clientX, y: ev.clientY, vb: self.vb };
    });
    window.addEventListener("mousemove", function (ev) {
      if (!drag) return;
      var r = svg.getBoundingClientRect();
      var dx = ((ev.clientX - drag.x) / r.width) * drag.vb.w;
      var dy = ((ev.clientY - drag.y) / r.height) * drag.vb.h;
      self.vb = { x: drag.vb.x - dx, y: drag.vb.y - dy, w: drag.vb.w, h: drag.vb.h };
      self.apply();
    });
    window.addEventListener("mouseup", function () { drag = null; });
  };

  /* Scroll a call's box into view (after a what-if or a click in the details). */
  Graph.prototype.reveal = function (callId) {
    var model = this.model, c = model.byId[callId];
    if (!c) return;
    for (var p = c.parent && model.byId[c.parent]; p; p = p.parent && model.byId[p.parent]) {
      model.expanded[p.id] = true;
    }
    this.render(true);
  };

  M.graph = { Model: Model, Graph: Graph, BUDGET: BUDGET };
})();
