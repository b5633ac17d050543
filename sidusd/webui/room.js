// The room, live (sidusd/web.py).  Writes text only: textContent, never innerHTML.
"use strict";
(function () {
  var STATES = ["never", "booting", "up", "failed", "stale"];
  var machines = {};          // mac -> tile data
  var open = null;            // the MAC whose timeline is shown

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function clear(e) { while (e.firstChild) e.removeChild(e.firstChild); }
  function size(n) {
    if (typeof n !== "number") return "-";
    var u = ["B", "KiB", "MiB", "GiB"], i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n) + " " + u[i];
  }
  function hms(t) { return typeof t === "number" ? new Date(t * 1000).toLocaleTimeString() : "-"; }
  function label(m) {
    if (m.state === "booting") return "booting: " + (m.stage || "dhcp");
    if (m.state === "failed") return "failed: " + (m.reason || "");
    if (m.state === "up" && m.stages && typeof m.stages.up === "number") return "up after " + m.stages.up + " s";
    return m.state;
  }
  function group(m) { return m.known ? "profile " + (m.profile || "-") : "not in the inventory"; }
  function matches(m) {
    var f = document.getElementById("filter").value.trim().toLowerCase();
    if (!f) return true;
    return [m.mac, m.hostname, m.profile, m.state].some(function (v) {
      return v && String(v).toLowerCase().indexOf(f) >= 0;
    });
  }

  function tileOf(m) {
    var t = el("div", "tile " + (STATES.indexOf(m.state) >= 0 ? m.state : "never"));
    t.setAttribute("data-mac", m.mac);
    t.setAttribute("data-state", m.state);
    t.appendChild(el("div", "name", m.hostname || m.mac));
    t.appendChild(el("div", "mac", m.mac));
    t.appendChild(el("div", "stage", label(m)));
    t.title = (m.ip || "") + " " + (m.last || "");
    t.addEventListener("click", function () { show(m.mac); });
    if (!matches(m)) t.classList.add("hidden");
    return t;
  }

  function drawAll() {
    var groups = {}, names = [];
    Object.keys(machines).sort().forEach(function (mac) {
      var g = group(machines[mac]);
      if (!groups[g]) { groups[g] = []; names.push(g); }
      groups[g].push(machines[mac]);
    });
    names.sort();
    var root = document.getElementById("groups");
    clear(root);
    names.forEach(function (g) {
      var box = el("section", "group");
      box.appendChild(el("h2", null, g));
      var tiles = el("div", "tiles");
      tiles.setAttribute("data-group", g);
      groups[g].forEach(function (m) { tiles.appendChild(tileOf(m)); });
      box.appendChild(tiles);
      root.appendChild(box);
    });
  }

  function update(m) {
    var known = machines[m.mac];
    machines[m.mac] = m;
    var old = null;
    document.querySelectorAll(".tile").forEach(function (t) {
      if (t.getAttribute("data-mac") === m.mac) old = t;
    });
    if (old && known && group(known) === group(m)) old.replaceWith(tileOf(m));
    else drawAll();
    if (open === m.mac) show(m.mac);
  }

  function states(s) {
    var box = document.getElementById("states");
    clear(box);
    STATES.forEach(function (k) { box.appendChild(el("span", k, k + " " + (s[k] || 0))); });
  }

  function rows(tbody, list) {
    clear(tbody);
    list.forEach(function (cells) {
      var tr = el("tr");
      cells.forEach(function (c) { tr.appendChild(el("td", null, c)); });
      tbody.appendChild(tr);
    });
  }

  function counters(d) {
    states(d.states || {});
    var c = d.counters || {};
    rows(document.getElementById("counters"), Object.keys(c).sort().map(function (k) { return [k, c[k]]; }));
    var tr = (d.transfers || []).map(function (t) {
      return [t.service, t.mac || t.peer, t.file, size(t.bytes) + " of " + size(t.size),
              t.speed === null ? "-" : size(t.speed) + "/s"];
    });
    var inflight = d.in_flight || {};
    Object.keys(inflight).forEach(function (s) { tr.push([s, "in flight", inflight[s]]); });
    rows(document.getElementById("transfers"), tr);
  }

  function show(mac) {
    open = mac;
    fetch("/machine?mac=" + encodeURIComponent(mac)).then(function (r) { return r.json(); }).then(function (m) {
      if (open !== mac) return;
      document.getElementById("detail").hidden = false;
      document.getElementById("detail-title").textContent = (m.hostname || "") + " " + m.mac;
      document.getElementById("detail-state").textContent =
        label(m) + (m.ip ? "  ip " + m.ip : "") + (m.arch ? "  " + m.arch : "");
      rows(document.getElementById("timeline"), (m.timeline || []).map(function (e) {
        var rest = Object.keys(e).filter(function (k) { return k !== "t" && k !== "event"; })
          .map(function (k) { return k + "=" + e[k]; }).join(" ");
        return [hms(e.t), e.event, rest];
      }));
    }).catch(function () {});
  }

  function room(d) {
    machines = {};
    (d.machines || []).forEach(function (m) { machines[m.mac] = m; });
    drawAll();
    counters(d);
  }

  document.getElementById("close").addEventListener("click", function () {
    open = null;
    document.getElementById("detail").hidden = true;
  });
  document.getElementById("filter").addEventListener("input", drawAll);
  room(JSON.parse(document.getElementById("room").textContent));

  var live = document.getElementById("live");
  var es = new EventSource("/events");
  es.addEventListener("open", function () { live.textContent = "live"; live.className = "live"; });
  es.addEventListener("error", function () { live.textContent = "reconnecting"; live.className = "live off"; });
  es.addEventListener("room", function (ev) { room(JSON.parse(ev.data)); });
  es.addEventListener("machine", function (ev) { update(JSON.parse(ev.data)); });
  es.addEventListener("counters", function (ev) { counters(JSON.parse(ev.data)); });
})();
