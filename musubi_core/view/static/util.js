/* musubi view: shared helpers (the page's data source, DOM building, formatting).
   Every value from the store reaches the page through textContent or an attribute, never
   as HTML. */
"use strict";
var M = (window.M = {});

M.boot = JSON.parse(document.getElementById("musubi-data").textContent);

/* The answer to a question: from the file, or asked of the server that served the page. */
M.NotInFile = function (path) {
  this.path = path;
  this.message =
    "not in this file: `musubi view --run RUN --out FILE.html` writes one run's details, " +
    "and `musubi view --serve` answers every question";
};
M.cache = {};
M.ask = function (path) {
  if (M.boot.mode === "file") {
    var answers = M.boot.answers;
    if (Object.prototype.hasOwnProperty.call(answers, path)) {
      return Promise.resolve(answers[path]);
    }
    return Promise.reject(new M.NotInFile(path));
  }
  if (M.cache[path]) return M.cache[path];
  var got = fetch("api/" + path, { headers: { Accept: "application/json" } }).then(function (r) {
    if (!r.ok) {
      return r.text().then(function (t) {
        delete M.cache[path];
        throw new Error(t || r.statusText);
      });
    }
    return r.json();
  });
  if (path.indexOf("runs") !== 0 && path !== "summary") M.cache[path] = got;
  return got;
};

/* h("div", {class: "x", onclick: fn}, child, "text", [more]) */
M.h = function (tag, attrs) {
  var el = document.createElement(tag);
  M.fill(el, attrs, Array.prototype.slice.call(arguments, 2));
  return el;
};
M.SVG = "http://www.w3.org/2000/svg";
M.s = function (tag, attrs) {
  var el = document.createElementNS(M.SVG, tag);
  M.fill(el, attrs, Array.prototype.slice.call(arguments, 2));
  return el;
};
M.fill = function (el, attrs, children) {
  if (attrs) {
    Object.keys(attrs).forEach(function (k) {
      var v = attrs[k];
      if (v === null || v === undefined || v === false) return;
      if (k.slice(0, 2) === "on") el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    });
  }
  M.append(el, children);
  return el;
};
M.append = function (el, children) {
  (children || []).forEach(function (c) {
    if (c === null || c === undefined || c === false) return;
    if (Array.isArray(c)) M.append(el, c);
    else el.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
  });
};
M.clear = function (el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
};

M.int = function (n) {
  return n === null || n === undefined ? "-" : Number(n).toLocaleString("en-US");
};
M.duration = function (s) {
  if (s === null || s === undefined) return "-";
  if (s < 1) return s < 0.01 ? (s * 1000).toFixed(1) + "ms" : Math.round(s * 1000) + "ms";
  if (s < 60) return s.toFixed(2) + "s";
  var m = Math.floor(Math.round(s) / 60), sec = Math.round(s) % 60;
  if (m < 60) return m + "m" + String(sec).padStart(2, "0") + "s";
  var hr = Math.floor(m / 60);
  if (hr < 24) return hr + "h" + String(m % 60).padStart(2, "0") + "m";
  return Math.floor(hr / 24) + "d" + String(hr % 24).padStart(2, "0") + "h";
};
M.money = function (v) {
  if (v === null || v === undefined) return "-";
  if (v === 0 || v >= 0.01) {
    return "$" + v.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  }
  return "$" + v.toFixed(6).replace(/0+$/, "");
};
M.when = function (ts) {
  if (!ts) return "-";
  var d = new Date(ts * 1000), p = function (x) { return String(x).padStart(2, "0"); };
  return d.getFullYear() + "-" + p(d.getMonth() + 1) + "-" + p(d.getDate()) + " " +
    p(d.getHours()) + ":" + p(d.getMinutes()) + ":" + p(d.getSeconds());
};
M.short = function (id) { return id ? id.slice(0, 12) : "-"; };
M.clip = function (t, n) {
  t = t === null || t === undefined ? "" : String(t);
  return t.length <= n ? t : t.slice(0, n - 1) + "…";
};

/* The colour family of a kind of call (the CSS has one class per family). */
M.family = function (kind) {
  if (kind === "chat_model" || kind === "llm") return "model";
  if (kind === "embedding") return "embedding";
  if (kind === "retriever") return "retriever";
  if (kind === "tool") return "tool";
  if (kind === "step" || kind === "run_step" || kind === "sleep" || kind === "kv") return "step";
  return "chain";
};

M.error = function (where, err) {
  var text = err && err.message ? err.message : String(err);
  return M.h("p", { class: err instanceof M.NotInFile ? "notice" : "error" }, where + ": " + text);
};

M.cards = function (items) {
  return M.h("div", { class: "cards" }, items.map(function (it) {
    return M.h("div", { class: "card", "data-testid": it.id },
      M.h("div", { class: "card-value" }, it.value),
      M.h("div", { class: "card-label" }, it.label));
  }));
};
