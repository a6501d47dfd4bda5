/* The demo app's own script: client-side navigation (so the widget sees route changes without
 * a reload) and a search box that reports `Search Performed`. */
(function () {
  "use strict";
  var sections = document.querySelectorAll("[data-route]");
  function render() {
    var path = location.pathname.replace(/^\/demo/, "") || "/";
    sections.forEach(function (s) {
      var route = s.getAttribute("data-route");
      s.hidden = !(route === path || (route !== "/" && path.indexOf(route) === 0));
    });
    document.querySelectorAll("nav a").forEach(function (a) {
      a.classList.toggle("on", a.getAttribute("href") === "/demo" + path);
    });
  }
  document.addEventListener("click", function (e) {
    var a = e.target.closest && e.target.closest("a[data-nav]");
    if (!a) return;
    e.preventDefault();
    history.pushState({}, "", a.getAttribute("href"));
    render();
  });
  window.addEventListener("popstate", render);
  var form = document.getElementById("search");
  if (form) {
    form.addEventListener("submit", function (e) {
      e.preventDefault();
      var q = document.getElementById("q").value;
      if (window.Forewarn) window.Forewarn.track("Search Performed", {query: q});
      document.getElementById("results").textContent = "No articles match \u201c" + q + "\u201d yet.";
    });
  }
  render();
})();
