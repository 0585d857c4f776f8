// Live refresh of the worklist: fetch the rows fragment and swap the table body.
(function () {
  "use strict";
  var table = document.getElementById("worklist");
  var body = document.getElementById("worklist-rows");
  var note = document.getElementById("refreshed");
  if (!table || !body) { return; }
  var every = Math.max(2, parseInt(table.getAttribute("data-refresh"), 10) || 15) * 1000;
  var query = table.getAttribute("data-query") || "";
  function refresh() {
    if (document.hidden) { return; }
    fetch("/worklist/rows" + (query ? "?" + query : ""), { credentials: "same-origin", cache: "no-store" })
      .then(function (r) {
        if (r.status === 401) { window.location.reload(); return null; }
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.text();
      })
      .then(function (html) {
        if (html === null) { return; }
        body.innerHTML = html;
        if (note) { note.textContent = "Updated " + new Date().toLocaleTimeString() + "."; }
      })
      .catch(function () {
        if (note) { note.textContent = "Refresh failed at " + new Date().toLocaleTimeString() + "; retrying."; }
      });
  }
  window.setInterval(refresh, every);
  document.addEventListener("visibilitychange", refresh);
})();
