// The header's search box, on Pagefind (https://pagefind.app): the index is built with the site
// (`catalog build` runs pagefind) and cut into small fragments, so a query fetches a few dozen KB
// whatever the size of the catalog. Nothing loads until the box is first focused.
// Results are written with textContent (and <mark> for the matched words), never innerHTML.
(function () {
  var script = document.currentScript;
  // This file is at <site root>/assets/javascripts/search.js, wherever the site is served.
  var root = new URL("../../", script.src);
  var pagefind = null;
  var shown = 8;
  var considered = 24;  // results read to find the paper named exactly as the query (a few KB each)

  function load() {
    if (!pagefind) {
      pagefind = import(new URL("pagefind/pagefind.js", root).href).then(function (module) {
        // Rank by where a word stands (a paper's title and method name weigh most), not by how often
        // it recurs or how short the page is: otherwise the pages that repeat "LoRA" most (its
        // relatives, the implementation pages) push the LoRA paper itself off the first results.
        // A paper's method name (its `name` meta) outweighs page titles, which for the implementation
        // pages hold module names ("lora_serving") that every prefix of the query matches.
        var ranking = { termFrequency: 0.0, pageLength: 0.0, metaWeights: { title: 1.0, name: 20.0 } };
        return module.options({ baseUrl: root.pathname, excerptLength: 24, ranking: ranking }).then(function () {
          module.init();
          return module;
        });
      });
    }
    return pagefind;
  }

  // The paper whose method name is exactly the query ("LoRA") first, then Pagefind's order; `shown` of them.
  function namedFirst(pages, query) {
    var wanted = query.toLowerCase();
    var named = pages.filter(function (p) { return (p.meta.name || "").toLowerCase() === wanted; });
    var others = pages.filter(function (p) { return named.indexOf(p) < 0; });
    return named.concat(others).slice(0, shown);
  }

  // Pagefind's excerpt is text with <mark> around the matches: keep exactly those two things.
  function excerptNodes(excerpt) {
    var parsed = new DOMParser().parseFromString("<p>" + excerpt + "</p>", "text/html").body.firstChild;
    var fragment = document.createDocumentFragment();
    parsed.childNodes.forEach(function (node) {
      if (node.nodeName === "MARK") {
        var mark = document.createElement("mark");
        mark.textContent = node.textContent;
        fragment.appendChild(mark);
      } else {
        fragment.appendChild(document.createTextNode(node.textContent));
      }
    });
    return fragment;
  }

  function setUp(box) {
    var input = box.querySelector(".aa-search__input");
    var panel = box.querySelector(".aa-search__results");
    var latest = 0;

    function close() {
      panel.hidden = true;
      input.setAttribute("aria-expanded", "false");
    }

    function message(text) {
      var line = document.createElement("p");
      line.className = "aa-search__meta";
      line.textContent = text;
      panel.replaceChildren(line);
      panel.hidden = false;
      input.setAttribute("aria-expanded", "true");
    }

    function run() {
      var query = input.value.trim(), ticket = ++latest;
      if (!query) return close();
      load()
        .then(function (module) { return module.debouncedSearch(query, {}, 120); })
        .then(function (search) {
          if (search === null || ticket !== latest) return null;  // a newer query is on its way
          return Promise.all(search.results.slice(0, considered).map(function (r) { return r.data(); }))
            .then(function (pages) { return { total: search.results.length, pages: namedFirst(pages, query) }; });
        })
        .then(function (found) {
          if (!found || ticket !== latest) return;
          if (!found.pages.length) return message("No pages match \u201c" + query + "\u201d.");
          var list = document.createElement("ol");
          list.className = "aa-search__list";
          found.pages.forEach(function (page) {
            var item = document.createElement("li"), link = document.createElement("a");
            var title = document.createElement("span"), excerpt = document.createElement("span");
            link.href = page.url;
            title.className = "aa-search__title";
            title.textContent = (page.meta && page.meta.title) || page.url;
            excerpt.className = "aa-search__excerpt";
            excerpt.appendChild(excerptNodes(page.excerpt || ""));
            link.append(title, excerpt);
            item.appendChild(link);
            list.appendChild(item);
          });
          var meta = document.createElement("p");
          meta.className = "aa-search__meta";
          meta.textContent = found.total > shown
            ? "The first " + shown + " of " + found.total + " pages"
            : found.total + (found.total === 1 ? " page" : " pages");
          panel.replaceChildren(meta, list);
          panel.hidden = false;
          input.setAttribute("aria-expanded", "true");
        })
        .catch(function () {
          message("Search needs the site served over http(s); it cannot load from a file.");
        });
    }

    input.addEventListener("focus", function () { load().catch(function () {}); if (input.value) run(); });
    input.addEventListener("input", run);
    input.addEventListener("keydown", function (event) {
      var links = Array.prototype.slice.call(panel.querySelectorAll("a"));
      if (event.key === "Escape") { close(); input.blur(); }
      else if (event.key === "ArrowDown" && links.length) { event.preventDefault(); links[0].focus(); }
      else if (event.key === "Enter" && links.length) { links[0].click(); }
    });
    panel.addEventListener("keydown", function (event) {
      var links = Array.prototype.slice.call(panel.querySelectorAll("a"));
      var at = links.indexOf(document.activeElement);
      if (event.key === "ArrowDown" && at < links.length - 1) { event.preventDefault(); links[at + 1].focus(); }
      else if (event.key === "ArrowUp") { event.preventDefault(); (at > 0 ? links[at - 1] : input).focus(); }
      else if (event.key === "Escape") { close(); input.focus(); }
    });
    panel.addEventListener("click", function (event) { if (event.target.closest("a")) close(); });
    document.addEventListener("click", function (event) { if (!box.contains(event.target)) close(); });
    // "/" jumps to the box from anywhere but a text field, as on most documentation sites.
    document.addEventListener("keydown", function (event) {
      var typing = /^(INPUT|TEXTAREA|SELECT)$/.test(document.activeElement.tagName);
      if (event.key === "/" && !typing) { event.preventDefault(); input.focus(); }
    });
  }

  document.querySelectorAll(".aa-search").forEach(setUp);
})();
