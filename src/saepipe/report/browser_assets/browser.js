/* saepipe feature browser: a static page over data files that call SAEBrowser.receive(name, data).
 * Views follow the URL hash: #list, #feature=123, #search=text (so deep links, back and forward work).
 * Plain DOM and ES2017, no network: data scripts are added as <script> elements, which file:// allows. */
(function () {
  "use strict";

  var PAGE = 200;  // rows added to the list at a time (index.list_page where given)
  var state = {index: null, order: [], shown: 0, sort: {key: "density", dir: "desc"},
               chunks: {}, waiting: {}, tokens: null, rendered: null};

  // ---- data files ---------------------------------------------------------------------------------
  function receive(name, data) {
    if (name === "index") { start(data); return; }
    state.chunks[name] = data;
    (state.waiting[name] || []).forEach(function (w) { w.resolve(data); });
    delete state.waiting[name];
  }

  function load(name, src) {
    if (state.chunks[name]) return Promise.resolve(state.chunks[name]);
    return new Promise(function (resolve, reject) {
      var first = !state.waiting[name];
      (state.waiting[name] = state.waiting[name] || []).push({resolve: resolve, reject: reject});
      if (!first) return;
      var script = document.createElement("script");
      script.src = src;
      script.onerror = function () {
        (state.waiting[name] || []).forEach(function (w) { w.reject(new Error("could not load " + src)); });
        delete state.waiting[name];
        script.remove();
      };
      document.body.appendChild(script);
    });
  }

  function chunkOf(position) {
    var n = state.index.features.chunk[position];
    return load("features-" + String(n).padStart(4, "0"), state.index.chunks[n]);
  }

  // ---- small helpers ------------------------------------------------------------------------------
  function el(tag, attrs) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") node.textContent = attrs[k];
      else if (k === "className") node.className = attrs[k];
      else if (attrs[k] !== null && attrs[k] !== undefined) node.setAttribute(k, attrs[k]);
    });
    for (var i = 2; i < arguments.length; i++) {
      var child = arguments[i];
      if (child === null || child === undefined) continue;
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function num(v, digits) {
    if (v === null || v === undefined) return "–";
    if (Number.isInteger(v)) return v.toLocaleString("en");
    var s = Number(v).toPrecision(digits || 4);
    return s.indexOf(".") < 0 ? s : s.replace(/0+(e|$)/, "$1").replace(/\.(e|$)/, "$1");
  }

  function percent(v) { return v > 0 ? num(100 * v, 3) + "%" : "0"; }

  function visible(piece) {  // a token as it should read inline: line breaks and tabs shown, not performed
    return piece.replace(/\r/g, "\\r").replace(/\n/g, "↵").replace(/\t/g, "⇥");
  }

  function mark(name) {  // timings for measurement: performance.getEntriesByName(name)
    if (window.performance && performance.mark) performance.mark(name);
  }

  function quoted(piece) { return "“" + visible(piece) + "”"; }

  function featureLink(id, label) {
    return el("a", {href: "#feature=" + id, className: "feature-link", "data-feature": id,
                    text: label || ("feature " + id)});
  }

  function positionOf(id) { return state.positions[id]; }

  function topTokensText(position) {
    var top = state.index.features.top[position];
    return top.length ? top.map(quoted).join(" ") : "";
  }

  // ---- header ---------------------------------------------------------------------------------------
  function renderRunInfo(info) {
    var dl = document.getElementById("run-info");
    function add(label, value) {
      if (value === null || value === undefined || typeof value === "object") return;
      dl.appendChild(el("div", {}, el("dt", {text: label}), el("dd", {text: typeof value === "number" ? num(value) : String(value)})));
    }
    Object.keys(info || {}).forEach(function (k) {
      if (k === "run_name") return;
      var v = info[k];
      if (v && typeof v === "object" && !Array.isArray(v)) Object.keys(v).forEach(function (s) { add(s, v[s]); });
      else add(k, v);
    });
  }

  // ---- feature list -----------------------------------------------------------------------------------
  function listOrder() {
    var f = state.index.features, alive = document.getElementById("filter-alive").value;
    var text = document.getElementById("filter-text").value.trim().toLowerCase();
    var key = state.sort.key, sign = state.sort.dir === "asc" ? 1 : -1;
    var out = [];
    for (var i = 0; i < f.id.length; i++) {
      if (alive === "alive" && !f.alive[i]) continue;
      if (alive === "dead" && f.alive[i]) continue;
      if (text) {
        var hay = f.top[i].join("\u0000").toLowerCase() + (f.explanation && f.explanation[i] ? "\u0000" + f.explanation[i].toLowerCase() : "");
        if (hay.indexOf(text) < 0) continue;
      }
      out.push(i);
    }
    var values = f[key];
    out.sort(function (a, b) { return sign * (values[a] - values[b]) || f.id[a] - f.id[b]; });
    return out;
  }

  function listRow(i) {
    var f = state.index.features;
    var row = el("tr", {"data-feature": f.id[i], className: f.alive[i] ? "" : "dead"},
      el("td", {}, featureLink(f.id[i], String(f.id[i]))),
      el("td", {className: "number"}, f.alive[i] ? percent(f.density[i]) : "dead"),
      el("td", {className: "number"}, num(f.max[i])),
      el("td", {className: "tokens", text: topTokensText(i)}));
    if (f.explanation) row.appendChild(el("td", {text: f.explanation[i] || ""}));
    return row;
  }

  function showMore() {
    var body = document.getElementById("feature-rows"), frag = document.createDocumentFragment();
    var stop = Math.min(state.shown + PAGE, state.order.length);
    for (var n = state.shown; n < stop; n++) frag.appendChild(listRow(state.order[n]));
    body.appendChild(frag);
    state.shown = stop;
    document.getElementById("show-more").hidden = state.shown >= state.order.length;
    document.getElementById("list-status").textContent = "Showing " + state.shown.toLocaleString("en") + " of " +
      state.order.length.toLocaleString("en") + " matching features (" + state.index.features.id.length.toLocaleString("en") + " in all).";
  }

  function renderList() {
    state.order = listOrder();
    state.shown = 0;
    document.getElementById("feature-rows").textContent = "";
    document.querySelectorAll("#feature-table th[data-key]").forEach(function (th) {
      if (th.dataset.key === state.sort.key) th.setAttribute("aria-sort", state.sort.dir === "asc" ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    });
    showMore();
  }

  function sortBy(key) {
    if (state.sort.key === key) state.sort.dir = state.sort.dir === "asc" ? "desc" : "asc";
    else state.sort = {key: key, dir: key === "id" ? "asc" : "desc"};
    renderList();
  }

  // ---- one feature ----------------------------------------------------------------------------------
  function shade(value, peak) {
    var t = peak > 0 ? Math.min(1, value / peak) : 1;
    return "hsl(28, 100%, " + Math.round(94 - 44 * t) + "%)";
  }

  function renderExample(example, peak) {
    var text = el("span", {className: "example-text"});
    example.tokens.forEach(function (piece, i) {
      var value = example.activations[i], marked = i === example.marked;
      var node;
      if (value > 0 || marked) {
        node = el(marked ? "mark" : "span", {className: "tok fire" + (marked ? " marked" : ""),
          title: "activation " + value + (marked ? " (this example's token)" : ""), "data-activation": value,
          style: value > 0 ? "background-color: " + shade(value, peak) : null}, visible(piece));
      } else {
        node = el("span", {className: "tok"}, visible(piece));
      }
      text.appendChild(node);
    });
    return el("li", {className: "example"},
      el("span", {className: "example-value", title: "activation on the marked token"}, num(example.activation)),
      exampleSource(example), text);
  }

  function documentName(doc) {  // index.documents: names, and each document's index into them (-1: none)
    var d = state.index.documents;
    var i = d && doc >= 0 && doc < d.of.length ? d.of[doc] : -1;
    return i >= 0 ? d.names[i] : null;
  }

  function exampleSource(example) {  // the chapter (with its subject) first, then where in the corpus
    var name = documentName(example.doc), at = "doc " + example.doc + ", pos " + example.position;
    return el("span", {className: "example-where",
                       title: (name ? name + ": " : "") + "document " + example.doc + ", token " + example.position},
      name ? el("span", {className: "example-document", text: name}) : null,
      el("span", {className: "example-position", text: at}));
  }

  function exampleList(examples, peak, label) {
    if (!examples || !examples.length) return el("p", {text: "No examples."});
    var list = el("ol", {className: "examples", "aria-label": label});
    examples.forEach(function (e) { list.appendChild(renderExample(e, peak)); });
    return list;
  }

  function tokenList(items, key, label) {
    var list = el("ol", {className: "token-list", "aria-label": label});
    (items || []).forEach(function (t) {
      // A top token's share of its own occurrences (summaries' token_share): a common token can hold many
      // firings and still be a poor sign of the feature.
      var share = t.token_share === undefined ? null : el("span", {className: "token-share",
        title: "the share of this token's occurrences the feature fires on",
        text: " (" + Math.round(t.token_share * 100) + "% of its uses)"});
      list.appendChild(el("li", {}, el("code", {text: quoted(t.token)}), " ", el("span", {className: "number", text: num(t[key])}), share));
    });
    return items && items.length ? list : el("p", {text: "None."});
  }

  function neighbourList(items, describe, label, cls) {
    if (!items || !items.length) return el("p", {text: "None."});
    var list = el("ol", {className: "neighbours " + cls, "aria-label": label});
    items.forEach(function (n) {
      var p = positionOf(n.id);
      list.appendChild(el("li", {}, featureLink(n.id), " ", describe(n),
        p === undefined ? null : el("span", {className: "tokens", text: " " + topTokensText(p)})));
    });
    return list;
  }

  function section(title) {
    var s = el("section", {}, el("h3", {text: title}));
    for (var i = 1; i < arguments.length; i++) if (arguments[i]) s.appendChild(arguments[i]);
    return s;
  }

  function stats(r) {
    var dl = el("dl", {className: "stats"});
    function add(label, value) { dl.appendChild(el("div", {}, el("dt", {text: label}), el("dd", {text: value}))); }
    add("status", r.alive ? "alive" : "dead: never fires in the activation DB");
    add("fires on", num(r.count) + " tokens");
    add("density", percent(r.density));
    add("mean activation", num(r.mean));
    add("max activation", num(r.max));
    Object.keys(r.quantiles || {}).forEach(function (q) { add("quantile " + q, num(r.quantiles[q])); });
    return dl;
  }

  function explanation(r) {
    if (!r.explanation) return null;
    var scores = [];
    if (r.detection !== undefined && r.detection !== null) scores.push("detection score " + num(r.detection, 3));
    if (r.fuzzing !== undefined && r.fuzzing !== null) scores.push("fuzzing score " + num(r.fuzzing, 3));
    return section("Explanation", el("p", {id: "explanation", text: r.explanation}),
      scores.length ? el("p", {id: "explanation-scores", text: scores.join(", ")}) : null);
  }

  function renderFeature(id, record) {
    var view = document.getElementById("feature-view"), p = positionOf(id), f = state.index.features;
    view.textContent = "";
    var heading = el("h2", {id: "feature-heading", tabindex: "-1", text: "Feature " + id});
    var nav = el("nav", {className: "pager", "aria-label": "Neighbouring ids"},
      el("a", {href: "#list", text: "All features"}),
      p > 0 ? featureLink(f.id[p - 1], "← feature " + f.id[p - 1]) : null,
      p < f.id.length - 1 ? featureLink(f.id[p + 1], "feature " + f.id[p + 1] + " →") : null);
    view.appendChild(heading);
    view.appendChild(nav);
    view.appendChild(stats(record));
    var expl = explanation(record);
    if (expl) view.appendChild(expl);
    view.appendChild(section("Top tokens", tokenList(record.top_tokens, "count", "tokens it fires on most often")));
    var top = section("Top examples", el("p", {className: "hint",
      text: "Shaded tokens fire; the darker, the stronger (hover for the value). The example's own token is marked."}),
      exampleList(record.top_examples, record.max, "top examples"));
    top.id = "top-examples";
    view.appendChild(top);
    var bands = record.quantile_examples || {};
    var lower = el("section", {id: "quantile-examples"}, el("h3", {text: "Lower activations"}));
    Object.keys(bands).forEach(function (q) {
      lower.appendChild(el("h4", {text: "Around the " + q + " quantile"}));
      lower.appendChild(exampleList(bands[q], record.max, "examples around the " + q + " quantile"));
    });
    view.appendChild(lower);
    var logits = el("div", {className: "columns"},
      section("Promoted tokens (logit lens)", tokenList(record.promoted_tokens, "logit", "promoted tokens")),
      section("Suppressed tokens (logit lens)", tokenList(record.suppressed_tokens, "logit", "suppressed tokens")));
    view.appendChild(logits);
    var related = el("div", {className: "columns"},
      section("Nearest features (decoder cosine)", neighbourList(record.nearest_features,
        function (n) { return "cosine " + num(n.cosine, 3); }, "nearest features", "nearest")),
      section("Co-occurring features (Jaccard)", neighbourList(record.cooccurring_features,
        function (n) { return "Jaccard " + num(n.jaccard, 3) + ", " + num(n.count) + " tokens"; },
        "co-occurring features", "cooccurring")));
    view.appendChild(related);
    view.appendChild(matchesSection(id));
    view.dataset.feature = id;
    document.title = "Feature " + id + " · " + state.title;
    heading.focus();
    mark("feature-rendered");
  }

  // ---- matches in other runs: `saepipe compare --features THIS OTHER` writes ../../matches/index.js ---------
  // Loaded on request (a missing file would be an error in the console of every page), then for every page.
  function matchesSection(id) {
    var node = el("section", {id: "matches"}, el("h3", {text: "Matches in other runs"}));
    if (state.matches) {
      state.matches.then(function (runs) { renderMatches(node, id, runs); });
      return node;
    }
    var button = el("button", {type: "button", id: "load-matches", text: "Show this feature's matches"});
    button.addEventListener("click", function () {
      button.remove();
      state.matches = load("matches", "../../matches/index.js");
      state.matches.then(function (runs) { renderMatches(node, id, runs); }, function () {
        state.matches = null;
        node.appendChild(el("p", {role: "status", text: "No matches yet: `saepipe compare --features THIS_RUN " +
          "OTHER_RUN` matches this run's features to another run's."}));
      });
    });
    node.appendChild(button);
    return node;
  }

  function renderMatches(node, id, runs) {
    var names = Object.keys(runs || {}).filter(function (name) { return runs[name].features[id]; });
    if (!names.length) { node.appendChild(el("p", {text: "None."})); return; }
    var list = el("ul", {className: "matches", "aria-label": "matches in other runs"});
    names.forEach(function (name) {
      var m = runs[name].features[id], href = runs[name].browser;
      function link(j, extra) {
        var label = name + " #" + j + (extra || "");
        return href ? el("a", {href: href + "#feature=" + j, text: label}) : el("span", {text: label});
      }
      var item = el("li", {"data-run": name},
        m[0] >= 0 ? link(m[0]) : el("span", {text: name + ": no latent left to match"}),
        m[0] >= 0 ? " decoder cosine " + num(m[1], 3) + (m[2] === null ? "" : ", activation r " + num(m[2], 3)) : null);
      if (m[3].length > 1) {
        var splits = el("div", {className: "splits"}, "splits into: ");
        m[3].forEach(function (split, k) {
          if (k) splits.appendChild(document.createTextNode(", "));
          splits.appendChild(link(split[0], " (" + num(split[1], 3) + ")"));
        });
        item.appendChild(splits);
      }
      list.appendChild(item);
    });
    node.appendChild(list);
  }

  function showFeature(asked) {  // `asked`: the text after #feature=, as typed
    var id = /^\d+$/.test(asked) ? parseInt(asked, 10) : null;
    var p = id === null ? undefined : positionOf(id), view = document.getElementById("feature-view");
    if (p === undefined) {
      var ids = state.index.features.id, none = asked ? "No feature " + asked : "No feature id given";
      view.textContent = "";
      view.appendChild(el("h2", {id: "feature-heading", tabindex: "-1", text: none}));
      view.appendChild(el("p", {id: "feature-missing", role: "alert"}, none + ": ids are " +
        ids[0] + ".." + ids[ids.length - 1] + ". ", el("a", {href: "#list", text: "All features"})));
      view.dataset.feature = "";
      document.title = none + " · " + state.title;
      document.getElementById("feature-heading").focus();
      return;
    }
    delete view.dataset.feature;
    chunkOf(p).then(function (records) {
      if (state.route !== "feature=" + asked) return;  // the user has moved on
      var record = records.find(function (r) { return r.id === id; });
      renderFeature(id, record);
    }, function (err) {
      view.textContent = "";
      view.appendChild(el("p", {role: "alert", text: "Could not load feature " + id + ": " + err.message}));
    });
  }

  // ---- token search -------------------------------------------------------------------------------------
  function matches(query) {
    var q = query.trim().toLowerCase(), exact = [], prefix = [], inside = [];
    state.tokens.tokens.forEach(function (t) {
      var piece = t[0].trim().toLowerCase();
      if (!piece) return;
      if (piece === q) exact.push(t);
      else if (piece.indexOf(q) === 0) prefix.push(t);
      else if (piece.length >= 3 && q.indexOf(piece) >= 0) inside.push(t);
    });
    inside.sort(function (a, b) { return b[0].trim().length - a[0].trim().length; });
    return {exact: exact, prefix: prefix.slice(0, 10), inside: inside.slice(0, 10)};
  }

  function tokenResult(t) {
    var table = el("table", {className: "token-features"},
      el("thead", {}, el("tr", {}, el("th", {scope: "col", text: "Feature"}), el("th", {scope: "col", text: "Mean activation"}),
        el("th", {scope: "col", text: "Fires on"}), el("th", {scope: "col", text: "Its top tokens"}))));
    var body = el("tbody");
    t[3].forEach(function (f, j) {
      var p = positionOf(f);
      body.appendChild(el("tr", {"data-feature": f}, el("td", {}, featureLink(f, String(f))),
        el("td", {className: "number", text: num(t[4][j])}), el("td", {className: "number", text: percent(t[5][j])}),
        el("td", {className: "tokens", text: p === undefined ? "" : topTokensText(p)})));
    });
    table.appendChild(body);
    return el("section", {className: "token-result", "data-token": t[0], "data-token-id": t[1]},
      el("h4", {}, el("code", {text: quoted(t[0])}), " — " + num(t[2]) + (t[2] === 1 ? " occurrence" : " occurrences")), table);
  }

  function renderSearch(query) {
    var results = document.getElementById("search-results"), status = document.getElementById("search-status");
    document.getElementById("search-input").value = query;
    results.textContent = "";
    status.textContent = "";
    if (!query.trim()) { results.dataset.query = ""; return; }
    load("tokens", state.index.tokens).then(function (data) {
      state.tokens = data;
      if (state.route !== "search=" + query) return;
      var m = matches(query);
      results.textContent = "";
      var groups = [["Tokens spelled “" + query.trim() + "”", m.exact], ["Tokens that begin with it", m.prefix],
                    ["Tokens inside it", m.inside]];
      var found = 0;
      groups.forEach(function (g) {
        if (!g[1].length) return;
        found += g[1].length;
        var s = el("section", {}, el("h3", {text: g[0]}));
        g[1].forEach(function (t) { s.appendChild(tokenResult(t)); });
        results.appendChild(s);
      });
      status.textContent = found ? found + (found === 1 ? " token matches." : " tokens match.")
        : "No token of the corpus matches “" + query.trim() + "”.";
      results.appendChild(el("p", {className: "hint", text: "Per token: the " + data.features_per_token +
        " features with the highest mean activation over its first " + num(data.max_occurrences) + " occurrences."}));
      results.dataset.query = query;
      mark("search-rendered");
    }, function (err) {
      results.appendChild(el("p", {role: "alert", text: err.message}));
    });
  }

  // ---- routing ------------------------------------------------------------------------------------------
  function route() {
    var hash = location.hash.replace(/^#/, "");
    try { hash = decodeURIComponent(hash); } catch (e) { /* a malformed escape: read it as typed */ }
    var view = "list", feature = null, query = "";
    var m = /^feature=([\s\S]*)$/.exec(hash);
    if (m) { view = "feature"; feature = m[1].trim(); }  // anything else than an id gets a message, not the list
    else if (hash === "search" || hash.indexOf("search=") === 0) { view = "search"; query = hash.slice(7); }
    state.route = view === "feature" ? "feature=" + feature : hash;
    ["list", "feature", "search"].forEach(function (v) { document.getElementById(v + "-view").hidden = v !== view; });
    if (view === "feature") {
      if (/^\d+$/.test(feature)) state.lastFeature = parseInt(feature, 10);
      showFeature(feature);
    }
    else {
      document.title = state.title;
      if (view === "search") renderSearch(query);
      var heading = document.getElementById(view + "-heading");
      var back = view === "list" && state.lastFeature !== undefined &&
        document.querySelector("#feature-rows a[data-feature='" + state.lastFeature + "']");
      if (state.started) (back || heading).focus();  // back to the list: where the reader left it
    }
    state.started = true;
  }

  function start(index) {
    state.index = index;
    PAGE = index.list_page || PAGE;
    state.title = document.title;
    state.positions = {};
    index.features.id.forEach(function (id, p) { state.positions[id] = p; });
    renderRunInfo(index.run);
    if (index.features.explanation) document.getElementById("explanation-column").hidden = false;
    document.querySelectorAll("#feature-table th button").forEach(function (b) {
      b.addEventListener("click", function () { sortBy(b.dataset.key); });
    });
    document.getElementById("filter-alive").addEventListener("change", renderList);
    document.getElementById("filter-text").addEventListener("input", renderList);
    document.getElementById("list-controls").addEventListener("submit", function (e) { e.preventDefault(); });
    document.getElementById("show-more").addEventListener("click", showMore);
    document.getElementById("search-form").addEventListener("submit", function (e) {
      e.preventDefault();
      location.hash = "search=" + encodeURIComponent(document.getElementById("search-input").value);
    });
    window.addEventListener("hashchange", route);
    renderList();
    document.getElementById("loading").remove();
    route();
    document.body.dataset.ready = "true";
    mark("list-rendered");
  }

  window.SAEBrowser = {receive: receive};
})();
