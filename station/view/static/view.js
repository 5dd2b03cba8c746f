// The operator view: one EventSource on /events; "state" redraws counts, hours,
// heatmaps and health, "part" puts a part on top. Text goes in as textContent only.
"use strict";
(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const GRADES = ["PASS", "DISCOUNT", "REJECT"];
  let latestMax = 8;
  const parts = [];  // newest first: the summaries the server sent

  function el(tag, attrs, text) {
    const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function $(id) { return document.getElementById(id); }
  function pct(n, total) { return total ? (100 * n / total).toFixed(1) + " %" : ""; }
  function timeOf(iso) { return iso ? new Date(iso).toLocaleTimeString() : ""; }

  function showPart(p) {
    const box = $("current");
    box.replaceChildren();
    box.className = "part";
    box.dataset.id = p.id;
    if (p.image) box.append(el("img", {src: p.image, alt: "part " + (p.part_id || p.seq)}));
    const info = el("div");
    const grade = p.error ? "ERROR" : p.grade;
    info.append(el("span", {class: "grade " + grade, id: "current-grade"}, grade));
    info.append(el("p", {class: "meta"}, [timeOf(p.captured_at), p.part_id ? "part " + p.part_id : "#" + p.seq, p.source]
      .filter(Boolean).join(" · ")));
    if (p.error) {
      info.append(el("p", {class: "reason"}, p.error));
    } else {
      info.append(el("p", {class: "reason"}, p.rule + ": " + p.reason));
      const list = el("ul", {class: "defects"});
      for (const d of p.defects) {
        list.append(el("li", {}, d["class"] + " " + d.area_pct.toFixed(3) + " % (score " + d.score.toFixed(2) + ")"));
      }
      if (!p.defects.length) list.append(el("li", {}, "no defect"));
      info.append(list);
    }
    box.append(info);
  }

  function showHistory() {
    const strip = $("history");
    strip.replaceChildren();
    for (const p of parts.slice(1)) {
      const grade = p.error ? "ERROR" : p.grade;
      const li = el("li", {class: grade, title: p.error || p.reason || ""});
      if (p.image) li.append(el("img", {src: p.image, alt: grade}));
      li.append(el("span", {}, grade + " " + timeOf(p.captured_at)));
      strip.append(li);
    }
  }

  function onPart(p) {
    const at = parts.findIndex((q) => q.id === p.id);
    if (at >= 0) parts.splice(at, 1);
    parts.unshift(p);
    parts.length = Math.min(parts.length, latestMax);
    showPart(parts[0]);
    showHistory();
  }

  function showCounts(shift) {
    const g = shift.grades;
    const total = GRADES.reduce((s, k) => s + g[k], 0);
    for (const k of GRADES) {
      $("count-" + k).textContent = g[k];
      $("rate-" + k).textContent = pct(g[k], total);
    }
    $("count-total").textContent = total;
    $("count-errors").textContent = g.errors ? g.errors + " errors" : "";
    $("shift").textContent = "shift " + shift.start + " – " + shift.end.slice(-5);
    $("since").textContent = "since " + shift.since.slice(-5);
  }

  function showHours(hours) {
    const svg = $("hours");
    svg.replaceChildren();
    const n = Math.max(hours.length, 8), w = 400 / n, top = 12, h = 92;
    const most = Math.max(1, ...hours.map((r) => GRADES.reduce((s, k) => s + r[k], 0)));
    hours.forEach((r, i) => {
      let y = top + h;
      for (const k of GRADES) {
        const bh = h * r[k] / most;
        y -= bh;
        if (bh > 0) svg.append(el("svg:rect", {class: "bar-" + k, x: i * w + 2, y: y, width: w - 4, height: bh}));
      }
      const sum = GRADES.reduce((s, k) => s + r[k], 0);
      svg.append(el("svg:text", {x: i * w + w / 2, y: Math.max(y - 2, 9), "text-anchor": "middle"}, sum));
      svg.append(el("svg:text", {x: i * w + w / 2, y: 118, "text-anchor": "middle"}, r.hour));
    });
  }

  function heat(v) {  // 0..1 → dark blue, red, yellow
    const stops = [[24, 32, 48], [200, 40, 40], [255, 220, 60]];
    const t = Math.max(0, Math.min(1, v)) * 2, i = Math.min(1, Math.floor(t)), f = t - i;
    const c = stops[i].map((a, j) => Math.round(a + (stops[i + 1][j] - a) * f));
    return "rgb(" + c.join(",") + ")";
  }

  function showHeatmaps(heatmap, grid) {
    const where = $("where"), maps = $("heatmaps");
    where.replaceChildren();
    maps.replaceChildren();
    const classes = Object.keys(heatmap);
    if (!classes.length) where.append(el("li", {}, "no defect this shift"));
    for (const cls of classes) {
      const m = heatmap[cls];
      where.append(el("li", {}, m.where));
      const most = Math.max(...m.grid.flat()) || 1;
      const fig = el("figure", {class: "heatmap", "data-class": cls});
      fig.append(el("figcaption", {}, cls + " · " + m.defects + (m.defects === 1 ? " defect" : " defects")));
      const svg = el("svg:svg", {viewBox: "0 0 " + grid + " " + grid, role: "img", "aria-label": m.where});
      m.grid.forEach((row, r) => row.forEach((v, c) => {
        const hot = r === m.hot[0] && c === m.hot[1];
        svg.append(el("svg:rect", {x: c, y: r, width: 1, height: 1, fill: heat(v / most), class: hot ? "cell hot" : "cell",
          "data-row": r, "data-col": c}));
      }));
      fig.append(svg);
      maps.append(fig);
    }
  }

  function pill(text, level) { return el("li", {class: "pill " + level}, text); }

  function showHealth(health, linkLevel, linkText) {
    const ul = $("health");
    ul.replaceChildren(pill(linkText, linkLevel));
    if (!health) return;
    const cam = health.camera;
    ul.append(pill("camera " + cam, cam === "connected" ? "ok" : cam === "lost" ? "bad" : "warn"));
    const m = health.mqtt, o = health.outbox;
    if (m.configured) ul.append(pill(m.connected ? "MQTT connected" : "MQTT " + m.state, m.connected ? "ok" : "bad"));
    else ul.append(pill("MQTT off", ""));
    if (o.configured) {
      ul.append(pill("outbox " + o.depth + (o.alarm ? " FULL" : ""), o.alarm ? "bad" : o.depth > 100 ? "warn" : "ok"));
    }
    const body = $("sinks").tBodies[0];
    body.replaceChildren();
    for (const s of health.sinks) {
      const tr = el("tr", {class: s.ok ? "" : "down"});
      tr.append(el("td", {}, s.name), el("td", {}, s.state));
      body.append(tr);
    }
  }

  function showModels(models) {
    const body = $("models").tBodies[0];
    body.replaceChildren();
    for (const m of models) {
      const tr = el("tr", {title: "sha256 " + m.sha256 + "…"});
      tr.append(el("td", {}, m.role + ": " + (m.name || "?")), el("td", {}, m.version || ""), el("td", {}, m.providers.join(", ")));
      body.append(tr);
    }
  }

  let last = null;
  function onState(s) {
    last = s;
    latestMax = s.latest_max || latestMax;
    $("station").textContent = s.station;
    document.title = s.station + " — operator view";
    showCounts(s.shift);
    showHours(s.shift.hours);
    showHeatmaps(s.shift.heatmap, s.shift.grid);
    showHealth(s.health, "ok", "live");
    showModels(s.models);
  }

  function connect() {
    const source = new EventSource("/events");
    source.addEventListener("state", (e) => onState(JSON.parse(e.data)));
    source.addEventListener("part", (e) => onPart(JSON.parse(e.data)));
    source.addEventListener("open", () => showHealth(last && last.health, "ok", "live"));
    source.addEventListener("error", () => showHealth(last && last.health, "warn", "reconnecting"));
  }
  connect();
})();
