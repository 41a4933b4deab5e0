// Tables with class aa-sortable: each header is a button (reachable with Tab) that sorts the rows by
// its column. Numbers sort largest first on the first click, text A to Z; empty cells always go last.
(function () {
  function value(row, column) {
    var cell = row.cells[column];
    return cell.hasAttribute("data-value") ? cell.getAttribute("data-value") : cell.textContent.trim();
  }

  function setUp(table) {
    if (table.dataset.ready) return;
    table.dataset.ready = "1";
    var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
    headers.forEach(function (th, column) {
      th.querySelector("button").addEventListener("click", function () {
        var numeric = th.dataset.type === "number";
        var current = th.getAttribute("aria-sort");
        var descending = current ? current === "ascending" : numeric;
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = value(a, column), y = value(b, column);
          if (x === "" || y === "") return (x === "") - (y === "");  // blanks last, either way
          var order = numeric ? Number(x) - Number(y) : x.localeCompare(y);
          return descending ? -order : order;
        });
        rows.forEach(function (row) { body.appendChild(row); });
        headers.forEach(function (other) { other.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", descending ? "descending" : "ascending");
      });
    });
  }

  // Material's instant navigation swaps pages without reloading scripts; document$ fires on each page.
  function onPage() { document.querySelectorAll("table.aa-sortable").forEach(setUp); }
  if (window.document$) window.document$.subscribe(onPage);
  else document.addEventListener("DOMContentLoaded", onPage);
})();
