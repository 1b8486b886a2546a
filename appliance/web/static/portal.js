// The portal's only script: confirmations, live logs (server-sent events), and following a
// Space's stage (building, starting, waking) until the page can show the app or the error.
"use strict";
document.addEventListener("submit", (event) => {
  const message = event.target.dataset.confirm;
  if (message && !window.confirm(message)) event.preventDefault();
});

const FOLLOW_MS = 1500;  // how often a page following a Space asks for its stage

function followLog(log) {
  const status = document.getElementById("log-status");
  const source = new EventSource(log.dataset.stream);
  let first = true;
  source.addEventListener("line", (e) => {
    if (first) { log.textContent = ""; first = false; }
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 20;
    log.textContent += JSON.parse(e.data).line + "\n";
    if (atBottom) log.scrollTop = log.scrollHeight;
  });
  source.addEventListener("end", (e) => {
    status.textContent = JSON.parse(e.data).message; source.close();
  });
  source.onerror = () => { status.textContent = "Disconnected; reload to follow again."; };
}

function showBadge(view) {
  for (const badge of document.querySelectorAll("[data-stage-badge]")) {
    badge.textContent = view.label;
    badge.dataset.stage = view.stage;
    badge.className = "badge stage-" + view.class;
  }
}

// Ask for the Space's stage until it settles: the Space page reloads into the app once it
// serves; the Logs page (of a build) opens the app; either shows an error with its fix.
function followStage(panel) {
  const where = panel.dataset.where;
  const log = document.getElementById("log");
  const ofBuild = !log || log.dataset.stream.includes("kind=build");
  const tick = async () => {
    let view;
    try {
      const answer = await fetch(panel.dataset.poll, {
        credentials: "same-origin", cache: "no-store", headers: {Accept: "application/json"}});
      if (!answer.ok) throw new Error(String(answer.status));
      view = await answer.json();
    } catch (err) {
      setTimeout(tick, FOLLOW_MS * 3);
      return;
    }
    showBadge(view);
    if (where === "space" && view.serving) {
      window.location.reload();
      return;
    }
    const current = document.getElementById("state");
    if (where === "logs" && view.stage === "RUNNING" && ofBuild) {
      current.hidden = false;
      current.innerHTML = "<h2>The app is running</h2><p>Opening it…</p>";
      setTimeout(() => window.location.assign(view.app), FOLLOW_MS);
      return;
    }
    if (current.dataset.stage !== view.stage || !view.busy) {
      const holder = document.createElement("div");
      holder.innerHTML = view.html;
      const fresh = holder.firstElementChild;
      const focused = current.contains(document.activeElement);
      current.replaceWith(fresh);
      if (!view.busy && !fresh.hidden) {
        fresh.scrollIntoView({block: "nearest"});
        if (focused) fresh.querySelector("button, a")?.focus();
      }
    }
    if (view.busy) setTimeout(tick, FOLLOW_MS);
  };
  setTimeout(tick, FOLLOW_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  const log = document.getElementById("log");
  if (log && log.dataset.stream && window.EventSource) followLog(log);
  const panel = document.getElementById("state");
  if (panel && panel.dataset.follow === "1" && window.fetch) followStage(panel);
  const tail = document.getElementById("log-tail");
  if (tail) tail.scrollTop = tail.scrollHeight;
});
