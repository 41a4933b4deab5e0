// The all-papers table: loads the rows from papers-data.js, then filters and sorts in the browser.
// Every value is written with textContent, never innerHTML, so text from the catalog stays text.
(function () {
  function setUp(root) {
    if (!root || root.dataset.ready) return;
    root.dataset.ready = "1";
    if (window.CATALOG_PAPERS) return build(root, window.CATALOG_PAPERS);
    var script = document.createElement("script");
    script.src = root.dataset.data;  // a script, not fetch(): it also works when the site is opened from disk
    script.onload = function () { build(root, window.CATALOG_PAPERS || []); };
    document.head.appendChild(script);
  }

  function build(root, rows) {
    var form = root.querySelector("form"), body = root.querySelector("tbody");
    var count = root.querySelector(".aa-table-count"), base = root.dataset.base;
    var sortKey = "year", descending = true;

    fillOptions(form.year, unique(rows.map(function (r) { return r.year; })).sort().reverse());
    fillOptions(form.venue, unique(rows.map(function (r) { return r.venue; })).sort());
    fillOptions(form.section, unique(rows.map(function (r) { return r.section; })));
    fillOptions(form.kind, unique(rows.map(function (r) { return r.kind; })).sort());
    fillOptions(form.tag, unique([].concat.apply([], rows.map(function (r) { return r.tags; }))).sort());

    function matches(r) {
      var q = form.q.value.trim().toLowerCase();
      return (!q || r.title.toLowerCase().indexOf(q) >= 0) &&
        (!form.year.value || String(r.year) === form.year.value) &&
        (!form.venue.value || r.venue === form.venue.value) &&
        (!form.section.value || r.section === form.section.value) &&
        (!form.kind.value || r.kind === form.kind.value) &&
        (!form.tag.value || r.tags.indexOf(form.tag.value) >= 0) &&
        (!form.impl.checked || r.impl) &&
        ((r.citations || 0) >= (Number(form.citations.value) || 0));
    }

    var NUMERIC = { year: true, citations: true };

    function compare(a, b) {
      var x = a[sortKey], y = b[sortKey];
      if (Array.isArray(x)) { x = x.join(", "); y = y.join(", "); }
      if (typeof x === "boolean") { x = x ? 1 : null; y = y ? 1 : null; }
      var blankX = x === null || x === undefined || x === "", blankY = y === null || y === undefined || y === "";
      if (blankX || blankY) return blankX - blankY;  // blanks last, whichever the direction
      var order = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
      return descending ? -order : order;
    }

    // The filters and the sort live in the address (?q=lora&tag=LoRA&sort=-citations), so a view can be shared.
    var FIELDS = ["q", "year", "venue", "section", "kind", "tag", "impl", "citations"];

    function readAddress() {
      var params = new URLSearchParams(window.location.search);
      FIELDS.forEach(function (name) {
        if (!params.has(name)) return;
        var field = form[name];
        if (field.type === "checkbox") field.checked = params.get(name) === "1";
        else field.value = params.get(name);
      });
      var sort = params.get("sort");
      if (sort && root.querySelector('th[data-key="' + sort.replace(/^-/, "") + '"]')) {
        sortKey = sort.replace(/^-/, "");
        descending = sort.charAt(0) === "-";
      }
    }

    function writeAddress() {
      var params = new URLSearchParams();
      FIELDS.forEach(function (name) {
        var field = form[name];
        if (field.type === "checkbox") { if (field.checked) params.set(name, "1"); }
        else if (field.value && !(name === "citations" && Number(field.value) === 0)) params.set(name, field.value);
      });
      if (sortKey !== "year" || !descending) params.set("sort", (descending ? "-" : "") + sortKey);
      var query = params.toString();
      history.replaceState(history.state, "", window.location.pathname + (query ? "?" + query : "") + window.location.hash);
    }

    function cell(tr, text) { var td = tr.insertCell(); td.textContent = text; return td; }

    function draw() {
      var shown = rows.filter(matches).sort(compare);
      var fragment = document.createDocumentFragment();
      shown.forEach(function (r) {
        var tr = document.createElement("tr");
        var link = document.createElement("a");
        link.href = base + r.url;
        link.textContent = r.title;
        tr.insertCell().appendChild(link);
        cell(tr, r.year || ""); cell(tr, r.venue || ""); cell(tr, r.section); cell(tr, r.kind);
        cell(tr, r.tags.join(", ")); cell(tr, r.impl ? "yes" : ""); cell(tr, r.citations === null ? "" : r.citations);
        fragment.appendChild(tr);
      });
      body.replaceChildren(fragment);
      count.textContent = shown.length + " of " + rows.length + " entries";
      writeAddress();
      root.querySelectorAll("th[data-key]").forEach(function (th) {
        th.setAttribute("aria-sort", th.dataset.key === sortKey ? (descending ? "descending" : "ascending") : "none");
      });
    }

    // Each header holds a button, so Tab reaches it and Enter or Space sorts; a click anywhere in the
    // header cell sorts too (the button's click reaches the cell). The first click sorts numbers
    // largest first and text A to Z; the next click reverses.
    root.querySelectorAll("th[data-key]").forEach(function (th) {
      th.addEventListener("click", function () {
        descending = th.dataset.key === sortKey ? !descending : Boolean(NUMERIC[th.dataset.key]);
        sortKey = th.dataset.key;
        draw();
      });
    });
    readAddress();
    form.addEventListener("input", draw);
    form.addEventListener("change", draw);
    draw();
  }

  function unique(values) {
    return values.filter(function (v, i) { return v !== null && v !== "" && values.indexOf(v) === i; });
  }

  function fillOptions(select, values) {
    values.forEach(function (v) { var o = document.createElement("option"); o.value = o.textContent = v; select.appendChild(o); });
  }

  // Material's instant navigation swaps pages without reloading scripts; document$ fires on each page.
  function onPage() { setUp(document.querySelector(".aa-table")); }
  if (window.document$) window.document$.subscribe(onPage);
  else document.addEventListener("DOMContentLoaded", onPage);
})();
