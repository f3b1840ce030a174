// vrlab report: sortable tables, a filter over encoder names, hover labels on figure points. No network.
(function () {
  "use strict";
  function value(cell) {
    var v = cell.getAttribute("data-v");
    if (v === null || v === "") { return { n: NaN, s: cell.textContent.trim().toLowerCase() }; }
    var n = Number(v);
    return { n: n, s: v.toLowerCase() };
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    table.querySelectorAll("th").forEach(function (th, col) {
      th.addEventListener("click", function () {
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        var asc = th.getAttribute("aria-sort") !== "ascending";
        table.querySelectorAll("th").forEach(function (other) { other.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", asc ? "ascending" : "descending");
        var numeric = rows.every(function (r) { var x = value(r.cells[col]); return !isNaN(x.n) || x.s === "—"; });
        rows.sort(function (a, b) {
          var x = value(a.cells[col]), y = value(b.cells[col]);
          var d;
          if (numeric) {
            var xn = isNaN(x.n) ? Infinity : x.n, yn = isNaN(y.n) ? Infinity : y.n;
            d = xn === yn ? 0 : (xn < yn ? -1 : 1);
          } else {
            d = x.s < y.s ? -1 : (x.s > y.s ? 1 : 0);
          }
          return asc ? d : -d;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
  var filter = document.getElementById("filter");
  if (filter) {
    filter.addEventListener("input", function () {
      var q = filter.value.trim().toLowerCase();
      document.querySelectorAll("table.filterable").forEach(function (table) {
        var col = Number(table.getAttribute("data-name-col") || 0);
        Array.prototype.forEach.call(table.tBodies[0].rows, function (r) {
          var name = r.cells.length > col ? r.cells[col].textContent.toLowerCase() : "";
          r.style.display = !q || name.indexOf(q) >= 0 ? "" : "none";
        });
      });
    });
  }
  var tips = JSON.parse(document.getElementById("tips").textContent);
  var tip = document.getElementById("tip");
  Object.keys(tips).forEach(function (id) {
    var el = document.getElementById(id);
    if (!el) { return; }
    el.style.cursor = "pointer";
    el.addEventListener("mouseenter", function () { tip.textContent = tips[id]; tip.style.display = "block"; });
    el.addEventListener("mousemove", function (e) { tip.style.left = (e.clientX + 12) + "px"; tip.style.top = (e.clientY + 12) + "px"; });
    el.addEventListener("mouseleave", function () { tip.style.display = "none"; });
  });
})();
