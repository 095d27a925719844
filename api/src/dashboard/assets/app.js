// Baton dashboard: the live parts. The server sends HTML fragments it rendered and escaped
// (log lines with their ANSI colours, rows, counts, a run's summary); this script only puts
// them in place, follows the log, pauses, searches.
"use strict";
document.documentElement.classList.add("js");

function liveRuns() {
  const table = document.querySelector("table.runs[data-live]");
  if (!table) return;
  const source = new EventSource(table.dataset.live);
  source.addEventListener("runs", (e) => {
    const parts = JSON.parse(e.data);
    document.getElementById("runs-body").innerHTML = parts.rows;
    document.getElementById("counts").innerHTML = parts.counts;
    document.getElementById("active").innerHTML = parts.active;
  });
  source.addEventListener("signed_out", () => { source.close(); location.reload(); });
}

function liveRun() {
  const log = document.getElementById("log");
  if (!log) return;
  const follow = document.getElementById("log-follow");
  const search = document.getElementById("log-search");
  const matches = document.getElementById("log-matches");
  const atBottom = () => log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  const scroll = () => { if (follow && follow.checked) log.scrollTop = log.scrollHeight; };
  // Scrolling up pauses following; back at the bottom resumes it.
  log.addEventListener("scroll", () => { if (follow) follow.checked = atBottom(); });
  scroll();

  function filterLine(line, needle) {
    // Highlight without touching markup: only text nodes are split.
    line.querySelectorAll("mark").forEach((m) => m.replaceWith(document.createTextNode(m.textContent)));
    line.normalize();
    if (!needle) { line.classList.remove("hidden"); return false; }
    const hit = line.textContent.toLowerCase().includes(needle);
    line.classList.toggle("hidden", !hit);
    if (hit) {
      const walker = document.createTreeWalker(line, NodeFilter.SHOW_TEXT);
      const nodes = [];
      while (walker.nextNode()) nodes.push(walker.currentNode);
      for (const node of nodes) {
        const text = node.nodeValue, lower = text.toLowerCase();
        let at = lower.indexOf(needle);
        if (at < 0) continue;
        const frag = document.createDocumentFragment();
        let from = 0;
        while (at >= 0) {
          frag.append(text.slice(from, at));
          const mark = document.createElement("mark");
          mark.textContent = text.slice(at, at + needle.length);
          frag.append(mark);
          from = at + needle.length;
          at = lower.indexOf(needle, from);
        }
        frag.append(text.slice(from));
        node.replaceWith(frag);
      }
    }
    return hit;
  }
  function applySearch() {
    const needle = search.value.trim().toLowerCase();
    let n = 0;
    log.querySelectorAll(".line").forEach((line) => { if (filterLine(line, needle)) n++; });
    matches.textContent = needle ? n + " matching line" + (n === 1 ? "" : "s") : "";
  }
  if (search) search.addEventListener("input", applySearch);

  let url = log.dataset.live;
  if (!url) return;
  function connect() {
    const source = new EventSource(url);
    source.addEventListener("line", (e) => {
      const line = JSON.parse(e.data);
      const span = document.createElement("span");
      span.className = "line " + line.stream;
      span.dataset.seq = line.seq;
      span.innerHTML = line.html; // rendered and escaped by the server
      log.append(span, "\n");
      url = url.replace(/after=\d+/, "after=" + line.seq);
      if (search && search.value.trim()) {
        filterLine(span, search.value.trim().toLowerCase());
      }
      scroll();
    });
    source.addEventListener("summary", (e) => {
      document.getElementById("summary").innerHTML = JSON.parse(e.data).html;
    });
    source.addEventListener("done", () => {
      source.close();
      // The final page has the output, the chain and the rerun button.
      setTimeout(() => location.reload(), 300);
    });
    source.addEventListener("idle", (e) => {
      source.close();
      url = url.replace(/after=\d+/, "after=" + JSON.parse(e.data).after);
      connect();
    });
    source.addEventListener("signed_out", () => { source.close(); location.reload(); });
  }
  connect();
}

document.addEventListener("DOMContentLoaded", () => { liveRuns(); liveRun(); });
