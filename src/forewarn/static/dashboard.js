// The dashboard's small script: charts (uPlot), live counts on the overview, and a few
// conveniences. Everything from the server is set as text (textContent), never as HTML.
(function () {
  "use strict";

  var COLORS = { send: "#2f6fdf", held_out: "#8a8f98", suppressed: "#e0a030" };
  var LABELS = { send: "sent", held_out: "held out", suppressed: "not sent" };
  var charts = [];

  function readJSON(id) {
    var el = document.getElementById(id);
    return el ? JSON.parse(el.textContent) : null;
  }

  function columns(series) {
    return [series.t, series.send, series.held_out, series.suppressed];
  }

  function decisionsChart(el) {
    var series = readJSON(el.getAttribute("data-source"));
    if (!series || typeof uPlot === "undefined") return;
    var bars = el.hasAttribute("data-bars");
    var paths = bars && uPlot.paths && uPlot.paths.bars ? uPlot.paths.bars({ size: [0.8, 40] }) : undefined;
    var opts = {
      width: Math.max(el.clientWidth, 280),
      height: 220,
      series: [{}].concat(["send", "held_out", "suppressed"].map(function (name) {
        return { label: LABELS[name], stroke: COLORS[name], fill: bars ? COLORS[name] + "99" : undefined, width: 2, paths: paths };
      })),
      axes: [{}, { size: 40 }],
      scales: { y: { range: function (u, min, max) { return [0, Math.max(1, max)]; } } },
    };
    var chart = new uPlot(opts, columns(series), el);
    charts.push({ el: el, chart: chart });
  }

  function cell(row, text, href) {
    var td = document.createElement("td");
    if (href) {
      var a = document.createElement("a");
      a.href = href;
      a.textContent = text;
      td.appendChild(a);
    } else {
      td.textContent = text == null ? "" : String(text);
    }
    row.appendChild(td);
    return td;
  }

  function latestRows(tbody, rows) {
    while (tbody.firstChild) tbody.removeChild(tbody.firstChild);
    rows.forEach(function (f) {
      var tr = document.createElement("tr");
      cell(tr, f.at);
      cell(tr, f.trigger, "/triggers/" + encodeURIComponent(f.trigger));
      cell(tr, f.subject, "/customers/" + encodeURIComponent(f.subject));
      cell(tr, f.channel);
      var decision = cell(tr, "");
      var span = document.createElement("span");
      span.className = "decision decision-" + f.decision;
      span.textContent = f.decision;
      decision.appendChild(span);
      cell(tr, f.reason || "");
      cell(tr, f.status + (f.status_reason ? " (" + f.status_reason + ")" : ""));
      tbody.appendChild(tr);
    });
  }

  function live(el) {
    var url = el.getAttribute("data-live");
    function tick() {
      fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" })
        .then(function (r) {
          if (!r.ok) throw new Error("HTTP " + r.status);
          return r.json();
        })
        .then(function (d) {
          Object.keys(d.counts).forEach(function (name) {
            var node = document.querySelector('[data-count="' + name + '"]');
            if (node) node.textContent = String(d.counts[name]);
          });
          var until = document.querySelector('[data-field="until"]');
          if (until) until.textContent = d.until;
          var tbody = document.querySelector("[data-latest] tbody");
          if (tbody && d.latest.length) latestRows(tbody, d.latest);
          charts.forEach(function (c) {
            if (c.el.getAttribute("data-source") === "overview-series") c.chart.setData(columns(d.per_hour));
          });
          el.classList.remove("stale");
        })
        .catch(function () {
          el.classList.add("stale");
        });
    }
    setInterval(tick, 5000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll('[data-chart="decisions"]').forEach(decisionsChart);
    document.querySelectorAll("[data-live]").forEach(live);
    document.querySelectorAll("[data-autosubmit]").forEach(function (select) {
      select.addEventListener("change", function () { select.form.submit(); });
    });
    document.querySelectorAll("[data-hide-events]").forEach(function (box) {
      box.addEventListener("change", function () {
        document.querySelectorAll(".timeline").forEach(function (list) {
          list.classList.toggle("outreach-only", box.checked);
        });
      });
    });
    document.querySelectorAll("[data-all]").forEach(function (all) {
      all.addEventListener("change", function () {
        all.closest("fieldset").querySelectorAll("input[name]").forEach(function (box) {
          box.checked = all.checked;
        });
      });
    });
    var refresh = document.querySelector("[data-refresh]");
    if (refresh) {
      setTimeout(function () { location.reload(); }, 1000 * Number(refresh.getAttribute("data-refresh")));
    }
    window.addEventListener("resize", function () {
      charts.forEach(function (c) { c.chart.setSize({ width: Math.max(c.el.clientWidth, 280), height: 220 }); });
    });
  });
})();
