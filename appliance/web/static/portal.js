// The portal's only script: confirmations, live logs (server-sent events), state refresh.
"use strict";
document.addEventListener("submit", (event) => {
  const message = event.target.dataset.confirm;
  if (message && !window.confirm(message)) event.preventDefault();
});
document.addEventListener("DOMContentLoaded", () => {
  const log = document.getElementById("log");
  if (log && log.dataset.stream && window.EventSource) {
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
  const state = document.querySelector("[data-refresh='1']");
  if (state) setTimeout(() => window.location.reload(), 3000);
  const tail = document.getElementById("log-tail");
  if (tail) tail.scrollTop = tail.scrollHeight;
});
