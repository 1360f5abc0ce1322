// Live logs of one service: server-sent events from /services/<unit>/logs/stream, a level filter
// (the server filters), pause (lines are held, not lost) and at most 2,000 lines on the page.
"use strict";
(function () {
  const table = document.getElementById("log");
  const state = document.getElementById("log-state");
  const level = document.getElementById("level");
  const pause = document.getElementById("pause");
  let source = null, paused = false, held = [];

  function add(line) {
    const tr = document.createElement("tr");
    tr.className = line.level;
    const when = line.time ? new Date(typeof line.time === "number" ? line.time * 1000 : line.time).toLocaleTimeString() : "";
    const fields = Object.entries(line.fields || {}).map(([k, v]) => k + "=" + v).join(" ");
    for (const text of [when, line.level, line.event, fields]) {
      const td = document.createElement("td");
      td.textContent = text;  // text, never HTML: a log line is whatever a hostile file made a service say
      tr.appendChild(td);
    }
    table.appendChild(tr);
    while (table.rows.length > 2001) table.deleteRow(1);
  }

  function connect() {
    if (source) source.close();
    source = new EventSource(table.dataset.stream + "?level=" + encodeURIComponent(level.value));
    source.onopen = () => { state.textContent = "live"; };
    source.onerror = () => { state.textContent = "reconnecting…"; };
    source.onmessage = (ev) => {
      const line = JSON.parse(ev.data);
      if (paused) held.push(line); else add(line);
    };
  }

  level.addEventListener("change", () => { while (table.rows.length > 1) table.deleteRow(1); connect(); });
  pause.addEventListener("click", () => {
    paused = !paused;
    pause.textContent = paused ? "Resume" : "Pause";
    if (!paused) { held.forEach(add); held = []; }
  });
  connect();
})();
